"""Tiling helpers and input checks shared by the Pallas (Triton) kernels of this package.

Private to pallas_kernels: each kernel file imports what it needs from here, never from another
kernel's file. Triton tiles have power-of-two dimensions of at least MIN_DOT_DIM; softmax runs in
float32 in log2 units (exp2), starting from MASK_VALUE.

KV pages may be float8 E4M3 (KV_ONLY_DTYPES), as float8 arrays or as their bytes (uint8: how
jaxllm holds a float8 cache, so that XLA copies and scatters its pages in place), under queries of
any SUPPORTED_DTYPES: the attention kernels load each K/V tile in its stored dtype (half of bf16's
memory traffic and shared memory) and upcast it before the dots (`kv_values`), to float16 under a
bfloat16 query (`kv_compute_dtype`), else to q's dtype; the K/V write saturates into it
(`to_cache_dtype`). Triton converts float8 E4M3 on compute capability 8.9+
(Ada, Hopper) only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Initial running max: finite, so exp2(m_old - m_new) stays 0 (never NaN) while masked scores,
# which are -inf, contribute exactly 0 even to a row that has seen no visible key yet.
MASK_VALUE = -1e30
LOG2_E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Page dtypes the kernels read under queries of another dtype (upcast per tile): float8 E4M3, whose
# largest finite value is 448 and which has no infinity.
FP8, FP8_BYTES = jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.uint8)
KV_ONLY_DTYPES = (FP8, FP8_BYTES)
# tl.dot needs every tile dimension to be at least 16.
MIN_DOT_DIM = 16
# Shared memory the default tiling may plan for: the H100 allows 227 KiB per program; the rest is
# headroom for Triton's own buffers.
SHARED_MEMORY_BUDGET = 200 * 1024


def dot_precision(dtype) -> lax.Precision | None:
    """float32 tiles take the exact (IEEE) MMA path; Triton would otherwise use TF32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def to_cache_dtype(x, dtype):
    """x cast to a KV cache dtype; into float8 E4M3 with saturation (clipped to +-448 first: an
    overflowing cast would be NaN, E4M3FN having no infinity)."""
    dtype = jnp.dtype(dtype)
    if dtype in KV_ONLY_DTYPES:
        limit = float(jnp.finfo(FP8).max)
        x = jnp.minimum(jnp.maximum(x, -limit), limit).astype(FP8)
        return jax.lax.bitcast_convert_type(x, FP8_BYTES) if dtype == FP8_BYTES else x
    return x.astype(dtype)


def kv_compute_dtype(q_dtype, kv_dtype):
    """The dtype an attention kernel's dots run in: q's, except over a float8 cache under a bfloat16
    query: float16. Hopper widens a pair of E4M3 values to float16 in one instruction, to bfloat16
    only through more (the decode kernel over an fp8 cache took as long as over a bf16 one, reading
    half the bytes: benchmarks/RESULTS.md, "Decode attention over an FP8 cache"); float16 also
    holds the probabilities and E4M3's values more exactly than bfloat16. The query is clipped into
    float16's range (`to_compute`). The decode kernel takes it only for batches that fill the GPU
    (at batch 1 it lost: paged_decode_attention.py `_decode_call`)."""
    q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
    if kv_dtype in KV_ONLY_DTYPES and q_dtype == jnp.dtype(jnp.bfloat16):
        return jnp.dtype(jnp.float16)
    return q_dtype


def to_compute(q, dtype):
    """A loaded query tile in the kernel's compute dtype (`kv_compute_dtype`); into float16
    saturating at its largest finite value, where bfloat16's range is wider."""
    if q.dtype == dtype:
        return q
    if dtype == jnp.dtype(jnp.float16):  # clipped in float32: bfloat16 rounds float16's largest value up, to 65536
        limit = float(jnp.finfo(jnp.float16).max)
        q = jnp.minimum(jnp.maximum(q.astype(jnp.float32), -limit), limit)
    return q.astype(dtype)


def kv_values(x):
    """A loaded K/V tile as values: float8 bytes (uint8) reinterpreted as float8 E4M3."""
    return jax.lax.bitcast_convert_type(x, FP8) if x.dtype == FP8_BYTES else x


def load_rows(ref, rows, dims, mask):
    """ref[rows, dims] as a [len(rows), len(dims)] tile; masked-off elements read as 0 (and are
    not fetched). Integer indices on both axes: the Pallas interpreter can gather only those."""
    at = ref.at[rows[:, None], dims[None, :]]
    if mask is None:
        return plgpu.load(at)
    return plgpu.load(at, mask=mask, other=0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0)


def fit_block_keys(block_keys: int, *, num_stages: int, query_rows: int, head_dim: int, itemsize: int,
                   compute_itemsize: int | None = None) -> int:  # fmt: skip
    """Halve block_keys until the pipelined K and V tiles (num_stages deep) and the query tile fit
    SHARED_MEMORY_BUDGET: a float32 or d = 256 cache gets shorter steps than a bfloat16 d = 128 one.

    itemsize: the pages' (what the pipelined tiles hold); compute_itemsize: q's, when it differs (a
    float8 cache): the query tile is that wide, and the upcast K and V tiles are counted once more
    at that width, as Triton may stage a dot operand through shared memory."""
    head_block = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))
    compute_itemsize = compute_itemsize or itemsize
    upcast = 2 * compute_itemsize if compute_itemsize != itemsize else 0

    def planned_bytes(keys):
        return (2 * num_stages * keys * itemsize + keys * upcast + query_rows * compute_itemsize) * head_block

    while block_keys > MIN_DOT_DIM and planned_bytes(block_keys) > SHARED_MEMORY_BUDGET:
        block_keys //= 2
    return block_keys


def is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n, at most cap."""
    return min(n & -n, cap)


def validate_paged_inputs(q, k_pages, v_pages, block_tables, seq_lens, *, window) -> None:
    """Shape/dtype checks shared by the decode and ragged entries (q may be [B, H, d] or [T, H, d])."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim]; got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [num_kv_heads, num_pages, page_size, head_dim]; got {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} must equal the pages' head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {num_kv_heads}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported; allowed: float32, bfloat16, float16")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES + KV_ONLY_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported; allowed: float32, bfloat16, float16, "
                             "float8_e4m3fn (or its bytes, uint8)")  # fmt: skip
    mixed = k_pages.dtype != q.dtype and jnp.dtype(k_pages.dtype) not in KV_ONLY_DTYPES
    if k_pages.dtype != v_pages.dtype or mixed:
        raise ValueError(f"q, k_pages, v_pages must share a dtype, or the pages be float8_e4m3fn; got {q.dtype}, "
                         f"{k_pages.dtype}, {v_pages.dtype}")  # fmt: skip
    if not is_power_of_2(page_size):
        raise ValueError(f"page_size {page_size} must be a power of two (Triton tiles are powers of two)")
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
        raise ValueError(
            f"block_tables must be int32 [num_seqs, pages_per_seq]; got {block_tables.dtype}{block_tables.shape}"
        )
    if seq_lens.shape != (block_tables.shape[0],) or seq_lens.dtype != jnp.int32:
        raise ValueError(
            f"seq_lens must be int32 [{block_tables.shape[0]}] (one per block_tables row); "
            f"got {seq_lens.dtype}{seq_lens.shape}"
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int; got {window!r}")


def validate_tiling(page_size: int, pages_per_block: int, num_warps: int, num_stages: int) -> None:
    if not is_power_of_2(pages_per_block):
        raise ValueError(f"pages_per_block {pages_per_block} must be a power of two")
    if pages_per_block * page_size < MIN_DOT_DIM:
        raise ValueError(
            f"pages_per_block * page_size = {pages_per_block * page_size} must be at least {MIN_DOT_DIM} "
            f"(tl.dot tile); use pages_per_block >= {pl.cdiv(MIN_DOT_DIM, page_size)} for page_size {page_size}"
        )
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps {num_warps} must be one of 1, 2, 4, 8, 16")
    if num_stages < 1:
        raise ValueError(f"num_stages {num_stages} must be >= 1")
