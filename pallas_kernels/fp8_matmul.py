"""A few rows times an FP8 weight: the decode-sized product of an FP8 projection, streaming the weight.

    y[m, n] = (sum_k q(x)[m, k] * w8[k, n]) * sx[m] * sw[n]
    q(x) = float8_e4m3(clip(x / sx[m], -448, 448))       (quantize_input; else q(x) = x, sx ignored)

x [M, K] (bf16, f16 or f32) with sx [M] its per-row (per-token) scales; w8 [K, N] float8 E4M3 with
sw [N] its per-output-channel scales; y [M, N] in x's dtype. This is jaxllm's `fp8_linear` (the
activation quantized per row by a given scale, the fp8 product accumulated in float32, scaled by row
and channel) in one kernel, or, without quantize_input, an fp8 weight-only product.

At decode sizes (M a handful of tokens) a projection is one pass over its weight, so its time is the
weight's bytes over the memory bandwidth: an FP8 weight's pass can take half a bf16 one's. XLA does
not get there (benchmarks/RESULTS.md "FP8"): at M = 1 its fp8 x fp8 dot is 1.6x slower than bf16, a
weight-only convert is a separate pass, and quantizing the activation is more kernels a projection.
This kernel reads each weight byte once, quantizes its tile of x in registers, upcasts both tiles to
a 16-bit type (float8 values are exact in bf16 and f16, and so are their products in float32) and
accumulates in float32, so its result is the fp8 product up to the order of the sums.

Layout: a program per (BN columns, one of S slices of K): it walks its slice in BK-row tiles of the
weight, the rows of x padded to 16 (Triton's smallest dot), and writes its scaled partial sums; the
S partials are added after. S is chosen so the programs fill the GPU (at least `target_programs`)
when N alone gives too few, as a decode's projections do (N = 4096: 32 column blocks).
`fp8_matmul_reference` is the same arithmetic in plain jnp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._tiles import MIN_DOT_DIM, SUPPORTED_DTYPES, pow2_divisor

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(FP8).max)
MAX_ROWS = 16  # the rows of x one call takes (decode steps); larger products are XLA's


@dataclasses.dataclass(frozen=True)
class Fp8MatmulTiling:
    """How `fp8_matmul` tiles a product (benchmarks/fp8_gemm.py --sweep measures the choices).

    block_n / block_k: the weight tile's columns / rows (powers of two, at most; the largest power of
    two dividing N / the slice of K is taken below them); target_programs: the programs the split of
    K aims for (264: two per multiprocessor of an H100 / H200); compute_dtype: what the fp8 tiles are
    upcast to for the dot ('float16' or 'bfloat16', both exact); form: 'dot' (a tensor-core dot of
    the rows padded to 16 and the weight tile) or 'fma' (each real row's products accumulated in
    float32 on the CUDA cores and summed over K at the end: no padded rows, no operand shuffles; for
    a row or two)."""

    block_n: int = 128
    block_k: int = 256
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 3
    compute_dtype: str = "bfloat16"
    form: str = "dot"


    @property
    def label(self) -> str:
        """'dot:n128k256w4s3p264:bfloat16': the tiling in one word (benchmarks' tables and flags)."""
        return (f"{self.form}:n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}p{self.target_programs}"
                f":{self.compute_dtype}")  # fmt: skip

    @classmethod
    def from_label(cls, label: str) -> "Fp8MatmulTiling":
        import re

        match = re.fullmatch(r"(dot|fma):n(\d+)k(\d+)w(\d+)s(\d+)p(\d+):(bfloat16|float16)", label)
        if match is None:
            raise ValueError(f"fp8_matmul tiling label {label!r} is not like 'dot:n128k256w4s3p264:bfloat16'")
        form, n, k, w, st, p, dtype = match.groups()
        return cls(int(n), int(k), int(p), int(w), int(st), dtype, form)


DEFAULT_TILING = Fp8MatmulTiling()
# The tiling a call of M rows takes when none is given: the first entry with M <= its rows.
TILINGS: list[tuple[int, Fp8MatmulTiling]] = [(MAX_ROWS, DEFAULT_TILING)]


def default_tiling(num_rows: int) -> Fp8MatmulTiling:
    return next(t for rows, t in TILINGS if num_rows <= rows)


def _fp8_matmul_kernel(x_ref, sx_ref, w_ref, sw_ref, out_ref, *, block_k: int, quantize: bool, compute, form: str,
                       num_rows: int):  # fmt: skip
    """x_ref [16, Ks], w_ref [Ks, BN] (this program's slice of K and its columns), sx_ref [16],
    sw_ref [BN]; out_ref [1, 16, BN]: this slice's partial sums, scaled (the 'fma' form writes the
    first num_rows rows only: the caller keeps those)."""
    rows, slice_k = x_ref.shape
    block_n = w_ref.shape[1]
    row_ids, col_ids = jnp.arange(rows), jnp.arange(block_n)
    sx = plgpu.load(sx_ref.at[row_ids])[:, None]  # [16, 1]

    def quantized(x, scale):
        if quantize:
            x = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8)
        return x

    def dot_body(i, acc):
        ks = i * block_k + jnp.arange(block_k)
        x = quantized(plgpu.load(x_ref.at[row_ids[:, None], ks[None, :]]), sx)  # [16, BK]
        w = plgpu.load(w_ref.at[ks[:, None], col_ids[None, :]])  # [BK, BN]
        return acc + plgpu.dot(x.astype(compute), w.astype(compute))

    def fma_body(i, accs):
        ks = i * block_k + jnp.arange(block_k)
        w = plgpu.load(w_ref.at[ks[:, None], col_ids[None, :]]).astype(jnp.float32)  # [BK, BN]
        out = []
        for r, acc in enumerate(accs):  # [BK, BN] products, summed over K once, after the loop
            x = quantized(plgpu.load(x_ref.at[r, ks]), sx_ref[r]).astype(compute).astype(jnp.float32)  # [BK]
            out.append(acc + x[:, None] * w)
        return tuple(out)

    sw = plgpu.load(sw_ref.at[col_ids])
    steps = slice_k // block_k
    if form == "fma":
        zero = jnp.zeros((block_k, block_n), jnp.float32)
        accs = jax.lax.fori_loop(0, steps, fma_body, (zero,) * num_rows)
        for r, acc in enumerate(accs):
            acc = jnp.sum(acc, axis=0)
            plgpu.store(out_ref.at[0, r, col_ids], acc * sx_ref[r] * sw if quantize else acc * sw)
        return
    acc = jax.lax.fori_loop(0, steps, dot_body, jnp.zeros((rows, block_n), jnp.float32))
    if quantize:
        acc = acc * sx
    plgpu.store(out_ref.at[0, row_ids[:, None], col_ids[None, :]], acc * sw[None, :])


def plan(num_rows: int, k: int, n: int, tiling: Fp8MatmulTiling = DEFAULT_TILING) -> tuple[int, int, int]:
    """(block_n, block_k, splits of K) for x [num_rows, k] @ w [k, n]."""
    block_n = pow2_divisor(n, tiling.block_n)
    splits = 1
    # halve the slices of K while the programs are too few and a slice stays whole tiles of 16 rows
    while (n // block_n) * splits < tiling.target_programs and k % (splits * 2 * MIN_DOT_DIM) == 0:
        splits *= 2
    return block_n, pow2_divisor(k // splits, tiling.block_k), splits


def fp8_matmul(x: jax.Array, x_scale: jax.Array, w8: jax.Array, w_scale: jax.Array, *, quantize_input: bool = True,
               tiling: Fp8MatmulTiling | None = None, interpret: bool = False) -> jax.Array:  # fmt: skip
    """x [M, K] (M <= 16) times the FP8 weight w8 [K, N] scaled by w_scale [N], x quantized per row
    by x_scale [M] first (quantize_input): -> [M, N] in x's dtype, the weight read once.

    K and N must be multiples of 16 (the weight's tiles); x is padded to 16 rows. tiling: None is
    the module's DEFAULT_TILING (read at each call).
    """
    tiling = tiling or DEFAULT_TILING
    (m, k), (k2, n) = x.shape, w8.shape
    if w8.dtype != FP8:
        raise ValueError(f"fp8_matmul takes a float8_e4m3fn weight; got {w8.dtype}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"fp8_matmul: x dtype {x.dtype} is not supported; allowed: float32, bfloat16, float16")
    if k != k2 or not 1 <= m <= MAX_ROWS or k % MIN_DOT_DIM or n % MIN_DOT_DIM:
        raise ValueError(f"fp8_matmul: x {x.shape} @ w {w8.shape} needs equal K, 1 <= M <= {MAX_ROWS} and K, N "
                         f"multiples of {MIN_DOT_DIM}")  # fmt: skip
    if x_scale.shape != (m,) or w_scale.shape != (n,):
        raise ValueError(f"fp8_matmul: scales {x_scale.shape} and {w_scale.shape} must be [M] = ({m},) and "
                         f"[N] = ({n},)")  # fmt: skip
    tiling = tiling or default_tiling(m)
    block_n, block_k, splits = plan(m, k, n, tiling)
    slice_k = k // splits
    x_pad = jnp.pad(x, ((0, MAX_ROWS - m), (0, 0)))
    sx_pad = jnp.pad(x_scale.astype(jnp.float32), (0, MAX_ROWS - m), constant_values=1.0)
    if tiling.form not in ("dot", "fma"):
        raise ValueError(f"fp8_matmul: tiling.form {tiling.form!r} is not one of 'dot', 'fma'")
    kernel = functools.partial(_fp8_matmul_kernel, block_k=block_k, quantize=quantize_input,
                               compute=jnp.dtype(tiling.compute_dtype), form=tiling.form, num_rows=m)  # fmt: skip
    partial = pl.pallas_call(
        kernel,
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((MAX_ROWS, slice_k), lambda j, s: (0, s)),
                  pl.BlockSpec((MAX_ROWS,), lambda j, s: (0,)),
                  pl.BlockSpec((slice_k, block_n), lambda j, s: (s, j)),
                  pl.BlockSpec((block_n,), lambda j, s: (j,))],  # fmt: skip
        out_specs=pl.BlockSpec((1, MAX_ROWS, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, MAX_ROWS, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(x_pad, sx_pad, w8, w_scale.astype(jnp.float32))
    return partial.sum(axis=0)[:m].astype(x.dtype)


def fp8_matmul_reference(x: jax.Array, x_scale: jax.Array, w8: jax.Array, w_scale: jax.Array, *,
                         quantize_input: bool = True) -> jax.Array:  # fmt: skip
    """Plain-jnp `fp8_matmul`: the float32 product of the (quantized) rows and the fp8 weight, scaled."""
    xf = x.astype(jnp.float32)
    sx = x_scale.astype(jnp.float32)[:, None]
    if quantize_input:
        xf = jnp.clip(xf / sx, -FP8_MAX, FP8_MAX).astype(FP8).astype(jnp.float32)
    y = jnp.dot(xf, w8.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if quantize_input:
        y = y * sx
    return (y * w_scale.astype(jnp.float32)).astype(x.dtype)
