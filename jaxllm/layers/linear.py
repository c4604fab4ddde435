"""The layer projections: a float einsum, or a quantized product when the weight is stored quantized.

A projection whose params hold `<name>_scale` beside the weight is a quantized one
(jaxllm/quantization.py makes them), with a float32 scale per output channel:

- float8 E4M3 weight [*in, *out] (FP8): its input is quantized per row (per token: amax over the
  input axes / 448), or, when the params also hold `<name>_input_scale` (a ModelOpt FP8
  checkpoint's calibrated scale), by that one static scale (saturating at +-448); the two fp8
  operands are multiplied with float32 accumulation, and the product is scaled by the row's scale
  times the channel's and cast back to the input's dtype:

      y[t, n] = (sum_k x8[t, k] w8[k, n]) * sx[t] * sw[n]

  A row's quantization depends on that row alone (or on nothing, with a static scale), so a
  request's numbers do not depend on the rest of its batch. On the CPU XLA emulates the fp8
  product (the same numbers); on Hopper it runs fp8 x fp8 dots on the tensor cores, faster than
  bf16 only for large products (benchmarks/fp8_gemm.py). `fp8_linear_reference` is the same
  arithmetic in plain float32, for tests.
  On the GPU a decode-sized product (at most 16 rows) of an fp8 weight runs instead in one Pallas
  kernel that streams the weight once and quantizes the rows in registers
  (pallas_kernels/fp8_matmul.py; `project(..., fp8_kernel=...)`): the same arithmetic, up to the
  order of the float32 sums.
- int8 weight (W8A16, weight-only): the weight widened to the input's dtype inside the product,
  accumulated in float32 and scaled per channel (`weight_only_linear`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.quantization import FP8_DTYPE, FP8_MAX, INPUT_SCALE_SUFFIX, QUANTIZED_PARAMS, SCALE_SUFFIX, absmax_scale


def quantize_rows(x: jax.Array, num_input_axes: int, input_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [..., *in] -> (float8 E4M3 [..., *in], float32 scale [...]): one scale per row (amax / 448),
    or the static `input_scale` for every row."""
    axes = tuple(range(x.ndim - num_input_axes, x.ndim))
    xf = x.astype(jnp.float32)
    if input_scale is None:
        scale = absmax_scale(xf, axes, FP8_MAX, keepdims=True)
    else:
        scale = jnp.full(xf.shape[: x.ndim - num_input_axes] + (1,) * num_input_axes, input_scale, jnp.float32)
    x8 = jnp.clip(xf / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return x8, scale.reshape(x.shape[: x.ndim - num_input_axes])


def fp8_linear(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str, num_input_axes: int,
               input_scale: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """`jnp.einsum(equation, x, w)` for an FP8 weight w ~= w8 * w_scale (w_scale over w's output
    axes), x quantized per row (or by the static `input_scale`). Returns x's dtype."""
    x8, sx = quantize_rows(x, num_input_axes, input_scale)
    y = jnp.einsum(equation, x8, w8, preferred_element_type=jnp.float32)
    rows = sx.reshape(sx.shape + (1,) * (y.ndim - sx.ndim))
    return (y * rows * w_scale).astype(x.dtype)


def fp8_linear_reference(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str,
                         num_input_axes: int, input_scale: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """`fp8_linear` in float32 arithmetic on the dequantized operands (tests' reference)."""
    x8, sx = quantize_rows(x, num_input_axes, input_scale)
    xd = x8.astype(jnp.float32) * sx.reshape(sx.shape + (1,) * num_input_axes)
    wd = w8.astype(jnp.float32) * w_scale
    return jnp.einsum(equation, xd, wd, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def weight_only_linear(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str) -> jax.Array:
    """`jnp.einsum(equation, x, w)` for an int8 or fp8 weight w ~= w8 * w_scale (per output channel),
    weight-only (W8A16): the weight widened to x's dtype inside the product, accumulated in float32,
    then scaled per channel. Returns x's dtype."""
    y = jnp.einsum(equation, x, w8.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w_scale).astype(x.dtype)


# name -> the einsum of the projection (its input axes: quantization.QUANTIZED_PARAMS)
PROJECTIONS = {"wq": "...d,dhk->...hk", "wk": "...d,dhk->...hk", "wv": "...d,dhk->...hk", "wo": "...hk,hkd->...d",
               "w_gate": "...d,df->...f", "w_up": "...d,df->...f", "w_down": "...f,fd->...d"}  # fmt: skip


def fp8_linear_rows(x: jax.Array, w8: jax.Array, w_scale: jax.Array, num_input_axes: int,
                    input_scale: jax.Array | None = None, interpret: bool = False) -> jax.Array:  # fmt: skip
    """`fp8_linear` of a few rows (at most fp8_matmul.MAX_ROWS) through the Pallas kernel: x [..., *in]
    and w8 [*in, *out] flattened to a matrix product, the rows' scales computed here."""
    from pallas_kernels.fp8_matmul import fp8_matmul  # imported when used, as layers/attention.py does

    lead, k = x.shape[: x.ndim - num_input_axes], math.prod(x.shape[x.ndim - num_input_axes :])
    out = w8.shape[num_input_axes:]
    rows = x.reshape(-1, k)
    if input_scale is None:
        sx = absmax_scale(rows, (1,), FP8_MAX)
    else:
        sx = jnp.full((rows.shape[0],), input_scale, jnp.float32)
    y = fp8_matmul(rows, sx, w8.reshape(k, -1), w_scale.reshape(-1), interpret=interpret)
    return y.reshape(lead + out)


FP8_KERNEL_MAX_ROWS = 16  # pallas_kernels/fp8_matmul.py's MAX_ROWS


def fp8_kernel_fits(x: jax.Array, w8: jax.Array, num_input_axes: int) -> bool:
    """Whether `fp8_linear_rows` takes this product: at most MAX_ROWS rows, K and N multiples of 16."""
    rows = math.prod(x.shape[: x.ndim - num_input_axes])
    k = math.prod(w8.shape[:num_input_axes])
    return 1 <= rows <= FP8_KERNEL_MAX_ROWS and k % 16 == 0 and (w8.size // k) % 16 == 0


def project(lp: dict, name: str, x: jax.Array, fp8_kernel: str | None = None) -> jax.Array:
    """Layer projection `name` (wq, wk, wv, wo, w_gate, w_up, w_down) of x with this layer's params
    `lp`: the float einsum, or `fp8_linear` / `int8_linear` when lp holds the weight quantized.

    fp8_kernel: 'gpu' or 'interpret' runs an fp8 product of at most 16 rows through the Pallas kernel
    (`fp8_linear_rows`; the engine's steps on the Pallas backend without tensor parallelism)."""
    scale = lp.get(name + SCALE_SUFFIX)
    if scale is None:
        return jnp.einsum(PROJECTIONS[name], x, lp[name])
    if lp[name].dtype == jnp.int8:  # W8A16: weight-only
        return weight_only_linear(x, lp[name], scale, PROJECTIONS[name])
    num_input_axes, input_scale = QUANTIZED_PARAMS[name], lp.get(name + INPUT_SCALE_SUFFIX)
    if fp8_kernel == "weight_only" and math.prod(x.shape[: x.ndim - num_input_axes]) <= FP8_KERNEL_MAX_ROWS:
        return weight_only_linear(x, lp[name], scale, PROJECTIONS[name])
    if fp8_kernel in ("gpu", "interpret") and fp8_kernel_fits(x, lp[name], num_input_axes):
        return fp8_linear_rows(x, lp[name], scale, num_input_axes, input_scale, interpret=fp8_kernel == "interpret")
    return fp8_linear(x, lp[name], scale, PROJECTIONS[name], num_input_axes, input_scale)
