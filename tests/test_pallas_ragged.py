"""ragged_paged_attention against its reference and against paged_attention_xla.

Interpret mode on the CPU; on a GPU the same tests run the compiled Triton kernel.
"""

import functools

import jax
import jax.extend  # jax.extend.core below: a submodule that `import jax` does not load on every backend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.layers.attention import paged_attention_pallas as paged_attention
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention import num_work_items, ragged_work_list
from tests.paged_kv import INTERPRET, assert_close, lower_for_h100, make_batch, make_cache, xla_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

LONG_CONTEXT = 333
PADDING_TOKENS = 5

# (page_size, num_heads, num_kv_heads, head_dim, dtype, window, block_q, pages_per_block)
CASES = [
    (16, 8, 2, 64, jnp.float32, None, None, None),
    (16, 8, 2, 128, jnp.bfloat16, 48, None, None),
    (32, 2, 2, 64, jnp.float32, 48, 16, 1),
    (32, 16, 2, 128, jnp.float32, None, 4, 2),
    (8, 16, 2, 64, jnp.bfloat16, None, 2, 2),
    (8, 2, 2, 128, jnp.float32, 20, 32, 4),
    (16, 14, 2, 80, jnp.bfloat16, 100, None, None),
]


def ragged_inputs(page_size, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """A mixed step: a prefill from 0 longer than a query block, a chunk continuing a long context,
    a decode row one past a page, exactly one page from 0, a one-token context, a padding slot and
    padding tokens at the end. Returns (q, k_pages, v_pages, batch, rows owned by sequences)."""
    rng = np.random.default_rng(seed)
    starts = [0, LONG_CONTEXT - 33, page_size, 0, 0]
    query_lens = [37, 33, 1, page_size, 1]
    order = rng.permutation(len(starts))
    starts = [starts[i] for i in order]
    query_lens = [query_lens[i] for i in order]
    lens = [s + n for s, n in zip(starts, query_lens)]
    pages_per_seq = -(-LONG_CONTEXT // page_size) + 2
    k_pages, v_pages, tables = make_cache(
        rng, lens + [0], num_kv_heads=num_kv_heads, page_size=page_size, head_dim=head_dim,
        pages_per_seq=pages_per_seq, dtype=dtype,
    )
    num_real = sum(query_lens)
    q = jnp.asarray(rng.normal(size=(num_real + PADDING_TOKENS, num_heads, head_dim)), dtype)
    batch = make_batch(
        starts, query_lens, tables, page_size=page_size, num_tokens=num_real + PADDING_TOKENS, max_query_len=40
    )
    return q, k_pages, v_pages, batch, num_real


@pytest.mark.parametrize("page_size,num_heads,num_kv_heads,head_dim,dtype,window,block_q,pages_per_block", CASES)
def test_matches_reference_and_xla(
    page_size, num_heads, num_kv_heads, head_dim, dtype, window, block_q, pages_per_block
):
    q, k_pages, v_pages, batch, num_real = ragged_inputs(page_size, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    metadata = (batch.query_start, batch.seq_lens, batch.block_tables)
    out = ragged_paged_attention(
        q, k_pages, v_pages, *metadata, max_query_len=batch.max_query_len, scale=scale, window=window,
        block_q=block_q, pages_per_block=pages_per_block, interpret=INTERPRET,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(out[num_real:], np.float32), 0.0)  # padding tokens

    reference = ragged_paged_attention_reference(
        q, k_pages, v_pages, *metadata, max_query_len=batch.max_query_len, scale=scale, window=window
    )
    assert_close(out, reference, dtype)
    xla = xla_reference(q, k_pages, v_pages, batch, scale=scale, window=window)
    assert_close(out, xla, dtype, rows=slice(0, num_real))


@pytest.mark.parametrize("rows,block_rows", [(1, 256), (1, 8), (2, 8), (4, 256), (16, 32), (64, 256)])
@pytest.mark.parametrize("page_size,num_heads,num_kv_heads,head_dim,dtype,window", [
    (16, 8, 2, 64, jnp.float32, None), (8, 16, 2, 64, jnp.bfloat16, 20), (32, 2, 2, 64, jnp.float32, 48),
])  # fmt: skip
def test_xla_query_tiles_match_the_reference(rows, block_rows, page_size, num_heads, num_kv_heads, head_dim, dtype,
                                             window, monkeypatch):  # fmt: skip
    """paged_attention_xla's query tiles of every size (a token a tile up to tiles wider than any
    sequence's chunk), in one block or several: the reference's attention on every token, 0 on
    padding tokens, over poisoned pages; `query_tile_rows` gives a decode-only step a tile a token
    and a long prompt alone the widest tiles."""
    from jaxllm.layers import attention

    q, k_pages, v_pages, batch, num_real = ragged_inputs(page_size, num_heads, num_kv_heads, head_dim, dtype, seed=2)
    monkeypatch.setattr(attention, "query_tile_rows", lambda *args: rows)
    monkeypatch.setattr(attention, "QUERY_BLOCK_ROWS", block_rows)
    out = xla_reference(q, k_pages, v_pages, batch, scale=head_dim**-0.5, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    metadata = (batch.query_start, batch.seq_lens, batch.block_tables)
    reference = ragged_paged_attention_reference(q, k_pages, v_pages, *metadata, max_query_len=batch.max_query_len,
                                                 scale=head_dim**-0.5, window=window)  # fmt: skip
    assert_close(out, reference, dtype, rows=slice(0, num_real))
    np.testing.assert_array_equal(np.asarray(out[num_real:], np.float32), 0.0)
    monkeypatch.undo()
    assert attention.query_tile_rows(256, 256, 256, 3) == attention.query_tile_rows(2048, 256, 1, 3) == 1
    assert attention.query_tile_rows(2048, 1, 2048, 3) == attention.QUERY_TILE_MAX_ROWS
    assert 1 < attention.query_tile_rows(2048, 256, 2048, 3) < attention.QUERY_TILE_MAX_ROWS


@pytest.mark.parametrize("decodes_apart", [True, False])
def test_backend_entry_dispatches_mixed_steps(decodes_apart, monkeypatch):
    """A mixed step through the backend's entry: its decodes with the prompt chunks in the ragged
    kernel or by the decode kernel (DECODES_APART), the same attention either way."""
    from jaxllm.layers import attention

    monkeypatch.setattr(attention, "DECODES_APART", [decodes_apart])
    q, k_pages, v_pages, batch, num_real = ragged_inputs(16, 8, 2, 64, jnp.float32, seed=1)
    out = paged_attention(q, k_pages, v_pages, batch, scale=0.125, window=64, interpret=INTERPRET)
    xla = xla_reference(q, k_pages, v_pages, batch, scale=0.125, window=64)
    assert_close(out, xla, jnp.float32, rows=slice(0, num_real))
    np.testing.assert_array_equal(np.asarray(out[num_real:]), 0.0)
    # skip_single_rows: the ragged kernel leaves exactly the decodes' rows zero
    metadata = (batch.query_start, batch.seq_lens, batch.block_tables)
    rest = ragged_paged_attention(q, k_pages, v_pages, *metadata, max_query_len=batch.max_query_len, scale=0.125,
                                  window=64, interpret=INTERPRET, skip_single_rows=True)  # fmt: skip
    lens = np.diff(np.asarray(batch.query_start))
    decode_rows = np.asarray(batch.query_start[:-1])[lens == 1]
    assert len(decode_rows) == 2
    np.testing.assert_array_equal(np.asarray(rest[decode_rows]), 0.0)
    others = np.setdiff1d(np.arange(num_real), decode_rows)
    np.testing.assert_array_equal(np.asarray(rest[others]), np.asarray(out[others]))


def pallas_grids(fn, *args) -> list[tuple[int, ...]]:
    """The grid of every pallas_call in fn's jaxpr, nested jaxprs included."""
    grids = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for value in eqn.params.values():
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    walk(value.jaxpr)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    walk(value)

    walk(jax.jit(fn).trace(*args).jaxpr.jaxpr)
    return grids


# A mixed step in the engine's shape, scaled down from Llama-3.1-8B's T = 8192, B = 256, Q = 4096:
# T = 128 tokens and B = 32 slots, Q = T; one 70-token chunk continuing a 40-token context, a dozen
# one-token decodes, and 19 padding slots (poisoned block tables, seq_lens 0).
MIXED_TOKENS, MIXED_SLOTS = 128, 32
MIXED_STARTS = [40] + [3 + 5 * i for i in range(12)]
MIXED_QUERY_LENS = [70] + [1] * 12


@pytest.mark.parametrize("block_q,window", [(None, None), (4, 24)])
def test_mixed_step_grid_follows_work_not_slots(block_q, window):
    page_size, num_heads, num_kv_heads, head_dim, dtype = 16, 8, 2, 64, jnp.float32
    rng = np.random.default_rng(2)
    order = rng.permutation(len(MIXED_STARTS))
    starts = [MIXED_STARTS[i] for i in order]
    query_lens = [MIXED_QUERY_LENS[i] for i in order]
    lens = [s + n for s, n in zip(starts, query_lens)]
    k_pages, v_pages, tables = make_cache(
        rng, lens + [0] * (MIXED_SLOTS - len(lens)), num_kv_heads=num_kv_heads, page_size=page_size,
        head_dim=head_dim, pages_per_seq=8, dtype=dtype,
    )
    batch = make_batch(
        starts, query_lens, tables, page_size=page_size, num_tokens=MIXED_TOKENS, max_query_len=MIXED_TOKENS
    )
    num_real = sum(query_lens)
    q = jnp.asarray(rng.normal(size=(MIXED_TOKENS, num_heads, head_dim)), dtype)
    metadata = (batch.query_start, batch.seq_lens, batch.block_tables)
    fn = functools.partial(
        ragged_paged_attention, max_query_len=batch.max_query_len, scale=0.125, window=window,
        block_q=block_q, interpret=INTERPRET,
    )

    rows = block_q or 32  # the default for 4 query heads per KV head: a 128-row tile
    num_items = num_work_items(MIXED_TOKENS, MIXED_SLOTS, MIXED_TOKENS, rows)
    assert num_items == (MIXED_TOKENS - MIXED_SLOTS) // rows + MIXED_SLOTS
    assert pallas_grids(fn, q, k_pages, v_pages, *metadata) == [(num_kv_heads, num_items)]
    assert num_items < MIXED_SLOTS * (MIXED_TOKENS // rows) / 3  # the old (K, B, Q / block_q) grid

    out = fn(q, k_pages, v_pages, *metadata)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out[num_real:]), 0.0)  # padding tokens
    reference = ragged_paged_attention_reference(
        q, k_pages, v_pages, *metadata, max_query_len=batch.max_query_len, scale=0.125, window=window
    )
    assert_close(out, reference, dtype)
    xla = xla_reference(q, k_pages, v_pages, batch, scale=0.125, window=window)
    assert_close(out, xla, dtype, rows=slice(0, num_real))


@pytest.mark.parametrize("seed", range(3))
def test_work_list_covers_every_block_once_longest_first(seed):
    rng = np.random.default_rng(seed)
    num_tokens, num_seqs, block_q, window = 200, 24, 8, 30
    query_lens = np.zeros(num_seqs, np.int32)
    used = rng.choice(num_seqs, size=10, replace=False)
    query_lens[used] = rng.multinomial(num_tokens - 10, np.ones(10) / 10) + 1
    seq_lens = query_lens + rng.integers(0, 50, num_seqs) * (query_lens > 0)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    num_items = num_work_items(num_tokens, num_seqs, num_tokens, block_q)
    work_seq, work_block = ragged_work_list(
        jnp.asarray(query_start), jnp.asarray(seq_lens, jnp.int32), num_items=num_items, block_q=block_q,
        window=window,
    )
    work_seq, work_block = np.asarray(work_seq), np.asarray(work_block)

    expected = {(b, i) for b in range(num_seqs) for i in range(-(-query_lens[b] // block_q))}
    valid = work_seq >= 0
    assert len(expected) <= num_items
    assert sorted(zip(work_seq[valid], work_block[valid])) == sorted(expected)
    assert valid[: len(expected)].all() and not valid[len(expected) :].any()  # padding items last
    first_pos = seq_lens[work_seq[valid]] - query_lens[work_seq[valid]] + work_block[valid] * block_q
    last_pos = np.minimum(first_pos + block_q, seq_lens[work_seq[valid]]) - 1
    keys = last_pos + 1 - np.maximum(first_pos - window + 1, 0)
    assert (np.diff(keys) <= 0).all()  # most keys first


def _args(num_seqs=2, dtype=jnp.float32):
    q = jnp.zeros((6, 8, 64), dtype)
    pages = jnp.zeros((2, 4, 16, 64), dtype)
    return (q, pages, pages, jnp.zeros((num_seqs + 1,), jnp.int32), jnp.zeros((2,), jnp.int32),
            jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (_args(num_seqs=3), dict(max_query_len=4), r"query_start must be int32 \[3\]"),
        (_args(), dict(max_query_len=0), "max_query_len must be a positive int"),
        (_args(), dict(max_query_len=4, block_q=3), "block_q 3 must be a power of two"),
        (_args(), dict(max_query_len=4, block_q=2), "block_q 2 must be a power of two"),
        (_args(), dict(max_query_len=4, window=-1), "window must be None or a positive int"),
    ],
)
def test_rejects_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(*args, scale=1.0, interpret=INTERPRET, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (8, 8, 64), (28, 4, 80), (8, 4, 256)])
def test_lowers_to_triton_for_h100(dtype, num_heads, num_kv_heads, head_dim):
    """The compiled path (Triton lowering, not the interpreter) accepts every tile the defaults pick."""
    q = jax.ShapeDtypeStruct((96, num_heads, head_dim), dtype)
    pages = jax.ShapeDtypeStruct((num_kv_heads, 64, 16, head_dim), dtype)
    query_start = jax.ShapeDtypeStruct((5,), jnp.int32)
    lens = jax.ShapeDtypeStruct((4,), jnp.int32)
    tables = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    fn = functools.partial(ragged_paged_attention, max_query_len=64, scale=0.1, window=40)
    text = lower_for_h100(fn, q, pages, pages, query_start, lens, tables)
    assert "__gpu$xla.gpu.triton" in text
