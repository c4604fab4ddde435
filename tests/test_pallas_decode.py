"""paged_decode_attention against its reference and against paged_attention_xla.

Interpret mode on the CPU; on a GPU the same tests run the compiled Triton kernel.
"""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.layers.attention import paged_attention_pallas as paged_attention
from pallas_kernels import paged_decode_attention, paged_decode_attention_reference
from tests.paged_kv import INTERPRET, assert_close, lower_for_h100, make_batch, make_cache, xla_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

LONG_CONTEXT = 333

# (page_size, num_heads, num_kv_heads, head_dim, dtype, window, pages_per_block, num_splits):
# every page size, GQA group 1/4/7/8, head_dim 64/128 and a non-power-of-two 80, both dtypes,
# window on and off, automatic and explicit tiling, one split (kernel normalises) and several.
CASES = [
    (16, 8, 2, 64, jnp.float32, None, None, None),
    (16, 8, 2, 128, jnp.bfloat16, 48, None, None),
    (32, 2, 2, 64, jnp.float32, 48, 1, 1),
    (32, 16, 2, 128, jnp.float32, None, 2, 3),
    (8, 16, 2, 64, jnp.bfloat16, None, 2, None),
    (8, 2, 2, 128, jnp.float32, 20, 4, 5),
    (16, 14, 2, 80, jnp.bfloat16, 100, None, 2),
]


def decode_inputs(page_size, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Context lengths 1, a page, a page plus one, long, and a padding slot (0), shuffled."""
    rng = np.random.default_rng(seed)
    lens = [1, page_size, page_size + 1, LONG_CONTEXT]
    order = rng.permutation(len(lens))
    lens = [lens[i] for i in order]
    pages_per_seq = -(-LONG_CONTEXT // page_size) + 2
    k_pages, v_pages, tables = make_cache(
        rng, lens + [0], num_kv_heads=num_kv_heads, page_size=page_size, head_dim=head_dim,
        pages_per_seq=pages_per_seq, dtype=dtype,
    )
    q = jnp.asarray(rng.normal(size=(len(lens) + 1, num_heads, head_dim)), dtype)
    batch = make_batch(
        [n - 1 for n in lens], [1] * len(lens), tables, page_size=page_size, num_tokens=len(lens) + 1,
        max_query_len=1,
    )
    return q, k_pages, v_pages, batch, len(lens)


@pytest.mark.parametrize("page_size,num_heads,num_kv_heads,head_dim,dtype,window,pages_per_block,num_splits", CASES)
def test_matches_reference_and_xla(
    page_size, num_heads, num_kv_heads, head_dim, dtype, window, pages_per_block, num_splits
):
    q, k_pages, v_pages, batch, num_real = decode_inputs(page_size, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = paged_decode_attention(
        q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=scale, window=window,
        pages_per_block=pages_per_block, num_splits=num_splits, interpret=INTERPRET,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(out[num_real:], np.float32), 0.0)  # the padding slot

    reference = paged_decode_attention_reference(
        q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=scale, window=window
    )
    assert_close(out, reference, dtype)
    xla = xla_reference(q, k_pages, v_pages, batch, scale=scale, window=window)
    assert_close(out, xla, dtype, rows=slice(0, num_real))


def test_backend_entry_dispatches_decode_steps():
    q, k_pages, v_pages, batch, num_real = decode_inputs(16, 8, 2, 64, jnp.float32, seed=1)
    out = paged_attention(q, k_pages, v_pages, batch, scale=0.125, window=None, interpret=INTERPRET)
    xla = xla_reference(q, k_pages, v_pages, batch, scale=0.125, window=None)
    assert_close(out, xla, jnp.float32, rows=slice(0, num_real))


def test_single_long_sequence_spread_over_splits():
    """B = 1: the automatic split count must break the block table into several splits."""
    rng = np.random.default_rng(2)
    k_pages, v_pages, tables = make_cache(
        rng, [LONG_CONTEXT], num_kv_heads=1, page_size=16, head_dim=64, pages_per_seq=24, dtype=jnp.float32
    )
    q = jnp.asarray(rng.normal(size=(1, 4, 64)), jnp.float32)
    lens = jnp.array([LONG_CONTEXT], jnp.int32)
    out = paged_decode_attention(
        q, k_pages, v_pages, jnp.asarray(tables), lens, scale=0.125, pages_per_block=1, interpret=INTERPRET
    )
    reference = paged_decode_attention_reference(q, k_pages, v_pages, jnp.asarray(tables), lens, scale=0.125)
    assert_close(out, reference, jnp.float32)


def _args(dtype=jnp.float32, page_size=16, num_heads=8, num_kv_heads=2, head_dim=64):
    q = jnp.zeros((2, num_heads, head_dim), dtype)
    pages = jnp.zeros((num_kv_heads, 4, page_size, head_dim), dtype)
    return q, pages, pages, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(page_size=12), "page_size 12 must be a power of two"),
        (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads 4"),
        (dict(dtype=jnp.int32), "dtype int32 is not supported"),
    ],
)
def test_rejects_bad_layouts(change, message):
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*_args(**change), scale=1.0, interpret=INTERPRET)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window=0), "window must be None or a positive int"),
        (dict(pages_per_block=3), "pages_per_block 3 must be a power of two"),
        (dict(pages_per_block=1, page_size=8), "must be at least 16"),
        (dict(num_splits=0), "num_splits must be a positive int"),
    ],
)
def test_rejects_bad_options(kwargs, message):
    page_size = kwargs.pop("page_size", 16)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*_args(page_size=page_size), scale=1.0, interpret=INTERPRET, **kwargs)


def test_rejects_bad_metadata():
    q, k_pages, v_pages, tables, lens = _args()
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        paged_decode_attention(q, k_pages, v_pages, tables, lens.astype(jnp.float32), scale=1.0)
    with pytest.raises(ValueError, match="q has 1 sequences but block_tables has 2 rows"):
        paged_decode_attention(q[:1], k_pages, v_pages, tables, lens, scale=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,num_splits", [(32, 8, 128, 1), (8, 8, 64, 4), (28, 4, 80, 2), (8, 4, 256, 3)]
)
def test_lowers_to_triton_for_h100(dtype, num_heads, num_kv_heads, head_dim, num_splits):
    """The compiled path (Triton lowering, not the interpreter) accepts every tile the defaults pick."""
    q = jax.ShapeDtypeStruct((4, num_heads, head_dim), dtype)
    pages = jax.ShapeDtypeStruct((num_kv_heads, 64, 16, head_dim), dtype)
    tables = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    lens = jax.ShapeDtypeStruct((4,), jnp.int32)
    fn = functools.partial(paged_decode_attention, scale=0.1, window=40, num_splits=num_splits)
    text = lower_for_h100(fn, q, pages, pages, tables, lens)
    # The attention kernel, and with several splits the kernel that merges them.
    assert text.count("__gpu$xla.gpu.triton") == (1 if num_splits == 1 else 2)


@pytest.mark.parametrize("splits,group,head_dim", [(18, 4, 128), (3, 7, 80), (1, 16, 64), (130, 8, 128)])
def test_combine_kernel_matches_jnp_combine(splits, group, head_dim):
    """The split-merging kernel against the plain-jnp merge: empty splits (l == 0, max at the mask
    value) weigh nothing, and a row no split saw comes out zero."""
    from pallas_kernels.paged_decode_attention import MASK_VALUE, combine_splits, combine_splits_kernel

    rng = np.random.default_rng(splits)
    shape = (3, 2, splits, group)
    m = rng.normal(size=shape).astype(np.float32) * 4
    l = rng.uniform(0.5, 3.0, size=shape).astype(np.float32)
    acc = rng.normal(size=(*shape, head_dim)).astype(np.float32)
    empty = rng.uniform(size=shape) < 0.3
    empty[0, 0] = True  # a (sequence, KV head) that saw no key in any split
    m[empty], l[empty], acc[empty] = MASK_VALUE, 0.0, 0.0
    want = combine_splits(*map(jnp.asarray, (acc, m, l)))
    for dtype in (jnp.float32, jnp.bfloat16):
        got = combine_splits_kernel(*map(jnp.asarray, (acc, m, l)), out_dtype=dtype, interpret=INTERPRET)
        assert got.dtype == dtype
        assert_close(got, want.astype(dtype), dtype)
    assert not np.asarray(got[0, 0]).any()


@pytest.mark.parametrize("splits,group,head_dim", [(18, 4, 128), (130, 8, 128), (3, 7, 80)])
def test_combine_kernel_lowers_to_triton_for_h100(splits, group, head_dim):
    """The merge in one or several passes (130 splits do not fit one tile) lowers to one Triton kernel."""
    from pallas_kernels.paged_decode_attention import combine_splits_kernel

    acc = jax.ShapeDtypeStruct((2, 4, splits, group, head_dim), jnp.float32)
    stats = jax.ShapeDtypeStruct((2, 4, splits, group), jnp.float32)
    text = lower_for_h100(functools.partial(combine_splits_kernel, out_dtype=jnp.bfloat16), acc, stats, stats)
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_a_short_sequence_in_a_wide_table_uses_every_split(monkeypatch):
    """The splits share a sequence's own pages, not the block table's width: 10 pages of keys in a
    table of 64 pages, over 4 splits of 1-page blocks, give every split a share (each split's
    softmax denominator is positive), and the output is the reference's. A sliding window's
    visible pages are shared the same way."""
    decode = importlib.import_module("pallas_kernels.paged_decode_attention")  # (the package exports the function)

    page_size, context = 16, 160  # 10 pages
    rng = np.random.default_rng(3)
    k_pages, v_pages, tables = make_cache(rng, [context], num_kv_heads=2, page_size=page_size, head_dim=64,
                                          pages_per_seq=64, dtype=jnp.float32)  # fmt: skip
    q = jnp.asarray(rng.normal(size=(1, 4, 64)), jnp.float32)
    lens, tables = jnp.array([context], jnp.int32), jnp.asarray(tables)
    combine = decode.combine_splits_kernel
    for window in (None, 100):  # a window of 100 keys: pages 3-9 visible
        seen = []
        monkeypatch.setattr(decode, "combine_splits_kernel",
                            lambda acc, m, l, **kw: seen.append(l) or combine(acc, m, l, **kw))  # fmt: skip
        out = decode._decode_call(q, k_pages, v_pages, tables, lens, scale=0.125, window=window, pages_per_block=1,
                                  num_splits=4, num_warps=4, num_stages=1, interpret=INTERPRET)  # fmt: skip
        [l] = seen
        assert l.shape[2] == 4 and bool((l > 0).all()), l[0, :, :, 0]
        reference = paged_decode_attention_reference(q, k_pages, v_pages, tables, lens, scale=0.125, window=window)
        assert_close(out, reference, jnp.float32)


def test_default_launch_gives_a_float8_cache_under_a_wide_batch_shorter_steps():
    """64 keys a step, 2 warps and 3 stages for an fp8 cache (or its bytes) under at least
    WIDE_PROGRAMS (sequence, KV head) programs; the usual 128 keys, 4 warps, 2 stages otherwise."""
    decode = importlib.import_module("pallas_kernels.paged_decode_attention")
    wide = decode.WIDE_PROGRAMS // 8
    for kv_dtype in (jnp.float8_e4m3fn, jnp.uint8):
        assert decode.default_launch(wide, 8, 32, 128, kv_dtype, jnp.bfloat16)[:3] == (2, 2, 3)
        assert decode.default_launch(wide // 2, 8, 32, 128, kv_dtype, jnp.bfloat16)[:3] == (4, 4, 2)
    assert decode.default_launch(wide, 8, 32, 128, jnp.bfloat16, jnp.bfloat16)[:3] == (4, 4, 2)
    assert decode.default_launch(wide, 8, 16, 128, jnp.uint8, jnp.bfloat16)[:3] == (4, 2, 3)


def test_a_wide_batch_over_fp8_pages_runs_its_dots_in_float16():
    """Once the batch fills the GPU (B * K > TARGET_PROGRAMS), K/V tiles of an fp8 cache under bf16
    queries are widened to float16 (the query clipped into its range), not bfloat16; the result
    is the reference's within bf16's tolerance. A narrow batch keeps q's dtype."""
    decode = importlib.import_module("pallas_kernels.paged_decode_attention")
    to_fp8 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint8)
    rng = np.random.default_rng(4)
    num_kv_heads = 4
    lens = [int(n) for n in rng.integers(1, 40, decode.TARGET_PROGRAMS // num_kv_heads + 1)]
    k_pages, v_pages, tables = make_cache(rng, lens, num_kv_heads=num_kv_heads, page_size=16, head_dim=64,
                                          pages_per_seq=3, dtype=jnp.float32)  # fmt: skip
    from jaxllm.layers.attention import FP8_KV, to_kv_dtype

    k8, v8 = to_kv_dtype(k_pages, FP8_KV), to_kv_dtype(v_pages, FP8_KV)
    q = jnp.asarray(rng.normal(size=(len(lens), 8, 64)), jnp.bfloat16)
    q = q.at[0, 0, 0].set(1e6)  # beyond float16's range: clipped, not inf
    tables, seq_lens = jnp.asarray(tables), jnp.asarray(lens, jnp.int32)
    call = functools.partial(decode._decode_call, scale=0.125, window=None, pages_per_block=1, num_splits=1,
                             num_warps=4, num_stages=2, interpret=INTERPRET)  # fmt: skip
    wide = jax.make_jaxpr(call)(q, to_fp8(k8), to_fp8(v8), tables, seq_lens)
    narrow = jax.make_jaxpr(call)(q[:2], to_fp8(k8), to_fp8(v8), tables[:2], seq_lens[:2])
    float16 = re.compile(r"(?<!b)f16\[")  # not bf16
    assert float16.search(str(wide)) and not float16.search(str(narrow))
    out = call(q, to_fp8(k8), to_fp8(v8), tables, seq_lens)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    reference = paged_decode_attention_reference(q, k8, v8, tables, seq_lens, scale=0.125)
    assert_close(out[1:], reference[1:], jnp.bfloat16)
