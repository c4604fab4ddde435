"""x @ w for a few rows of x: the decode step's projections, bound by streaming the weight.

At batch 1 a decode step multiplies two rows by each weight, so the time is the weight's bytes over
the memory bandwidth. XLA's autotuned Triton GEMMs streamed each GPU's half of Llama-3.1-8B's
projections at 3.55 TB/s on an H200 (4.8 TB/s datasheet; benchmarks/RESULTS.md), the 2048 x 4096
output projection at 2.8. This kernel is the alternative to measure: one program per block of
columns (and per slice of K when `split_k` > 1), which walks K in `block_k` steps with Triton's
software pipelining (`num_stages` loads in flight), the rows padded to 16 in registers (masked
loads: no padded copy of x), float32 accumulation.

`jnp.dot(x, w, preferred_element_type=float32)` is the reference; with split_k > 1 the partial
sums are added by XLA after the kernel, in float32.

Not used by the model: every projection of a decode step through it was slower than XLA's GEMMs in
the engine (TP=1 5.02 against 4.47 ms a token, TP=2 3.91 against 3.46, two H200s; benchmarks/RESULTS.md),
although `benchmarks/gemv_bandwidth.py`, timing one product at a time, had it ahead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode_attention import dot_precision, load_rows

MAX_ROWS = 16  # the rows one program holds (Triton's smallest dot); more rows: use a GEMM


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def _kernel(x_ref, w_ref, o_ref, *, rows: int, block_k: int, k_steps: int, precision):
    """x_ref [M, K] whole; w_ref [K, block_n]; o_ref [M, block_n]: this split's partial sums when split_k > 1."""
    row_ids = jnp.arange(MAX_ROWS)
    row_ok = (row_ids < rows)[:, None]
    k0 = pl.program_id(1) * k_steps * block_k

    def body(i, acc):
        ks = k0 + i * block_k + jnp.arange(block_k)
        x = load_rows(x_ref, row_ids, ks, jnp.broadcast_to(row_ok, (MAX_ROWS, block_k)))
        w = w_ref[pl.ds(k0 + i * block_k, block_k), :]
        return acc + plgpu.dot(x.astype(w.dtype), w, precision=precision)

    acc = lax.fori_loop(0, k_steps, body, jnp.zeros((MAX_ROWS, w_ref.shape[1]), jnp.float32))
    cols = jnp.arange(w_ref.shape[1])
    plgpu.store(o_ref.at[row_ids[:, None], cols[None, :]], acc.astype(o_ref.dtype),
                mask=jnp.broadcast_to(row_ok, acc.shape))  # fmt: skip


def skinny_matmul(x: jax.Array, w: jax.Array, config: SkinnyConfig = SkinnyConfig(), *,
                  interpret: bool = False) -> jax.Array:  # fmt: skip
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, for M <= 16 (float32 accumulation)."""
    (rows, k), (k2, n) = x.shape, w.shape
    c = config
    if k != k2 or rows > MAX_ROWS:
        raise ValueError(f"skinny_matmul: x {x.shape} @ w {w.shape} needs matching K and at most {MAX_ROWS} rows")
    if n % c.block_n or k % (c.block_k * c.split_k):
        raise ValueError(f"skinny_matmul: w {w.shape} must split into blocks of {c.block_k * c.split_k} x {c.block_n} "
                         f"(block_k x split_k, block_n)")  # fmt: skip
    k_steps = k // (c.block_k * c.split_k)
    kernel = functools.partial(_kernel, rows=rows, block_k=c.block_k, k_steps=k_steps,
                               precision=dot_precision(w.dtype))  # fmt: skip
    if c.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
        out_spec = pl.BlockSpec((rows, c.block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((c.split_k, rows, n), jnp.float32)
        out_spec = pl.BlockSpec((None, rows, c.block_n), lambda j, s: (s, 0, j))
    out = pl.pallas_call(
        kernel,
        grid=(n // c.block_n, c.split_k),
        in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)), pl.BlockSpec((k, c.block_n), lambda j, s: (0, j))],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name=f"skinny_matmul_n{c.block_n}_k{c.block_k}_s{c.split_k}",
    )(x, w)
    return out if c.split_k == 1 else out.sum(axis=0).astype(x.dtype)
