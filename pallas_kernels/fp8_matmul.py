"""A few rows times an FP8 weight: the decode-sized product of an FP8 projection, streaming the weight.

    y[m, n] = sum_k x8[m, k] * w8[k, n]        x8 [M, K], w8 [K, N] float8 E4M3; y float32

At decode sizes (M a handful of tokens) a projection is one pass over its weight, so its time is
the weight's bytes over the memory bandwidth: an FP8 weight's pass could take half a bf16 one's.
XLA does not get there (benchmarks/RESULTS.md "FP8"): at M = 1 its fp8 x fp8 dot is 1.6x slower
than bf16, and a weight-only convert is a separate pass. This kernel reads each weight byte once,
upcasts its tiles to bf16 in registers (float8 values and their products are exact in bf16 and
float32) and accumulates in float32, so its result is the fp8 product up to the order of the sums.

Layout: a program per (BN columns, one of S slices of K): it walks its slice in BK-row tiles of the
weight, the rows of x padded to 16 (Triton's smallest dot), and writes its partial sums; the S
partials are added after (`fp8_matmul`). S is chosen so the programs fill the GPU (at least
TARGET_PROGRAMS) when N alone gives too few, as a decode's projections do (N = 4096: 32 column
blocks). `fp8_matmul_reference` is the plain-jnp product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._tiles import MIN_DOT_DIM, pow2_divisor

FP8 = jnp.dtype(jnp.float8_e4m3fn)
MAX_ROWS = 16  # the rows of x one call takes (decode steps); larger products are XLA's
BLOCK_N, BLOCK_K = 128, 256
TARGET_PROGRAMS = 264  # two per multiprocessor of an H100 / H200 (132)


def _fp8_matmul_kernel(x_ref, w_ref, out_ref, *, block_k: int):
    """x_ref [16, Ks], w_ref [Ks, BN] (this program's slice of K and its columns); out_ref [1, 16, BN]."""
    rows, slice_k = x_ref.shape
    block_n = w_ref.shape[1]
    row_ids, col_ids = jnp.arange(rows), jnp.arange(block_n)

    def body(i, acc):
        ks = i * block_k + jnp.arange(block_k)
        x = plgpu.load(x_ref.at[row_ids[:, None], ks[None, :]]).astype(jnp.bfloat16)  # [16, BK]
        w = plgpu.load(w_ref.at[ks[:, None], col_ids[None, :]]).astype(jnp.bfloat16)  # [BK, BN]
        return acc + plgpu.dot(x, w)

    acc = jax.lax.fori_loop(0, slice_k // block_k, body, jnp.zeros((rows, block_n), jnp.float32))
    plgpu.store(out_ref.at[0, row_ids[:, None], col_ids[None, :]], acc)


def plan(num_rows: int, k: int, n: int) -> tuple[int, int, int]:
    """(block_n, block_k, splits of K) for x [num_rows, k] @ w [k, n]."""
    block_n = pow2_divisor(n, BLOCK_N)
    splits = 1
    # halve the slices of K while the programs are too few and a slice stays whole tiles of 16 rows
    while (n // block_n) * splits < TARGET_PROGRAMS and k % (splits * 2 * MIN_DOT_DIM) == 0:
        splits *= 2
    return block_n, pow2_divisor(k // splits, BLOCK_K), splits


def fp8_matmul(x8: jax.Array, w8: jax.Array, *, interpret: bool = False) -> jax.Array:
    """x8 [M, K] @ w8 [K, N] (both float8 E4M3, M <= 16) -> float32 [M, N], the weight read once.

    K and N must be multiples of 16 (the weight's tiles); x is padded to 16 rows.
    """
    (m, k), (k2, n) = x8.shape, w8.shape
    if x8.dtype != FP8 or w8.dtype != FP8:
        raise ValueError(f"fp8_matmul takes float8_e4m3fn operands; got {x8.dtype} and {w8.dtype}")
    if k != k2 or not 1 <= m <= MAX_ROWS or k % MIN_DOT_DIM or n % MIN_DOT_DIM:
        raise ValueError(f"fp8_matmul: x {x8.shape} @ w {w8.shape} needs equal K, 1 <= M <= {MAX_ROWS} and K, N "
                         f"multiples of {MIN_DOT_DIM}")  # fmt: skip
    block_n, block_k, splits = plan(m, k, n)
    slice_k = k // splits
    x = jnp.pad(x8, ((0, MAX_ROWS - m), (0, 0)))
    partial = pl.pallas_call(
        functools.partial(_fp8_matmul_kernel, block_k=block_k),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((MAX_ROWS, slice_k), lambda j, s: (0, s)),
                  pl.BlockSpec((slice_k, block_n), lambda j, s: (s, j))],  # fmt: skip
        out_specs=pl.BlockSpec((1, MAX_ROWS, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, MAX_ROWS, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="fp8_matmul",
    )(x, w8)
    return partial.sum(axis=0)[:m]


def fp8_matmul_reference(x8: jax.Array, w8: jax.Array) -> jax.Array:
    """Plain-jnp `fp8_matmul`: the float32 product of the two float8 operands."""
    return jnp.dot(x8.astype(jnp.float32), w8.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
