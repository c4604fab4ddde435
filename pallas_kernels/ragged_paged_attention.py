"""Ragged paged attention for prefill and mixed steps: many query tokens per sequence, packed.

Query rows of B sequences are packed along one axis: sequence b owns q[query_start[b] :
query_start[b + 1]], and its i-th row sits at position seq_lens[b] - q_len_b + i. This step's own
keys and values are already in the pages, so every row reads its whole visible context (earlier
chunks and its causal part of this chunk) from the KV cache, layout as in
`jaxllm.layers.attention`.

One program handles one (KV head, work item) for all H // K query heads of the KV head at once. A
work item is one block of `block_q` query rows of one sequence; a small jnp step before the kernel
lists the step's work items, heaviest (most keys) first, so the grid is (K, W) with W a static
bound on the item count (`num_work_items`) rather than (K, B, Q / block_q): a mixed step with 256
sequence slots, most of them padding or one-token decodes, and Q = 4096 launches ~500 programs per
KV head instead of ~32,000 that nearly all exit at once. Programs past the real item count exit
at once. The query tile is [block_q * G, d], so each K/V page is read once per KV head and query
block, and tl.dot sees a tall tile even for decode rows. The key loop runs from the first key any
row of the block can see (sliding window) to the last row's position (causal), `pages_per_block`
pages at a time, with an online softmax in float32.

Rows that no sequence owns (padding at the end of T) come out zero: the output starts as a zero
buffer aliased into the kernel, which writes only owned rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._tiles import (
    LOG2_E,
    MASK_VALUE,
    MIN_DOT_DIM,
    dot_precision,
    fit_block_keys,
    is_power_of_2,
    kv_compute_dtype,
    kv_values,
    load_rows,
    to_compute,
    validate_paged_inputs,
    validate_tiling,
)

# Defaults, from benchmarks/kernel_tuning.py on an H100 (bf16, d = 128, Llama-3.1-8B heads): a
# 128-row query tile against 128 keys per step, 8 warps, 2 pipeline stages; 8192-token causal
# prefill ran at ~285 TFLOP/s against ~240 for 64 keys. Keys per step shrink where float32 or a
# wide head would overflow shared memory (fit_block_keys).
DEFAULT_TILE_ROWS = 128
DEFAULT_BLOCK_KEYS = 128
DEFAULT_NUM_STAGES = 2


def _ragged_kernel(
    q_ref,  # [T, G, d]: every token's query heads of this KV head
    k_ref,  # [P * S, d]: this KV head's page pool, one row per slot
    v_ref,  # [P * S, d]
    work_seq_ref,  # [W]: each work item's sequence, -1 past the real items
    work_block_ref,  # [W]: each work item's query block within its sequence
    query_start_ref,  # [B + 1]
    seq_lens_ref,  # [B]: context lengths including this step
    block_tables_ref,  # [B, max_pages]: page ids
    zeros_ref,  # [T, G, d]: the zero buffer aliased to o_ref; never read
    o_ref,  # [T, G, d]
    **static,  # page_size, pages_per_block, block_q, group_block, head_block, scale, window
):
    del zeros_ref
    item = pl.program_id(1)
    seq = work_seq_ref[item]

    @pl.when(seq >= 0)
    def _():
        _ragged_block(
            q_ref, k_ref, v_ref, query_start_ref, seq_lens_ref, block_tables_ref, o_ref, seq=seq,
            q_block=work_block_ref[item], **static,
        )


def _ragged_block(
    q_ref, k_ref, v_ref, query_start_ref, seq_lens_ref, block_tables_ref, o_ref, *, seq, q_block,
    page_size, pages_per_block, block_q, group_block, head_block, scale, window,
):
    """Query block `q_block` of sequence `seq` for one KV head: refs as in `_ragged_kernel`."""
    _, group, head_dim = q_ref.shape
    block_keys = pages_per_block * page_size
    tile_rows = block_q * group_block
    # A float8 cache (or its bytes): each loaded K/V tile is upcast before the dots, which run in
    # float16 under a bfloat16 query (_tiles.kv_compute_dtype), else in q's dtype.
    compute = kv_compute_dtype(q_ref.dtype, k_ref.dtype)
    precision = dot_precision(compute)
    upcast = (lambda x: kv_values(x).astype(compute)) if k_ref.dtype != compute else (lambda x: x)

    q_start = query_start_ref[seq]
    q_len = query_start_ref[seq + 1] - q_start
    seq_len = seq_lens_ref[seq]
    first_row = q_block * block_q  # within this sequence's rows
    first_row_pos = seq_len - q_len + first_row

    row_ok = (first_row + jnp.arange(block_q)) < q_len  # [block_q]
    head_ok = jnp.arange(group_block) < group
    tile_mask = row_ok[:, None, None] & head_ok[None, :, None]
    # Masks on head_dim only where it is padded to a power of two (a static choice).
    dim_ok = (jnp.arange(head_block) < head_dim)[None, :] if head_block != head_dim else None
    if dim_ok is not None:
        tile_mask &= dim_ok[None]
    tile_at = (pl.ds(q_start + first_row, block_q), pl.ds(0, group_block), pl.ds(0, head_block))
    q = plgpu.load(q_ref.at[tile_at], mask=tile_mask, other=0.0).reshape(tile_rows, head_block)
    q = to_compute(q, compute)
    # Tile row r is query row first_row + r // group_block, head r % group_block.
    q_pos = first_row_pos + lax.div(jnp.arange(tile_rows), group_block)  # [tile_rows]

    # Keys any row of the block can see: [lo_key, hi_key).
    last_row_pos = seq_len - q_len + jnp.minimum(first_row + block_q, q_len) - 1
    hi_key = last_row_pos + 1
    lo_key = 0 if window is None else jnp.maximum(first_row_pos - window + 1, 0)
    lo_page = lax.div(lo_key, page_size)
    hi_page = lax.div(hi_key + page_size - 1, page_size)
    num_blocks = lax.div(jnp.maximum(hi_page - lo_page, 0) + pages_per_block - 1, pages_per_block)
    # Key block i starts at key base + i * block_keys. Blocks that every row of the tile sees whole
    # (past the window's edge for the last row, before the causal diagonal of the first row) skip
    # the masks: blocks [first_full, end_full) run unmasked, the rest masked.
    base = lo_page * page_size
    end_full = jnp.clip(lax.div(jnp.maximum(first_row_pos + 1 - base, 0), block_keys), 0, num_blocks)
    if window is None:
        first_full = 0
    else:
        past_edge = jnp.maximum(last_row_pos - window + 1 - base, 0)
        first_full = jnp.clip(lax.div(past_edge + block_keys - 1, block_keys), 0, end_full)

    slot_in_page = jnp.arange(page_size)
    dims = jnp.arange(head_block)

    def body(i, carry, *, masked):
        acc, m_prev, l_prev = carry
        start_page = lo_page + i * pages_per_block
        table_pos = start_page + jnp.arange(pages_per_block)
        table_at = block_tables_ref.at[seq, pl.ds(start_page, pages_per_block)]
        if masked:
            page_ok = table_pos < hi_page
            page_ids = plgpu.load(table_at, mask=page_ok, other=0)
            row_in = jnp.broadcast_to(page_ok[:, None], (pages_per_block, page_size)).reshape(block_keys)
            kv_mask = row_in[:, None] if dim_ok is None else row_in[:, None] & dim_ok
        else:
            page_ids = plgpu.load(table_at)
            kv_mask = dim_ok
        rows = (page_ids[:, None] * page_size + slot_in_page[None, :]).reshape(block_keys)

        k = upcast(load_rows(k_ref, rows, dims, kv_mask))  # [Bk, d]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2_E)  # [rows, Bk]
        if masked:
            key_pos = (table_pos[:, None] * page_size + slot_in_page[None, :]).reshape(block_keys)
            visible = row_in[None, :] & (key_pos[None, :] <= q_pos[:, None])
            if window is not None:
                visible &= key_pos[None, :] > q_pos[:, None] - window
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = alpha * l_prev + p.sum(axis=-1)
        v = upcast(load_rows(v_ref, rows, dims, kv_mask))
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l_new

    masked_body = functools.partial(body, masked=True)
    carry = (
        jnp.zeros((tile_rows, head_block), jnp.float32),
        jnp.full((tile_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((tile_rows,), jnp.float32),
    )
    if window is not None:
        carry = lax.fori_loop(0, first_full, masked_body, carry)
    carry = lax.fori_loop(first_full, end_full, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(end_full, num_blocks, masked_body, carry)
    out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
    out = out.reshape(block_q, group_block, head_block).astype(o_ref.dtype)
    plgpu.store(o_ref.at[tile_at], out, mask=tile_mask)


def default_block_q(group: int, max_query_len: int, head_dim: int) -> int:
    """Query rows per program: a DEFAULT_TILE_ROWS-row tile (half that for heads wider than 128),
    no taller than the longest query, and at least 16 tile rows for tl.dot."""
    group_block = pl.next_power_of_2(group)
    tile_rows = DEFAULT_TILE_ROWS if head_dim <= 128 else DEFAULT_TILE_ROWS // 2
    block_q = max(1, tile_rows // group_block)
    block_q = min(block_q, pl.next_power_of_2(max_query_len))
    return max(block_q, pl.cdiv(MIN_DOT_DIM, group_block))


def num_work_items(num_tokens: int, num_seqs: int, max_query_len: int, block_q: int) -> int:
    """Static bound W on a step's (sequence, query block) pairs: the kernel's grid is (K, W).

    A sequence with n >= 1 rows has cdiv(n, block_q) = (n - 1) // block_q + 1 blocks, so k non-empty
    sequences of T rows in all have at most (T - k) // block_q + k, largest at k = min(B, T); and
    each has at most cdiv(max_query_len, block_q).
    """
    nonempty = min(num_seqs, num_tokens)
    by_tokens = (num_tokens - nonempty) // block_q + nonempty
    by_seqs = num_seqs * pl.cdiv(max_query_len, block_q)
    return max(1, min(by_tokens, by_seqs))


def ragged_work_list(
    query_start: jax.Array, seq_lens: jax.Array, *, num_items: int, block_q: int, window: int | None,
    skip_single_rows: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The step's work items, one per (sequence, block of block_q query rows), most keys first;
    with `skip_single_rows`, none for a sequence of one row (a decode, computed elsewhere).

    Returns (work_seq, work_block), both [num_items] int32: item w is query block work_block[w] of
    sequence work_seq[w]; items past the real count have work_seq -1 and come last. Longest-first
    order keeps a long chunk's last blocks (the whole causal context) from starting in the final
    wave. Pairs beyond num_items (only if a sequence exceeds max_query_len) are dropped.
    """
    num_seqs = seq_lens.shape[0]
    q_lens = query_start[1:] - query_start[:-1]  # [B]
    blocks = (q_lens + block_q - 1) // block_q  # [B]
    if skip_single_rows:
        blocks = jnp.where(q_lens > 1, blocks, 0)
    ends = jnp.cumsum(blocks)  # [B]: items of sequences 0..b
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, item, side="right", method="compare_all")  # [W]; B past the end
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    q_block = item - (ends[seq] - blocks[seq])
    # Keys the block reads, as in the kernel: [lo, hi) in positions.
    q_len = q_lens[seq]
    first_row = q_block * block_q
    first_pos = seq_lens[seq] - q_len + first_row
    hi = first_pos + jnp.minimum(block_q, q_len - first_row)
    lo = 0 if window is None else jnp.maximum(first_pos - window + 1, 0)
    keys = jnp.where(valid, hi - lo, -1)
    order = jnp.argsort(-keys, stable=True)
    work_seq = jnp.where(valid, seq, -1)[order].astype(jnp.int32)
    return work_seq, q_block[order].astype(jnp.int32)


def _ragged_call(
    q, k_pages, v_pages, query_start, seq_lens, block_tables, *, max_query_len, scale, window,
    block_q, pages_per_block, num_warps, num_stages, interpret, skip_single_rows=False,
):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    num_seqs, pages_per_seq = block_tables.shape
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)  # head h = kv_head * G + g
    k_rows = k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    v_rows = v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim)

    kernel = functools.partial(
        _ragged_kernel,
        page_size=page_size,
        pages_per_block=pages_per_block,
        block_q=block_q,
        group_block=pl.next_power_of_2(group),
        head_block=max(MIN_DOT_DIM, pl.next_power_of_2(head_dim)),
        scale=scale,
        window=window,
    )
    num_items = num_work_items(num_tokens, num_seqs, max_query_len, block_q)
    work_seq, work_block = ragged_work_list(
        query_start, seq_lens, num_items=num_items, block_q=block_q, window=window,
        skip_single_rows=skip_single_rows,
    )
    grid = (num_kv_heads, num_items)
    token_heads_spec = pl.BlockSpec((num_tokens, None, group, head_dim), lambda h, w: (0, h, 0, 0))

    def whole(shape):
        return pl.BlockSpec(shape, lambda h, w: (0,) * len(shape))

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            # q: all tokens' query heads of KV head h; the kernel slices its work item's rows.
            token_heads_spec,
            # k, v: KV head h's whole page pool; the kernel gathers the pages it needs.
            pl.BlockSpec((None, num_pages * page_size, head_dim), lambda h, w: (h, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size, head_dim), lambda h, w: (h, 0, 0)),
            # work_seq, work_block: whole lists (the kernel reads entry w).
            whole((num_items,)),
            whole((num_items,)),
            # query_start, seq_lens, block_tables: whole arrays, indexed by the item's sequence
            # (which a BlockSpec index map cannot see on the Triton backend).
            whole((num_seqs + 1,)),
            whole((num_seqs,)),
            whole((num_seqs, pages_per_seq)),
            # zeros: the initial output (aliased to o), so unowned rows stay zero.
            token_heads_spec,
        ],
        # o: all tokens of KV head h; the kernel writes only its work item's rows.
        out_specs=token_heads_spec,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        input_output_aliases={8: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_s{page_size}_p{pages_per_block}_q{block_q}",
    )(q4, k_rows, v_rows, work_seq, work_block, query_start, seq_lens, block_tables, jnp.zeros_like(q4))
    return out.reshape(q.shape)


@functools.partial(
    jax.jit,
    static_argnames=[
        "max_query_len", "scale", "window", "block_q", "pages_per_block", "num_warps", "num_stages", "interpret",
        "skip_single_rows",
    ],
)
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    max_query_len: int,
    scale: float,
    window: int | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
    interpret: bool = False,
    skip_single_rows: bool = False,
) -> jax.Array:
    """Causal attention of packed query rows over their sequences' KV pages.

    Args:
      q: [T, H, d] query rows of all sequences, packed (float32, bfloat16 or float16).
      k_pages, v_pages: [K, P, S, d] in q's dtype or float8_e4m3fn (each tile upcast in the kernel:
        to float16 under a bf16 q, else to q's dtype), already holding this step's keys/values; H a
        multiple of K, S a power of two.
      query_start: [B + 1] int32, non-decreasing: sequence b owns rows query_start[b] :
        query_start[b + 1] (padding slots own none).
      seq_lens: [B] int32 context lengths including this step's rows (>= the row count).
      block_tables: [B, max_pages] int32 page ids in [0, P) (pad with the null page 0).
      max_query_len: static upper bound on any sequence's row count; caps block_q and, with T and
        B, the grid (`num_work_items`).
      scale: softmax scale (static).
      window: sliding window or None: a row at position p sees keys at positions in (p - window, p].
      block_q: query rows per program (power of two); default makes a ~128-row tile with the G
        query heads of a KV head.
      pages_per_block: pages per inner-loop step (power of two, times S at least 16); default
        128 keys' worth, fewer where float32 or a wide head would overflow shared memory.
      num_warps, num_stages: Triton launch parameters (default num_warps: 4 for d <= 64, else 8).
      interpret: run the kernel in the Pallas interpreter (CPU tests).
      skip_single_rows: leave the rows of one-row sequences (a mixed step's decodes, for the
        split-K decode kernel to compute instead) zero, as if no sequence owned them.
    Returns:
      [T, H, d] in q's dtype; rows owned by no sequence (or skipped) are zeros.
    """
    validate_paged_inputs(q, k_pages, v_pages, block_tables, seq_lens, window=window)
    num_seqs = block_tables.shape[0]
    if query_start.shape != (num_seqs + 1,) or query_start.dtype != jnp.int32:
        raise ValueError(f"query_start must be int32 [{num_seqs + 1}]; got {query_start.dtype}{query_start.shape}")
    if not isinstance(max_query_len, int) or max_query_len < 1:
        raise ValueError(f"max_query_len must be a positive int; got {max_query_len!r}")
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // num_kv_heads
    if block_q is None:
        block_q = default_block_q(group, max_query_len, head_dim)
    if not is_power_of_2(block_q) or block_q * pl.next_power_of_2(group) < MIN_DOT_DIM:
        raise ValueError(
            f"block_q {block_q} must be a power of two with block_q * next_pow2(group={group}) >= {MIN_DOT_DIM}"
        )
    if pages_per_block is None:
        block_keys = fit_block_keys(
            DEFAULT_BLOCK_KEYS, num_stages=num_stages, query_rows=block_q * pl.next_power_of_2(group),
            head_dim=head_dim, itemsize=k_pages.dtype.itemsize, compute_itemsize=q.dtype.itemsize,
        )
        pages_per_block = max(1, block_keys // page_size, pl.cdiv(MIN_DOT_DIM, page_size))
    if num_warps is None:
        num_warps = 4 if head_dim <= 64 else 8
    validate_tiling(page_size, pages_per_block, num_warps, num_stages)
    return _ragged_call(
        q, k_pages, v_pages, query_start, seq_lens, block_tables, max_query_len=max_query_len,
        scale=float(scale), window=window, block_q=block_q, pages_per_block=pages_per_block,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret, skip_single_rows=skip_single_rows,
    )


@functools.partial(jax.jit, static_argnames=["max_query_len", "scale", "window"])
def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    max_query_len: int,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Plain-jnp ragged attention: per row, gather its sequence's pages densely, mask, softmax.

    Same arguments and result as `ragged_paged_attention` (max_query_len is accepted for the same
    signature and unused). Memory is T x max_pages x S per KV head: for tests, not for serving.
    """
    del max_query_len
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    num_seqs, pages_per_seq = block_tables.shape
    rows = jnp.arange(num_tokens)
    # Row t belongs to the sequence b with query_start[b] <= t < query_start[b + 1], if any.
    seq = jnp.clip(jnp.searchsorted(query_start, rows, side="right") - 1, 0, num_seqs - 1)
    owned = (rows >= query_start[seq]) & (rows < query_start[seq + 1])
    q_len = query_start[seq + 1] - query_start[seq]
    q_pos = seq_lens[seq] - q_len + (rows - query_start[seq])  # [T]

    k = k_pages[:, block_tables[seq]].astype(jnp.float32)  # [K, T, max_pages, S, d]
    v = v_pages[:, block_tables[seq]].astype(jnp.float32)
    k = k.reshape(num_kv_heads, num_tokens, pages_per_seq * page_size, head_dim)
    v = v.reshape(num_kv_heads, num_tokens, pages_per_seq * page_size, head_dim)
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    s = jnp.einsum("tkgd,ktnd->tkgn", qg, k, precision=lax.Precision.HIGHEST) * scale
    key_pos = jnp.arange(pages_per_seq * page_size)[None, :]
    visible = owned[:, None] & (key_pos <= q_pos[:, None])
    if window is not None:
        visible &= key_pos > q_pos[:, None] - window
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("tkgn,ktnd->tkgd", p, v, precision=lax.Precision.HIGHEST) / jnp.where(l > 0.0, l, 1.0)
    return out.reshape(q.shape).astype(q.dtype)
