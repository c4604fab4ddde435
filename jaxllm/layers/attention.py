"""Paged attention: the KV cache layout, writes into it, and the plain-XLA attention over it.

Layout (shared by every backend, so `'xla'` is always the reference for `'pallas'`):
  k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim] per layer, in the KV cache's
  dtype: the model's, another float dtype, or float8 E4M3 (kv_cache_config.dtype='fp8'), which
  writes saturate into (`to_kv_dtype`) and every reader upcasts (float32 here, q's dtype in the
  Pallas kernels).
One (KV head, page) is a contiguous `page_size x head_dim` tile, so a kernel reads each page once
per KV head for all the query heads that share it (GQA). Page 0 is the null page (see batch.py).

`paged_attention_xla` handles ragged batches of prefill chunks and decodes alike: every query token
attends to the pages of its own sequence, causally by position, within an optional sliding window.
Its queries go in tiles of a sequence's consecutive tokens (one token a tile in a decode-only step),
each tile gathering its sequence's keys once for all its rows. It walks the block table in chunks of
pages with an online softmax, so memory stays bounded by tiles x chunk instead of tiles x context,
and it stops after the chunk holding the last position of the tiles it runs together (the batch's,
or a block's: a dynamic trip count), so a short batch costs little however large its block-table
bucket.

`paged_attention_pallas` is the same attention through the Pallas kernels (pallas_kernels/, which do
not import jaxllm): this module picks the decode or the ragged kernel from the step's BatchMetadata.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.config import KV_FP8_DTYPE
from jaxllm.layers.batch import BatchMetadata

MASK_VALUE = -1e30
# Keys per chunk of the XLA path's online softmax: small enough that a short context gathers
# little beyond what it needs, large enough that long contexts take few loop iterations.
XLA_CHUNK_KEYS = 256
# Query tiles of the XLA path (`query_tile_rows`): a tile's gather of a chunk of keys costs about as
# much as TILE_GATHER_ROWS / G query rows' dots with it (G query heads a KV head; fitted on this
# machine's 2 CPU cores, SmolLM2's 3: benchmarks/RESULTS.md, "Prompts on the CPU"); tiles of at most
# QUERY_TILE_MAX_ROWS rows, run in blocks of about QUERY_BLOCK_ROWS rows.
TILE_GATHER_ROWS = 16
QUERY_TILE_MAX_ROWS = 64
QUERY_BLOCK_ROWS = 256
# A float8 KV cache holds its bytes: uint8 pages are float8 E4M3 values (`kv_storage_dtype`).
FP8_KV, FP8_BYTES = jnp.dtype(KV_FP8_DTYPE), jnp.dtype(jnp.uint8)


def to_kv_dtype(x: jax.Array, dtype) -> jax.Array:
    """x in a KV cache's dtype, or its storage dtype (`kv_storage_dtype`). Into a float8 cache
    (E4M3: kv_cache_config.dtype='fp8') the cast saturates: values are clipped to the format's
    largest finite value (448) first, since E4M3FN has no infinity and an overflowing cast gives
    NaN, which would poison every later softmax over the page; into its bytes (uint8) the float8
    values are then reinterpreted. No scale is applied here: a model with calibrated per-layer K/V
    scales has K and V divided by them before the write (models/transformer.py `paged_layer`)."""
    dtype = jnp.dtype(dtype)
    if dtype in (FP8_KV, FP8_BYTES):
        limit = float(jnp.finfo(FP8_KV).max)
        x = jnp.minimum(jnp.maximum(x, -limit), limit).astype(FP8_KV)
        return jax.lax.bitcast_convert_type(x, FP8_BYTES) if dtype == FP8_BYTES else x
    return x.astype(dtype)


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's keys/values into their slots, cast to the pages' dtype (`to_kv_dtype`).

    k_pages, v_pages: [K, P, S, d]; k, v: [T, K, d]; slot_mapping: [T] (page * S + offset).
    """
    page_size = k_pages.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[:, pages, offsets].set(to_kv_dtype(k.swapaxes(0, 1), k_pages.dtype))
    v_pages = v_pages.at[:, pages, offsets].set(to_kv_dtype(v.swapaxes(0, 1), v_pages.dtype))
    return k_pages, v_pages


def kv_storage_dtype(kv_dtype):
    """The dtype a KV cache's arrays hold: the KV dtype, except that a float8 cache holds its bytes
    (uint8). XLA scatters and copies float8 arrays by widening them whole (on the CPU, a copy of
    every layer's pages at each step's write: decode 6x slower than bf16) where it updates uint8
    ones in place; the XLA attention and the runner reinterpret what they gather
    (`as_kv_values`), the Pallas kernels each tile they load (pallas_kernels/_tiles.py)."""
    return FP8_BYTES if jnp.dtype(kv_dtype) == FP8_KV else kv_dtype


def as_kv_values(x: jax.Array) -> jax.Array:
    """Pages (or a gathered part of them) as their KV dtype's values: uint8 bytes as float8 E4M3."""
    return jax.lax.bitcast_convert_type(x, FP8_KV) if x.dtype == FP8_BYTES else x


def gather_pages(pages_array: jax.Array, pages: jax.Array) -> jax.Array:
    """pages_array[:, pages] as float32 values."""
    return as_kv_values(pages_array[:, pages]).astype(jnp.float32)


def _online_softmax(chunk_scores: Callable, num_chunks: jax.Array, shape: tuple) -> jax.Array:
    """softmax(s) @ v over key chunks c < num_chunks, one at a time with running maxima and sums;
    chunk_scores(c) -> (scores [K, N, R, C], values [K, N, C, d]); shape: (K, N, R, d)."""

    def body(c, carry):
        m, l, acc = carry
        s, v = chunk_scores(c)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("knrc,kncd->knrd", p, v)
        return m_new, l, acc

    init = (jnp.full(shape[:3], MASK_VALUE, jnp.float32), jnp.zeros(shape[:3], jnp.float32),
            jnp.zeros(shape, jnp.float32))  # fmt: skip
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return acc / l[..., None]


def query_tile_rows(num_tokens: int, num_seqs: int, max_query_len: int, group: int) -> int:
    """Query tokens a tile of `paged_attention_xla` in a step of T tokens over B sequence slots (a
    power of two, at most QUERY_TILE_MAX_ROWS and max_query_len). A tile gathers its sequence's keys
    once for all its R rows and dots them with every row, an empty one too, so a one-token sequence
    (a decode) costs a gather and R rows, a prompt of n tokens n / R gathers and n rows. R is the best
    for the worst batch of the bucket, B - 1 decodes beside one prompt of the other T - B + 1 tokens:
    sqrt(TILE_GATHER_ROWS / G x (T - B) / (B - 1)) (G query heads a KV head). 1 where T <= B (with
    'xla', decode-only steps run in the T = B programs)."""
    if max_query_len <= 1 or num_tokens <= num_seqs:
        return 1
    best = math.sqrt(TILE_GATHER_ROWS / group * (num_tokens - num_seqs) / max(num_seqs - 1, 1))
    rows = 2 ** round(math.log2(max(best, 1.0)))
    return max(1, min(rows, QUERY_TILE_MAX_ROWS, 1 << (max_query_len.bit_length() - 1)))


def _query_tiles(batch: BatchMetadata, rows: int, num_tiles: int):
    """The step's query tiles of `rows` > 1 tokens, each from one sequence, `num_tiles` of them
    (enough for any batch of the bucket; those past the last are empty): (seq [N], tokens [N, rows]
    (packed indices; 0 where a tile has fewer), owned [N, rows] (whether a tile's row is a token), the
    number of tiles the step uses, and each packed token's (tile, row) as one flat index [T] into
    [N * rows]). A sequence's tokens fill ceil(its tokens / rows) tiles in order."""
    num_tokens, num_seqs = batch.token_seq.shape[0], batch.block_tables.shape[0]
    starts = batch.query_start[:-1]
    lens = batch.query_start[1:] - starts
    ends = jnp.cumsum((lens + rows - 1) // rows)  # [B] each sequence's tiles end here
    first_tile = ends - (lens + rows - 1) // rows
    tile = jnp.arange(num_tiles)
    seq = jnp.minimum(jnp.sum(ends[None, :] <= tile[:, None], axis=1), num_seqs - 1)
    offset = (tile - first_tile[seq]) * rows  # the tile's first token within its sequence
    row = jnp.arange(rows)[None, :]
    owned = (tile[:, None] < ends[-1]) & (offset[:, None] + row < lens[seq][:, None])
    tokens = jnp.where(owned, starts[seq][:, None] + offset[:, None] + row, 0)
    within = jnp.arange(num_tokens) - starts[batch.token_seq]
    flat = (first_tile[batch.token_seq] + within // rows) * rows + within % rows
    return seq, tokens, owned, ends[-1], jnp.clip(flat, 0, num_tiles * rows - 1)


def _attend(qg: jax.Array, pos: jax.Array, tables: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
            chunk_pages: int, window: int | None) -> jax.Array:  # fmt: skip
    """softmax(q k^T) v of query tiles qg [K, n, r, d] (scaled, float32), their rows at positions pos
    [n, r or 1] (-1: sees no key), each tile over its sequence's block table, tables [n, chunks x
    chunk_pages], a chunk of pages at a time up to the chunk of the last position. The KV head and
    the tile lead every operand, as they lead the gathered keys and values ([K, n, C, d]), so the
    dots read those as they are gathered."""
    num_kv_heads, n, _, head_dim = qg.shape
    chunk_keys = chunk_pages * k_pages.shape[2]
    num_chunks = tables.shape[1] // chunk_pages
    pos = pos[:, :, None]

    def chunk_scores(c):
        pages = jax.lax.dynamic_slice_in_dim(tables, c * chunk_pages, chunk_pages, axis=1)  # [n, C]
        k = gather_pages(k_pages, pages).reshape(num_kv_heads, n, chunk_keys, head_dim)  # float32
        v = gather_pages(v_pages, pages).reshape(num_kv_heads, n, chunk_keys, head_dim)
        k_pos = c * chunk_keys + jnp.arange(chunk_keys)[None, None, :]  # [1, 1, C*S]
        valid = k_pos <= pos
        if window is not None:
            valid = valid & (k_pos > pos - window)
        s = jnp.einsum("knrd,kncd->knrc", qg, k)
        return jnp.where(valid[None], s, MASK_VALUE), v

    if num_chunks == 1:
        s, v = chunk_scores(0)
        return jnp.einsum("knrc,kncd->knrd", jax.nn.softmax(s, axis=-1), v)
    last_chunk = jnp.max(pos) // chunk_keys  # chunks past every query are all masked
    return _online_softmax(chunk_scores, jnp.clip(last_chunk + 1, 1, num_chunks), qg.shape)


def paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    batch: BatchMetadata,
    *,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Ragged paged attention in plain jnp.

    The queries go in tiles of R consecutive tokens of one sequence (`query_tile_rows`), each tile
    gathering its sequence's keys and values once for all its rows. With R = 1 (a decode-only step,
    or any step of no more tokens than sequence slots) every token is a tile and all run at once;
    with R > 1 the tiles run in blocks of about QUERY_BLOCK_ROWS rows, only as many blocks as the
    step has tiles (a dynamic trip count), each block walking the chunks up to its own last position,
    so an early block of a long prompt stops early.

    Args:
      q: [T, H, d] queries, H a multiple of the KV heads K.
      k_pages, v_pages: [K, P, S, d], already holding this step's keys and values.
      batch: token -> sequence map, positions and block tables.
      scale: softmax scale.
      window: sliding window (keys with position > query position - window), or None.
    Returns:
      [T, H, d] in q's dtype; 0 for padding tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    num_seqs, pages_per_seq = batch.block_tables.shape
    chunk_pages = max(1, min(pages_per_seq, XLA_CHUNK_KEYS // page_size))
    num_chunks = -(-pages_per_seq // chunk_pages)
    tables = jnp.pad(batch.block_tables, ((0, 0), (0, num_chunks * chunk_pages - pages_per_seq)))
    qs = q.astype(jnp.float32) * scale
    rows = query_tile_rows(num_tokens, num_seqs, batch.max_query_len, group)
    if rows == 1:
        qg = qs.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
        out = _attend(qg, batch.positions[:, None], tables[batch.token_seq], k_pages, v_pages, chunk_pages, window)
    else:
        max_tiles = (num_tokens + num_seqs * (rows - 1)) // rows  # sum of ceil(n_b / R) over the sequences
        block = max(1, min(max_tiles, QUERY_BLOCK_ROWS // rows))  # tiles a block
        num_tiles = -(-max_tiles // block) * block
        seq, tokens, owned, used, flat = _query_tiles(batch, rows, num_tiles)
        qg = qs[tokens].reshape(num_tiles, rows, num_kv_heads, group, head_dim).transpose(2, 0, 1, 3, 4)
        qg = qg.reshape(num_kv_heads, num_tiles, rows * group, head_dim)
        row_pos = jnp.repeat(jnp.where(owned, batch.positions[tokens], -1), group, axis=1)  # [N, R * G]
        tile_tables = tables[seq]

        def one_block(b, out):
            blocks = [jax.lax.dynamic_slice_in_dim(x, b * block, block, axis=axis)
                      for x, axis in ((qg, 1), (row_pos, 0), (tile_tables, 0))]  # fmt: skip
            o = _attend(*blocks, k_pages, v_pages, chunk_pages, window)
            return jax.lax.dynamic_update_slice_in_dim(out, o, b * block, axis=1)

        out = jax.lax.fori_loop(0, -(-used // block), one_block, jnp.zeros(qg.shape, jnp.float32))
        out = out.reshape(num_kv_heads, num_tiles * rows, group, head_dim)[:, flat]  # back to the packed tokens
    out = jnp.where((jnp.arange(num_tokens) < batch.query_start[-1])[None, :, None, None], out, 0.0)
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


AttentionFn = Callable[..., jax.Array]
KVWriteFn = Callable[..., tuple[jax.Array, jax.Array]]
RopeKVWriteFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]

BACKENDS: dict[str, AttentionFn] = {"xla": paged_attention_xla}
# How each backend writes a step's K/V into the cache (same signature and result as `write_kv`).
KV_WRITERS: dict[str, KVWriteFn] = {"xla": write_kv}
# Backends that also apply the rotary embedding in their write (pallas_kernels.rope_write_kv_kernel's
# signature and result): the model hands them q and k unrotated and the step's cos / sin tables, or
# (keyword qkv, q, k and v None) a fused QKV projection's output to read them from.
ROPE_KV_WRITERS: dict[str, RopeKVWriteFn] = {}
# Whether a backend's rotating write is used (backends not named here: yes): a switch, so the
# benchmarks can time it against the XLA rotation it replaces (gpu_e2e.py / realistic_load.py
# --rope-in-kv-write on|off). On an H100 (benchmarks/RESULTS.md, "The rotary embedding inside the
# K/V write") it cut the 8B shape's TTFT of 2,048 tokens 59.0 -> 53.6 ms and left decode as it was;
# 'pallas' with it gave the same greedy tokens as 'xla'.
ROPE_IN_KV_WRITE: dict[str, bool] = {"pallas": True}


def register_backend(name: str, fn: AttentionFn, write: KVWriteFn = write_kv,
                     rope_write: RopeKVWriteFn | None = None) -> None:  # fmt: skip
    BACKENDS[name] = fn
    KV_WRITERS[name] = write
    if rope_write is not None:
        ROPE_KV_WRITERS[name] = rope_write


def paged_attention_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    batch: BatchMetadata,
    *,
    scale: float,
    window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`paged_attention_xla` through the Pallas kernels (pallas_kernels/): a decode-only step
    (batch.max_query_len == 1) goes to the split-K decode kernel; in any other step the sequences
    of several rows (prompt chunks) go to the ragged kernel, and those of one row (decodes) with
    them or, with DECODES_APART, to the decode kernel.

    Args:
      q: [T, H, d] queries, H a multiple of the KV heads K.
      k_pages, v_pages: [K, P, S, d], already holding this step's keys and values.
      batch: token -> sequence map and block tables. When batch.max_query_len == 1 the step is
        decode-only: T must equal the number of sequence slots and token i belongs to slot i.
      scale: softmax scale.
      window: sliding window (keys with position > query position - window), or None.
      interpret: run the kernels in the Pallas interpreter (CPU).
    Returns:
      [T, H, d] in q's dtype; padding tokens and padding sequence slots give zeros.
    """
    from pallas_kernels import paged_decode_attention, ragged_paged_attention

    if batch.max_query_len == 1:
        if q.shape[0] != batch.num_seqs:
            raise ValueError(
                f"a decode-only step (max_query_len 1) needs one token per sequence slot; "
                f"got {q.shape[0]} tokens for {batch.num_seqs} slots"
            )
        return paged_decode_attention(
            q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=scale, window=window,
            interpret=interpret,
        )
    out = ragged_paged_attention(
        q, k_pages, v_pages, batch.query_start, batch.seq_lens, batch.block_tables,
        max_query_len=batch.max_query_len, scale=scale, window=window, interpret=interpret,
        skip_single_rows=DECODES_APART[0],
    )
    if not DECODES_APART[0]:
        return out
    # The one-row sequences' rows, gathered one per sequence slot (another slot's zero length
    # makes the decode kernel write zeros for it), attended to and added into their rows (which
    # the ragged kernel left zero; the other slots add zeros).
    q_lens = batch.query_start[1:] - batch.query_start[:-1]
    rows = jnp.minimum(batch.query_start[:-1], q.shape[0] - 1)
    single = q_lens == 1
    decoded = paged_decode_attention(
        q[rows], k_pages, v_pages, batch.block_tables, jnp.where(single, batch.seq_lens, 0), scale=scale,
        window=window, interpret=interpret,
    )  # fmt: skip
    return out.at[rows].add(jnp.where(single[:, None, None], decoded, 0).astype(out.dtype))


# Whether the Pallas backend computes a mixed step's decodes with the decode kernel (True) or in
# the ragged kernel with the prompt chunks (False); a one-element list, set before programs are made
# (the program cache's key holds it: engine/executables.py). On since timed (H100, FP8 Llama-3.1-8B
# shape, RESULTS.md 2026-12-06): one layer of a 128/128 mixed step 2,032 -> 855 us (FP8 cache),
# 1,847 -> 1,159 us (bf16); end to end 128/128 x 16,384 22,760 -> 24,605 tok/s. Side by side:
# benchmarks/mixed_attention.py, gpu_e2e.py --decodes-apart on|off.
DECODES_APART = [True]


def _pallas_write_kv(k_pages, v_pages, k, v, slot_mapping, interpret=False):
    """Both caches written by one Pallas kernel (pallas_kernels/kv_write.py), in place."""
    from pallas_kernels.kv_write import write_kv_kernel

    return write_kv_kernel(k_pages, v_pages, k, v, slot_mapping, interpret=interpret)


def _pallas_rope_write_kv(k_pages, v_pages, q, k, v, cos, sin, slot_mapping, qkv=None, interpret=False):
    """q and k rotated and both caches written by one Pallas kernel (pallas_kernels/kv_write.py);
    with `qkv` (the fused projection's output [T, K, G + 2, d]; q, k, v None) read from it."""
    from pallas_kernels.kv_write import rope_write_kv_kernel

    return rope_write_kv_kernel(k_pages, v_pages, q, k, v, cos, sin, slot_mapping, qkv=qkv, interpret=interpret)


register_backend("pallas", paged_attention_pallas, _pallas_write_kv, _pallas_rope_write_kv)
register_backend("pallas_interpret", functools.partial(paged_attention_pallas, interpret=True),
                 functools.partial(_pallas_write_kv, interpret=True),
                 functools.partial(_pallas_rope_write_kv, interpret=True))  # fmt: skip


def get_backend(name: str) -> AttentionFn:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def get_kv_writer(name: str) -> KVWriteFn:
    """The K/V cache write of backend `name` (checked by get_backend)."""
    get_backend(name)
    return KV_WRITERS[name]


def get_rope_kv_writer(name: str) -> RopeKVWriteFn | None:
    """Backend `name`'s K/V write that also rotates q and k, or None where it has none or it is
    switched off (ROPE_IN_KV_WRITE)."""
    get_backend(name)
    return ROPE_KV_WRITERS.get(name) if ROPE_IN_KV_WRITE.get(name, True) else None
