"""Decode attention over the paged KV cache: one query token per sequence, split over pages.

Layout as in `jaxllm.layers.attention`: k_pages, v_pages [K, P, S, d]; sequence b's keys live in
pages block_tables[b, :], its query token sits at position seq_lens[b] - 1.

One program handles one (KV head, sequence, split): all H // K query heads that share the KV head
(GQA), so every K/V page is read from memory once per KV head. A split is a contiguous run of the
sequence's own visible pages, an equal share of them in whole blocks (flash-decoding; the number
of splits is static, the share is computed from the sequence's length, so a sequence far shorter
than the block table's width still uses every split); each split writes a partial (max, sum,
unnormalised output) and a second small kernel (`combine_splits_kernel`) merges them, so a single
long sequence still spreads over all the GPU's SMs. With one split the kernel normalises and writes
the final output itself.

The kernel lowers with Pallas's Triton backend: every loaded tile has power-of-two dimensions
(query heads padded to at least 16 rows for tl.dot, head_dim padded with masks), pages are
gathered through int32 row indices into the flattened page pool, and softmax runs in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._tiles import (
    KV_ONLY_DTYPES,
    LOG2_E,
    MASK_VALUE,
    MIN_DOT_DIM,
    dot_precision,
    fit_block_keys,
    kv_compute_dtype,
    kv_values,
    load_rows,
    pow2_divisor,
    to_compute,
    validate_paged_inputs,
    validate_tiling,
)

# About two waves of programs on an H100 (132 SMs): the automatic split count aims for this many.
TARGET_PROGRAMS = 264
# Keys per inner-loop step when pages_per_block is not given, before the shared-memory fit.
DEFAULT_BLOCK_KEYS = 128
# A float8 cache under a wide batch (at least WIDE_PROGRAMS (sequence, KV head) programs: 1,024
# sequences of 8 KV heads) gets shorter steps and fewer warps: each program's few keys (a wide
# batch's contexts are short, the cache holding batch x context) are then spread over more programs
# at once. H100, Llama-3.1-8B heads, page 32: 2,048 x 160 452 -> 337 us, 1,024 x 192 253 -> 204,
# 1,024 x 768 675 -> 630; 512 x 1,152 lost with it, and a bf16 cache gained nothing
# (benchmarks/RESULTS.md, "Decode attention over an FP8 cache").
WIDE_PROGRAMS = 8192
WIDE_FP8_BLOCK_KEYS, WIDE_FP8_WARPS, WIDE_FP8_STAGES = 64, 2, 3


def _decode_kernel(
    q_ref,  # [G, d]: the query heads of this KV head, for this sequence
    k_ref,  # [P * S, d]: this KV head's page pool, one row per slot
    v_ref,  # [P * S, d]
    block_table_ref,  # [max_pages]: this sequence's page ids
    seq_len_ref,  # [1]
    *out_refs,  # final: o [G, d]; partial: acc [G, d] f32, max [G] f32 (log2 units), sum [G] f32
    page_size: int,
    pages_per_block: int,
    num_splits: int,
    group_block: int,
    head_block: int,
    scale: float,
    window: int | None,
    final: bool,
    compute_dtype,
):
    group, head_dim = q_ref.shape
    block_keys = pages_per_block * page_size
    # A float8 cache (or its bytes): each loaded K/V tile is upcast to `compute` before the dots.
    compute = jnp.dtype(compute_dtype)
    precision = dot_precision(compute)
    upcast = (lambda x: kv_values(x).astype(compute)) if k_ref.dtype != compute else (lambda x: x)
    split = pl.program_id(2)

    head_ok = jnp.arange(group_block) < group
    # Masks on head_dim only where it is padded to a power of two (a static choice).
    dim_ok = (jnp.arange(head_block) < head_dim)[None, :] if head_block != head_dim else None
    q_mask = head_ok[:, None] if dim_ok is None else head_ok[:, None] & dim_ok
    q = plgpu.load(q_ref.at[pl.ds(0, group_block), pl.ds(0, head_block)], mask=q_mask, other=0.0)
    q = to_compute(q, compute)

    # The visible keys are [first_key, seq_len), on pages [first_page, end_page). The splits share
    # those pages, not the block table's width: split s owns pages [lo_page, hi_page), the s-th run
    # of `split_pages` (a whole number of blocks), so a sequence much shorter than the table still
    # spreads over every split rather than filling the first one alone.
    seq_len = seq_len_ref[0]
    first_key = 0 if window is None else jnp.maximum(seq_len - window, 0)
    first_page = lax.div(first_key, page_size)
    end_page = lax.div(seq_len + page_size - 1, page_size)
    span = jnp.maximum(end_page - first_page, 0)
    blocks_per_split = lax.div(lax.div(span + num_splits - 1, num_splits) + pages_per_block - 1, pages_per_block)
    split_pages = blocks_per_split * pages_per_block
    lo_page = first_page + split * split_pages
    hi_page = jnp.minimum(lo_page + split_pages, end_page)
    num_blocks = lax.div(jnp.maximum(hi_page - lo_page, 0) + pages_per_block - 1, pages_per_block)

    slot_in_page = jnp.arange(page_size)
    dims = jnp.arange(head_block)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        start_page = lo_page + i * pages_per_block
        table_pos = start_page + jnp.arange(pages_per_block)  # [ppb]
        page_ok = table_pos < hi_page
        page_ids = plgpu.load(block_table_ref.at[pl.ds(start_page, pages_per_block)], mask=page_ok, other=0)
        rows = (page_ids[:, None] * page_size + slot_in_page[None, :]).reshape(block_keys)
        key_pos = (table_pos[:, None] * page_size + slot_in_page[None, :]).reshape(block_keys)
        row_ok = jnp.broadcast_to(page_ok[:, None], (pages_per_block, page_size)).reshape(block_keys)
        key_ok = row_ok & (key_pos < seq_len) & (key_pos >= first_key)
        kv_mask = row_ok[:, None] if dim_ok is None else row_ok[:, None] & dim_ok

        k = upcast(load_rows(k_ref, rows, dims, kv_mask))  # [Bk, d]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2_E)  # [G, Bk]
        s = jnp.where(key_ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = alpha * l_prev + p.sum(axis=-1)
        v = upcast(load_rows(v_ref, rows, dims, kv_mask))
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l_new

    init = (
        jnp.zeros((group_block, head_block), jnp.float32),
        jnp.full((group_block,), MASK_VALUE, jnp.float32),
        jnp.zeros((group_block,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)

    if final:
        [o_ref] = out_refs
        # A padding sequence (seq_len 0) has l == 0: write zeros rather than 0/0.
        out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
        plgpu.store(o_ref.at[pl.ds(0, group_block), pl.ds(0, head_block)], out.astype(o_ref.dtype), mask=q_mask)
    else:
        acc_ref, m_ref, l_ref = out_refs
        plgpu.store(acc_ref.at[pl.ds(0, group_block), pl.ds(0, head_block)], acc, mask=q_mask)
        plgpu.store(m_ref.at[pl.ds(0, group_block)], m, mask=head_ok)
        plgpu.store(l_ref.at[pl.ds(0, group_block)], l, mask=head_ok)


def _decode_call(
    q, k_pages, v_pages, block_tables, seq_lens, *, scale, window, pages_per_block, num_splits,
    num_warps, num_stages, interpret,
):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    pages_per_seq = block_tables.shape[1]
    # Drop splits that a sequence as long as the table would leave empty.
    num_splits = pl.cdiv(pages_per_seq, pl.cdiv(pl.cdiv(pages_per_seq, num_splits), pages_per_block) * pages_per_block)
    final = num_splits == 1
    # Over a float8 cache the dots run in float16 (_tiles.kv_compute_dtype) once the batch alone
    # fills the GPU; a narrower one keeps q's dtype (H100, 1 x 2,048 tokens: 39 us a layer in bf16,
    # 54 in float16; benchmarks/RESULTS.md, "Decode attention over an FP8 cache").
    compute_dtype = kv_compute_dtype(q.dtype, k_pages.dtype) if num_seqs * num_kv_heads > TARGET_PROGRAMS else q.dtype

    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)  # head h = kv_head * G + g
    k_rows = k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    v_rows = v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)

    kernel = functools.partial(
        _decode_kernel,
        page_size=page_size,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        group_block=max(MIN_DOT_DIM, pl.next_power_of_2(group)),
        head_block=max(MIN_DOT_DIM, pl.next_power_of_2(head_dim)),
        scale=scale,
        window=window,
        final=final,
        compute_dtype=jnp.dtype(compute_dtype).name,
    )
    grid = (num_kv_heads, num_seqs, num_splits)
    in_specs = [
        # q: the G query heads of KV head h for sequence b.
        pl.BlockSpec((None, None, group, head_dim), lambda h, b, s: (b, h, 0, 0)),
        # k, v: KV head h's whole page pool; the kernel gathers the pages it needs.
        pl.BlockSpec((None, num_pages * page_size, head_dim), lambda h, b, s: (h, 0, 0)),
        pl.BlockSpec((None, num_pages * page_size, head_dim), lambda h, b, s: (h, 0, 0)),
        # block_tables: sequence b's row; the split picks its own range of it.
        pl.BlockSpec((None, pages_per_seq), lambda h, b, s: (b, 0)),
        # seq_lens: sequence b's length.
        pl.BlockSpec((1,), lambda h, b, s: (b,)),
    ]
    if final:
        # o: the finished output of (b, h), in q's dtype.
        out_specs = pl.BlockSpec((None, None, group, head_dim), lambda h, b, s: (b, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct(q4.shape, q.dtype)
    else:
        out_specs = [
            # acc: unnormalised float32 output of split s.
            pl.BlockSpec((None, None, None, group, head_dim), lambda h, b, s: (b, h, s, 0, 0)),
            # max, sum: the split's running softmax max (log2 units) and denominator.
            pl.BlockSpec((None, None, None, group), lambda h, b, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, group), lambda h, b, s: (b, h, s, 0)),
        ]
        partial_shape = (num_seqs, num_kv_heads, num_splits, group)
        out_shape = [
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_s{page_size}_p{pages_per_block}_x{num_splits}",
    )(q4, k_rows, v_rows, block_tables, seq_lens)

    if final:
        return outs.reshape(q.shape)
    acc, m, l = outs
    return combine_splits_kernel(acc, m, l, out_dtype=q.dtype, interpret=interpret).reshape(q.shape)


# Elements of the [splits, G, d-chunk] partial-output tile one merging program holds in registers
# (64 float32 a thread at 4 warps); more splits than fit are merged in several passes.
COMBINE_TILE_ELEMENTS = 8192
# Head-dim columns per merging program: a d = 128 merge spreads over four programs per (sequence,
# KV head), so a batch-1 step's merge is 4x more programs than (sequence, KV head) pairs.
COMBINE_DIM_BLOCK = 32


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref, *, split_block: int, group_block: int, dim_block: int):
    """One (sequence, KV head, dim_block columns of head_dim): merge the splits' partial softmaxes
    into the normalised output.

    acc_ref [splits, G, d] float32, m_ref / l_ref [splits, G] float32 (max in log2 units, sum),
    o_ref [G, d]. Every split's statistics and [G, dim_block] partial outputs are loaded at once,
    split_block splits at a time (one pass unless the splits outnumber what the registers hold),
    so the loads overlap instead of waiting on each other. dim_block divides d: only the padded
    query heads and splits are masked.
    """
    splits, group, _ = acc_ref.shape
    dims = pl.ds(pl.program_id(2) * dim_block, dim_block)
    heads = pl.ds(0, group_block)
    head_ok = jnp.arange(group_block) < group
    passes = []
    for start in range(0, splits, split_block):
        # A last pass that would run past the splits starts earlier and masks what it repeats.
        base = start if split_block >= splits else min(start, splits - split_block)
        index = base + jnp.arange(split_block)
        ok = ((index >= start) & (index < splits))[:, None] & head_ok[None, :]  # [S, G]
        rows = pl.ds(base, split_block)
        m = plgpu.load(m_ref.at[rows, heads], mask=ok, other=MASK_VALUE)
        l = plgpu.load(l_ref.at[rows, heads], mask=ok, other=0.0)
        passes.append((rows, ok, m, l))
    m_all = functools.reduce(jnp.maximum, [m.max(axis=0) for _, _, m, _ in passes])  # [G]
    l_all = jnp.zeros((group_block,), jnp.float32)
    acc = jnp.zeros((group_block, dim_block), jnp.float32)
    for rows, ok, m, l in passes:
        w = jnp.exp2(m - m_all[None, :])  # [S, G]; an empty split has l == 0 and acc == 0: it adds nothing
        l_all += (w * l).sum(axis=0)
        tile_ok = jnp.broadcast_to(ok[:, :, None], (*ok.shape, dim_block))
        part = plgpu.load(acc_ref.at[rows, heads, dims], mask=tile_ok, other=0.0)  # [S, G, dim_block]
        acc += (w[:, :, None] * part).sum(axis=0)
    out = acc / jnp.where(l_all > 0.0, l_all, 1.0)[:, None]
    plgpu.store(o_ref.at[heads, dims], out.astype(o_ref.dtype), mask=jnp.broadcast_to(head_ok[:, None], out.shape))


def combine_splits_kernel(acc: jax.Array, m: jax.Array, l: jax.Array, *, out_dtype, interpret: bool = False) -> jax.Array:
    """`combine_splits` as one Pallas kernel, cast to `out_dtype` (XLA makes several small kernels of
    the jnp version, one launch each, per layer of every decode step). Same arguments and result."""
    num_seqs, num_kv_heads, splits, group, head_dim = acc.shape
    group_block = pl.next_power_of_2(group)
    dim_block = pow2_divisor(head_dim, COMBINE_DIM_BLOCK)
    split_block = min(pl.next_power_of_2(splits), max(1, COMBINE_TILE_ELEMENTS // (group_block * dim_block)))
    kernel = functools.partial(_combine_kernel, split_block=split_block, group_block=group_block, dim_block=dim_block)
    return pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, head_dim // dim_block),
        in_specs=[
            pl.BlockSpec((None, None, splits, group, head_dim), lambda b, h, c: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, splits, group), lambda b, h, c: (b, h, 0, 0)),
            pl.BlockSpec((None, None, splits, group), lambda b, h, c: (b, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, group, head_dim), lambda b, h, c: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_seqs, num_kv_heads, group, head_dim), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"paged_decode_combine_x{splits}",
    )(acc, m, l)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge per-split partial softmaxes (flash-decoding's second step); the plain-jnp reference
    of `combine_splits_kernel`.

    acc: [B, K, splits, G, d] unnormalised outputs; m, l: [B, K, splits, G] running max (log2
    units) and denominator. Returns [B, K, G, d] float32; rows that saw no key come out zero.
    """
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)  # [B, K, splits, G]; empty splits have l == 0 and add nothing
    l_all = (w * l).sum(axis=2)
    acc_all = (w[..., None] * acc).sum(axis=2)
    return acc_all / jnp.where(l_all > 0.0, l_all, 1.0)[..., None]


def default_pages_per_block(page_size: int, *, num_stages: int, head_dim: int, itemsize: int,
                            compute_itemsize: int | None = None,
                            block_keys: int = DEFAULT_BLOCK_KEYS) -> int:  # fmt: skip
    """itemsize: the pages'; compute_itemsize: q's where it differs (a float8 cache); block_keys:
    the keys a step aimed for, before the shared-memory fit."""
    block_keys = fit_block_keys(
        block_keys, num_stages=num_stages, query_rows=MIN_DOT_DIM, head_dim=head_dim, itemsize=itemsize,
        compute_itemsize=compute_itemsize,
    )
    return max(1, block_keys // page_size, pl.cdiv(MIN_DOT_DIM, page_size))


def default_launch(num_seqs: int, num_kv_heads: int, page_size: int, head_dim: int, kv_dtype, q_dtype):
    """(pages_per_block, num_warps, num_stages, keys a step aimed for) where the caller gives none:
    128 keys a step (fewer where shared memory would overflow), 4 warps, 2 stages; a float8 cache
    under at least WIDE_PROGRAMS (sequence, KV head) programs: 64 keys, 2 warps, 3 stages."""
    kv_dtype = jnp.dtype(kv_dtype)
    wide_fp8 = kv_dtype in KV_ONLY_DTYPES and num_seqs * num_kv_heads >= WIDE_PROGRAMS
    block_keys, num_warps, num_stages = ((WIDE_FP8_BLOCK_KEYS, WIDE_FP8_WARPS, WIDE_FP8_STAGES) if wide_fp8
                                         else (DEFAULT_BLOCK_KEYS, 4, 2))  # fmt: skip
    pages_per_block = default_pages_per_block(
        page_size, num_stages=num_stages, head_dim=head_dim, itemsize=kv_dtype.itemsize,
        compute_itemsize=jnp.dtype(q_dtype).itemsize, block_keys=block_keys,
    )
    return pages_per_block, num_warps, num_stages, block_keys


def default_num_splits(num_seqs: int, num_kv_heads: int, pages_per_seq: int, pages_per_block: int,
                       target_programs: int = TARGET_PROGRAMS) -> int:  # fmt: skip
    """Enough splits that the grid fills the GPU (about `target_programs` programs), never more than
    there are page blocks."""
    wanted = pl.cdiv(target_programs, num_seqs * num_kv_heads)
    return max(1, min(wanted, pl.cdiv(pages_per_seq, pages_per_block)))


@functools.partial(
    jax.jit,
    static_argnames=["scale", "window", "pages_per_block", "num_splits", "num_warps", "num_stages", "interpret"],
)
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention: one query token per sequence over its KV pages (GQA-aware, split-K).

    Args:
      q: [B, H, d] the query token of each sequence (float32, bfloat16 or float16).
      k_pages, v_pages: [K, P, S, d] in q's dtype, or float8_e4m3fn (each tile upcast in the
        kernel: to float16 under a bf16 q once B * K exceeds TARGET_PROGRAMS, else to q's dtype);
        H a multiple of K, S a power of two.
      block_tables: [B, max_pages] int32 page ids, each in [0, P) (pad with the null page 0).
      seq_lens: [B] int32 context lengths including this token, at most max_pages * S; 0 marks a
        padding slot, whose output is zeros.
      scale: softmax scale (static).
      window: sliding window or None: keys at positions > seq_len - 1 - window are visible.
      pages_per_block: pages per inner-loop step (power of two, times S at least 16); default
        (`default_launch`) 128 keys' worth, fewer where float32 or a wide head would overflow
        shared memory, 64 for a float8 cache under a wide batch.
      num_splits: splits of each sequence's visible pages (flash-decoding), at most one a block of
        the table's width; default fills about two waves of an H100 from B * K programs.
      num_warps, num_stages: Triton launch parameters (default 4 warps, 2 stages; a float8 cache
        under a wide batch: 2 warps, 3 stages; `default_launch`).
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      [B, H, d] in q's dtype.
    """
    validate_paged_inputs(q, k_pages, v_pages, block_tables, seq_lens, window=window)
    if q.shape[0] != block_tables.shape[0]:
        raise ValueError(f"q has {q.shape[0]} sequences but block_tables has {block_tables.shape[0]} rows")
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    ppb, warps, stages, block_keys = default_launch(q.shape[0], num_kv_heads, page_size, head_dim, k_pages.dtype,
                                                    q.dtype)  # fmt: skip
    num_stages = stages if num_stages is None else num_stages
    num_warps = warps if num_warps is None else num_warps
    if pages_per_block is None:  # refitted to shared memory when the caller's stages differ
        pages_per_block = ppb if num_stages == stages else default_pages_per_block(
            page_size, num_stages=num_stages, head_dim=head_dim, itemsize=k_pages.dtype.itemsize,
            compute_itemsize=q.dtype.itemsize, block_keys=block_keys,
        )  # fmt: skip
    validate_tiling(page_size, pages_per_block, num_warps, num_stages)
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], num_kv_heads, block_tables.shape[1], pages_per_block)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int; got {num_splits!r}")
    return _decode_call(
        q, k_pages, v_pages, block_tables, seq_lens, scale=float(scale), window=window,
        pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=["scale", "window"])
def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Plain-jnp decode attention: gather each sequence's pages densely, mask, softmax in float32.

    Same arguments and result as `paged_decode_attention`; padding slots (seq_len 0) give zeros.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    pages_per_seq = block_tables.shape[1]
    k = k_pages[:, block_tables].astype(jnp.float32)  # [K, B, max_pages, S, d]
    v = v_pages[:, block_tables].astype(jnp.float32)
    k = k.reshape(num_kv_heads, num_seqs, pages_per_seq * page_size, head_dim)
    v = v.reshape(num_kv_heads, num_seqs, pages_per_seq * page_size, head_dim)
    qg = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim)
    s = jnp.einsum("bkgd,kbnd->bkgn", qg, k, precision=lax.Precision.HIGHEST) * scale
    key_pos = jnp.arange(pages_per_seq * page_size)[None, :]
    visible = key_pos < seq_lens[:, None]  # [B, n]
    if window is not None:
        visible &= key_pos > seq_lens[:, None] - 1 - window
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgn,kbnd->bkgd", p, v, precision=lax.Precision.HIGHEST) / jnp.where(l > 0.0, l, 1.0)
    return out.reshape(q.shape).astype(q.dtype)
