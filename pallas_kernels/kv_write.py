"""Writes a step's keys and values into the paged KV cache, both caches in one kernel, in place;
`rope_write_kv_kernel` also applies the rotary embedding to the step's queries and keys on the way.

Layout as in `jaxllm.layers.attention`: k_pages, v_pages [K, P, S, d]; token t's K/V go to slot
slot_mapping[t] (page * S + offset) of every KV head. `write_kv_reference` is the plain-jnp
reference (the same scatter as `jaxllm.layers.attention.write_kv`, the 'xla' backend's): XLA makes one scatter kernel per cache of it (two launches a layer of every
step, about 3 us each at batch 1 on an H200); this is one launch, writing into the caches it is
given (`input_output_aliases`), so under a jit that donates them nothing is copied.

One program handles a block of tokens for one KV head: it reads their [tokens, d] rows of k and v
and stores them at the rows `head * P * S + slot` of the flattened page pools. Padding tokens all
write the null page's slot 0 (batch.py), which nothing reads. Into a float8 E4M3 cache the values
are clipped to +-448 before the cast (`to_cache_dtype`): E4M3FN has no infinity, so an overflowing
cast would store NaN.

`rope_write_kv_kernel` takes the step's queries and keys before the rotary embedding and the
step's cos / sin tables (computed once a step by XLA, as the reference computes them): each
program also rotates its KV head's G query heads (written to a new [T, H, d] array) and its key
before the store, so a layer's attention preparation is this one kernel rather than XLA's two
rotation fusions and the write (the rotation fusions were 8.2% of a mixed pass's GPU time in a
2026-12-04 H200 profile, and 2 of the ~14 kernels a layer of a small model's batch-1 step:
benchmarks/RESULTS.md). The rotation is the "rotate half" layout: out[:d/2] = x[:d/2] cos -
x[d/2:] sin, out[d/2:] = x[d/2:] cos + x[:d/2] sin, in x's dtype with each product and sum rounded
to it, as the reference (and Hugging Face's bfloat16 models) compute it; the rotated key is then
cast to the cache's dtype. It reads q, k and v apart, or the fused QKV projection's output where it
lies (`qkv`): a custom call's operands are not fused, so XLA would copy each slice out of it first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._tiles import pow2_divisor, to_cache_dtype

# At most this many tokens per program: a decode step's few rows take one program per KV head; a
# prefill chunk of thousands of tokens takes T / 16 of them.
MAX_TOKEN_BLOCK = 16


def _write_kv_kernel(slot_ref, k_ref, v_ref, _k_in, _v_in, k_out, v_out, *, token_block: int, dim_block: int,
                     num_kv_heads: int, pool_slots: int):  # fmt: skip
    """slot_ref [T]; k_ref, v_ref [T * K, d] (token-major); k_out, v_out [K * P * S, d], aliased
    to the caches passed in (`_k_in`, `_v_in`), which the kernel does not read.

    token_block divides T and dim_block divides d (both powers of two), so no load or store is
    masked: the Pallas interpreter stores a masked element by writing back what it read, which
    would race with a real write of the same slot (padding tokens share one).
    """
    head_dim = k_ref.shape[1]
    head = pl.program_id(1)
    tokens = pl.program_id(0) * token_block + jnp.arange(token_block)
    slots = plgpu.load(slot_ref.at[tokens])
    src = (tokens * num_kv_heads + head)[:, None]
    dst = (head * pool_slots + slots)[:, None]
    for start in range(0, head_dim, dim_block):
        dims = (start + jnp.arange(dim_block))[None, :]
        for new_ref, out_ref in ((k_ref, k_out), (v_ref, v_out)):
            plgpu.store(out_ref.at[dst, dims], to_cache_dtype(plgpu.load(new_ref.at[src, dims]), out_ref.dtype))


def write_kv_kernel(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                    *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`write_kv_reference` as one Pallas kernel: same arguments, same result.

    k_pages, v_pages: [K, P, S, d]; k, v: [T, K, d]; slot_mapping: [T] int32 (page * S + offset).
    Returns the updated (k_pages, v_pages), in place when the caller donates them.
    """
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape or v_pages.shape != k_pages.shape:
        raise ValueError(f"write_kv_kernel: k {k.shape} and v {v.shape} must be [T, {num_kv_heads}, {head_dim}] "
                         f"for caches {k_pages.shape} and {v_pages.shape}")  # fmt: skip
    pool_slots = num_pages * page_size
    token_block = pow2_divisor(num_tokens, MAX_TOKEN_BLOCK)
    kernel = functools.partial(_write_kv_kernel, token_block=token_block, dim_block=pow2_divisor(head_dim, 256),
                               num_kv_heads=num_kv_heads, pool_slots=pool_slots)  # fmt: skip
    flat_pool = (num_kv_heads * pool_slots, head_dim)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    k_out, v_out = pl.pallas_call(
        kernel,
        grid=(num_tokens // token_block, num_kv_heads),
        in_specs=[whole((num_tokens,)), whole((num_tokens * num_kv_heads, head_dim)),
                  whole((num_tokens * num_kv_heads, head_dim)), whole(flat_pool), whole(flat_pool)],  # fmt: skip
        out_specs=[whole(flat_pool), whole(flat_pool)],
        out_shape=[jax.ShapeDtypeStruct(flat_pool, k_pages.dtype), jax.ShapeDtypeStruct(flat_pool, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(
        slot_mapping.astype(jnp.int32),
        k.reshape(num_tokens * num_kv_heads, head_dim),
        v.reshape(num_tokens * num_kv_heads, head_dim),
        k_pages.reshape(flat_pool),
        v_pages.reshape(flat_pool),
    )
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)


def _rope_write_kv_kernel(slot_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, _k_in, _v_in, q_out, k_out, v_out, *,
                          token_block: int, half_block: int, dim_block: int, group: int, num_kv_heads: int,
                          pool_slots: int, fused: bool):  # fmt: skip
    """slot_ref [T]; cos_ref, sin_ref [T, d/2]; q_ref, q_out [T * H, d] (token-major, head h = kv_head
    * G + g); k_ref, v_ref [T * K, d]; k_out, v_out as in `_write_kv_kernel`. fused: q_ref, k_ref and
    v_ref are one array, the fused projection's output [T * K * (G + 2), d] (each (token, KV head)'s
    G query rows, then its key and its value). half_block divides d/2 and dim_block d: no load or
    store is masked (see `_write_kv_kernel`)."""
    head_dim = k_out.shape[1]
    half = head_dim // 2
    head = pl.program_id(1)
    tokens = pl.program_id(0) * token_block + jnp.arange(token_block)
    slots = plgpu.load(slot_ref.at[tokens])
    pair = tokens * num_kv_heads + head  # (token, KV head)
    dst = (head * pool_slots + slots)[:, None]
    q_dst = [(pair * group + g)[:, None] for g in range(group)]
    if fused:
        q_src = [(pair * (group + 2) + g)[:, None] for g in range(group)]
        k_src, v_src = (pair * (group + 2) + group)[:, None], (pair * (group + 2) + group + 1)[:, None]
    else:
        q_src, k_src, v_src = q_dst, pair[:, None], pair[:, None]
    for start in range(0, half, half_block):
        lo = (start + jnp.arange(half_block))[None, :]
        hi = lo + half
        cos = plgpu.load(cos_ref.at[tokens[:, None], lo])
        sin = plgpu.load(sin_ref.at[tokens[:, None], lo])

        def rotate(ref, rows):  # in ref's dtype, each product and sum rounded to it, as `rotate_half`
            x_lo, x_hi = plgpu.load(ref.at[rows, lo]), plgpu.load(ref.at[rows, hi])
            c, s = cos.astype(ref.dtype), sin.astype(ref.dtype)
            return x_lo * c - x_hi * s, x_hi * c + x_lo * s

        for src, rows in zip(q_src, q_dst):
            for dims, x in zip((lo, hi), rotate(q_ref, src)):
                plgpu.store(q_out.at[rows, dims], x.astype(q_out.dtype))
        for dims, x in zip((lo, hi), rotate(k_ref, k_src)):
            plgpu.store(k_out.at[dst, dims], to_cache_dtype(x, k_out.dtype))
    for start in range(0, head_dim, dim_block):
        dims = (start + jnp.arange(dim_block))[None, :]
        plgpu.store(v_out.at[dst, dims], to_cache_dtype(plgpu.load(v_ref.at[v_src, dims]), v_out.dtype))


def rope_write_kv_kernel(k_pages: jax.Array, v_pages: jax.Array, q: jax.Array | None, k: jax.Array | None,
                         v: jax.Array | None, cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array, *,
                         qkv: jax.Array | None = None,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """`rope_write_kv_reference` as one Pallas kernel: same arguments, same result.

    k_pages, v_pages: [K, P, S, d]; q: [T, H, d], H a multiple of K; k, v: [T, K, d], q and k before
    the rotary embedding; cos, sin: [T, d/2] (the first half of the "rotate half" tables, whose two
    halves are equal); slot_mapping: [T] int32 (page * S + offset).
    qkv: instead of q, k and v (then None), a fused QKV projection's output [T, K, G + 2, d] (each
    KV head's G queries, its key, its value: models/params.py's fused layout), read where it lies:
    the three slices XLA would otherwise copy out of it for this kernel (one kernel each, ~1.1 us
    at batch 1 on an H100) are not made.
    Returns (the rotated q [T, H, d] in q's dtype, k_pages, v_pages), the caches in place when the
    caller donates them.
    """
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    fused = qkv is not None
    if fused != (q is None) or fused != (k is None) or fused != (v is None):
        raise ValueError("rope_write_kv_kernel: give q, k and v, or qkv alone")
    if fused:
        if qkv.ndim != 4 or qkv.shape[1] != num_kv_heads or qkv.shape[2] < 3 or qkv.shape[3] != head_dim:
            raise ValueError(f"rope_write_kv_kernel: qkv {qkv.shape} must be [T, {num_kv_heads}, G + 2, {head_dim}] "
                             f"for caches {k_pages.shape}")  # fmt: skip
        num_tokens, group, dtype = qkv.shape[0], qkv.shape[2] - 2, qkv.dtype
        num_heads = num_kv_heads * group
    else:
        num_tokens, num_heads = q.shape[:2]
        group, dtype = num_heads // num_kv_heads, q.dtype
        if (k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape
                or q.shape != (num_tokens, num_heads, head_dim) or num_heads % num_kv_heads):
            raise ValueError(f"rope_write_kv_kernel: q {q.shape} must be [T, H, {head_dim}] with H a multiple of "
                             f"{num_kv_heads}, k {k.shape} and v {v.shape} [T, {num_kv_heads}, {head_dim}] for caches "
                             f"{k_pages.shape} and {v_pages.shape}")  # fmt: skip
    if v_pages.shape != k_pages.shape or head_dim % 2:
        raise ValueError(f"rope_write_kv_kernel: caches {k_pages.shape} and {v_pages.shape} must match, head_dim even")
    if cos.shape != (num_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope_write_kv_kernel: cos {cos.shape} and sin {sin.shape} must be "
                         f"[{num_tokens}, {head_dim // 2}]")  # fmt: skip
    pool_slots = num_pages * page_size
    token_block = pow2_divisor(num_tokens, MAX_TOKEN_BLOCK)
    kernel = functools.partial(
        _rope_write_kv_kernel, token_block=token_block, half_block=pow2_divisor(head_dim // 2, 128),
        dim_block=pow2_divisor(head_dim, 256), group=group, num_kv_heads=num_kv_heads, pool_slots=pool_slots,
        fused=fused,
    )
    flat_pool = (num_kv_heads * pool_slots, head_dim)
    q_rows = (num_tokens * num_heads, head_dim)
    table = (num_tokens, head_dim // 2)
    if fused:  # the one array three times: its q, k and v rows
        rows = (num_tokens * num_kv_heads * (group + 2), head_dim)
        sources, source_rows = (qkv.reshape(rows),) * 3, (rows,) * 3
    else:
        kv_rows = (num_tokens * num_kv_heads, head_dim)
        sources, source_rows = (q.reshape(q_rows), k.reshape(kv_rows), v.reshape(kv_rows)), (q_rows, kv_rows, kv_rows)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    q_out, k_out, v_out = pl.pallas_call(
        kernel,
        grid=(num_tokens // token_block, num_kv_heads),
        in_specs=[whole((num_tokens,)), whole(table), whole(table), *map(whole, source_rows), whole(flat_pool),
                  whole(flat_pool)],  # fmt: skip
        out_specs=[whole(q_rows), whole(flat_pool), whole(flat_pool)],
        out_shape=[jax.ShapeDtypeStruct(q_rows, dtype), jax.ShapeDtypeStruct(flat_pool, k_pages.dtype),
                   jax.ShapeDtypeStruct(flat_pool, v_pages.dtype)],  # fmt: skip
        input_output_aliases={6: 1, 7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="rope_write_kv",
    )(
        slot_mapping.astype(jnp.int32),
        cos,
        sin,
        *sources,
        k_pages.reshape(flat_pool),
        v_pages.reshape(flat_pool),
    )
    return q_out.reshape(num_tokens, num_heads, head_dim), k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Plain-jnp rotary embedding of x [T, N, d] by cos, sin [T, d/2], in x's dtype (the same
    expression as `jaxllm.layers.rope.apply_rotary` with its tables' equal halves)."""
    half = x.shape[-1] // 2
    cos = jnp.concatenate([cos, cos], axis=-1)[:, None, :].astype(x.dtype)
    sin = jnp.concatenate([sin, sin], axis=-1)[:, None, :].astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_write_kv_reference(k_pages, v_pages, q, k, v, cos, sin, slot_mapping, *, qkv=None):
    """Plain-jnp `rope_write_kv_kernel`: rotate q and k (`rotate_half`), then `write_kv_reference`;
    from qkv [T, K, G + 2, d] split into them when given."""
    if qkv is not None:
        group = qkv.shape[2] - 2
        q = qkv[:, :, :group].reshape(qkv.shape[0], -1, qkv.shape[3])
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
    k_pages, v_pages = write_kv_reference(k_pages, v_pages, rotate_half(k, cos, sin), v, slot_mapping)
    return rotate_half(q, cos, sin), k_pages, v_pages


def write_kv_reference(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                       slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Plain-jnp `write_kv_kernel`: scatter token t's K/V [K, d] into slot slot_mapping[t] of each cache.

    k_pages, v_pages: [K, P, S, d]; k, v: [T, K, d]; slot_mapping: [T] int32 (page * S + offset).
    """
    page_size = k_pages.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[:, pages, offsets].set(to_cache_dtype(k.swapaxes(0, 1), k_pages.dtype))
    v_pages = v_pages.at[:, pages, offsets].set(to_cache_dtype(v.swapaxes(0, 1), v_pages.dtype))
    return k_pages, v_pages
