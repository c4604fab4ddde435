"""The layer projections: a float einsum, or a quantized product when the weight is stored quantized.

A projection whose params hold `<name>_scale` beside the weight is a quantized one
(jaxllm/quantization.py makes them), with a float32 scale per output channel (W4A16: per output
channel and group of input channels):

- float8 E4M3 weight [*in, *out] (FP8): its input is quantized per row (per token: amax over the
  input axes / 448), or, when the params also hold `<name>_input_scale` (a ModelOpt FP8
  checkpoint's calibrated scale), by that one static scale (saturating at +-448); the two fp8
  operands are multiplied with float32 accumulation into the input's dtype, and the product is
  scaled (in float32) by the row's scale times the channel's and cast back to the input's dtype:

      y[t, n] = (sum_k x8[t, k] w8[k, n]) * sx[t] * sw[n]

  A row's quantization depends on that row alone (or on nothing, with a static scale), so a
  request's numbers do not depend on the rest of its batch. On the CPU XLA emulates the fp8
  product (the same numbers); on Hopper it runs fp8 x fp8 dots on the tensor cores, faster than
  bf16 only for large products (benchmarks/fp8_gemm.py). `fp8_linear_reference` is the same
  arithmetic in plain float32, for tests.
  On GPUs a decode-sized product (at most WEIGHT_ONLY_MAX_ROWS rows) of an fp8 weight is computed
  weight-only instead (`project(..., weight_only_rows=...)`): the rows stay in their dtype and the
  fp8 weight is widened inside XLA's GEMM, which then reads half of bf16's bytes (H200, Llama-3.1-8B
  shape, batch 1: 3.61 ms a token against bf16's 4.21; XLA's fp8 x fp8 dot at those sizes, and a
  Pallas kernel streaming the fp8 weight, took 7.2: benchmarks/RESULTS.md "FP8 decode"). Those
  rows' activations are then not rounded to fp8, so their numbers are closer to bf16's.
  The engine stores fp8 weights with their input axes last (TRANSPOSED_SUFFIX below), which both
  products read faster on GPUs (H100: batch 1 3.48 ms a token against 3.82, TTFT of 2,048 tokens
  44 ms against 50; benchmarks/RESULTS.md "FP8 weights stored input axes last").
- int8 or int4 weight (W8A16, W4A16: weight-only): the weight widened to the input's dtype inside
  the product, accumulated in float32 and scaled per channel (`weight_only_linear`); W4A16's group
  scales (and, with has_zero_point, offsets `<name>_zero`) dequantize the weight before the product
  (`dequantize_groups`), except in GPU decode steps, where groups of 128 channels and more (smaller
  ones in steps of at most SMALL_GROUP_DOT_ROWS rows) are a batch of dots, one a group, scaled after
  (`grouped_linear`, GROUPED_DOTS): XLA would otherwise write a dequantized copy of the weight in
  every step. On GPUs W8A16's and W4A16's weights are stored input axes last too
  (`stores_input_last`, WEIGHT_ONLY_INPUT_LAST), as fp8 ones are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.quantization import (FP8_DTYPE, FP8_MAX, INPUT_SCALE_SUFFIX, QUANTIZED_PARAMS, SCALE_SUFFIX,
                                 WEIGHT_ONLY_DTYPES, ZERO_SUFFIX, absmax_scale)


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
    # The dot accumulates in float32 and writes x's dtype (cuBLASLt's FP8 GEMM writes a bf16
    # product: half the bytes of a float32 one, for the pass that scales it to read; H100, 2,048
    # rows, the layer's four products 975 -> 849 us: benchmarks/RESULTS.md, "... FP8 products
    # written in bf16"); the scales apply in float32 after.
    y = jnp.einsum(equation, x8, w8, preferred_element_type=x.dtype).astype(jnp.float32)
    rows = sx.reshape(sx.shape + (1,) * (y.ndim - sx.ndim))
    return (y * rows * w_scale).astype(x.dtype)


def fp8_linear_reference(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str,
                         num_input_axes: int, input_scale: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """`fp8_linear` in float32 arithmetic on the dequantized operands (tests' reference)."""
    x8, sx = quantize_rows(x, num_input_axes, input_scale)
    xd = x8.astype(jnp.float32) * sx.reshape(sx.shape + (1,) * num_input_axes)
    wd = w8.astype(jnp.float32) * w_scale
    return jnp.einsum(equation, xd, wd, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def _split_groups(shape: tuple, axis: int, groups: int) -> tuple:
    """A weight's shape with its axis `axis` (the last input axis) split into (groups, its size / groups)."""
    return tuple(shape[:axis]) + (groups, shape[axis] // groups) + tuple(shape[axis + 1 :])


def _grouped_axis(w: jax.Array, num_input_axes: int, input_last: bool) -> int:
    """The axis of a weight [*in, *out] (input_last: [*out, *in]) its groups split: the last input axis."""
    return w.ndim - 1 if input_last else num_input_axes - 1


def _group_size(w, w_scale, num_input_axes: int, input_last: bool = False) -> int:
    """The input channels of a group of weight `w` whose scales `w_scale` are [*in[:-1], groups, *out]."""
    return w.shape[_grouped_axis(w, num_input_axes, input_last)] // w_scale.shape[num_input_axes - 1]


def dequantize_groups(w8: jax.Array, w_scale: jax.Array, num_input_axes: int, dtype,
                      zero: jax.Array | None = None, input_last: bool = False) -> jax.Array:  # fmt: skip
    """An int weight [*in, *out] times its group scales [*in[:-1], groups, *out] (quantization.py:
    scale_shape), plus the groups' offsets `zero` (asymmetric W4A16), in `dtype`. With `input_last`
    the weight is stored [*out, *in] (TRANSPOSED_SUFFIX; the scales and offsets are not) and the
    result is too."""
    if input_last:
        w_scale = transpose_input_last(w_scale, num_input_axes)
        zero = None if zero is None else transpose_input_last(zero, num_input_axes)
    axis = _grouped_axis(w8, num_input_axes, input_last)
    w = w8.reshape(_split_groups(w8.shape, axis, w_scale.shape[axis])).astype(jnp.float32)
    w = w * jnp.expand_dims(w_scale, axis + 1)
    if zero is not None:
        w = w + jnp.expand_dims(zero, axis + 1)
    return w.reshape(w8.shape).astype(dtype)


def grouped_linear(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str, num_input_axes: int,
                   zero: jax.Array | None = None, input_last: bool = False) -> jax.Array:  # fmt: skip
    """`weight_only_linear` of a weight with a scale per group of its last input axis (W4A16), as a
    batch of dots, one a group: the int weight widened to x's dtype for each group's dot (no scaled
    copy of the weight is made), the float32 products scaled by their groups' scales and summed over the
    groups; the offsets `zero` add each group's sum of x times them. The products hold a row's value
    for every group and output channel, so this is for decode-sized steps (`project`'s
    weight_only_rows). The weight is stored [*in, *out] (`equation` as PROJECTIONS has it), or with
    `input_last` [*out, *in] (`equation` as `_input_last` makes it); the scales [*in[:-1], groups, *out]."""
    xs, rest = equation.split(",")
    ws, out = rest.split("->")
    if input_last:
        outer, head, last = ws[:-num_input_axes], ws[-num_input_axes:-1], ws[-1]
    else:
        head, last, outer = ws[: num_input_axes - 1], ws[num_input_axes - 1], ws[num_input_axes:]
    groups = w_scale.shape[num_input_axes - 1]
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    wg = w8.reshape(_split_groups(w8.shape, _grouped_axis(w8, num_input_axes, input_last), groups))
    wsub = f"{outer}{head}Z{last}" if input_last else f"{head}Z{last}{outer}"
    products = jnp.einsum(f"{xs[:-1]}Z{last},{wsub}->{xs[:-num_input_axes]}{head}Z{outer}", xg,
                          wg.astype(x.dtype), preferred_element_type=jnp.float32)  # fmt: skip
    y = jnp.einsum(f"{xs[:-num_input_axes]}{head}Z{outer},{head}Z{outer}->{out}", products, w_scale)
    if zero is not None:
        sums = jnp.sum(xg.astype(jnp.float32), axis=-1)  # [..., *in[:-1], groups]
        y = y + jnp.einsum(f"{xs[:-1]}Z,{head}Z{outer}->{out}", sums, zero)
    return y.astype(x.dtype)


# Whether decode-sized W4A16 products (GPU steps of at most WEIGHT_ONLY_MAX_ROWS rows) with groups of
# at least GROUPED_MIN_GROUP input channels are `grouped_linear`'s batch of dots (True), or dequantize
# the weight first, as other W4A16 products do (False). Dequantized first, XLA writes a bf16 copy of
# the weight in every step: on an H100 the Llama-3.1-8B shape's batch-1 decode in W4A16 (groups of
# 128) took 4.13 ms a token with the batch of dots against 14.87 without, a layer's products 170.9 us
# against 412.0 at one row; groups of 128 with offsets (GPTQ's usual), weights stored input axes
# last, 3.96 against 14.50. Smaller groups lost as dots in the checkpoint's layout (32 with offsets:
# 456.4 against 434.1 us a layer) and take them only stored input axes last, in small steps
# (SMALL_GROUP_DOT_ROWS). int8 groups (W8A16_GPTQ) were not measured as dots and keep the dequantized
# form (benchmarks/RESULTS.md, "W4A16 decode products as a batch of dots", "Weight-only weights stored
# input axes last").
GROUPED_DOTS = [True]
GROUPED_MIN_GROUP = 128
# Smaller int4 groups (GGUF's 4-bit blocks: 32 channels) are group dots too in steps of at most this
# many rows, when stored input axes last (on GPUs: stores_input_last; 0: never, and such weights
# keep the checkpoint's layout). H100, Llama-3.1-8B shape, groups of 32 with offsets: batch-1 decode
# (a 2-row step) 15.07 -> 7.10 ms a token, TTFT 128 / 2,048 24.1 / 68.5 -> 25.1 / 71.8 ms; a layer's
# products as dots against dequantized first, us: 249 / 478 at 2 rows, 351 / 474 at 8, 590 / 504 at
# 16, and dequantized stored so 599 at 16 (benchmarks/RESULTS.md, "Weight-only weights stored input
# axes last").
SMALL_GROUP_DOT_ROWS = 8


def weight_only_linear(x: jax.Array, w8: jax.Array, w_scale: jax.Array, equation: str, num_input_axes: int = 1,
                       zero: jax.Array | None = None, input_last: bool = False) -> jax.Array:  # fmt: skip
    """`jnp.einsum(equation, x, w)` for an int8, int4 or fp8 weight w ~= w8 * w_scale (per output
    channel), weight-only (W8A16, W4A16): the weight widened to x's dtype inside the product,
    accumulated in float32, then scaled per channel; with a scale per group of the last input axis
    (W4A16's: w_scale has w8's rank) the weight is dequantized before the product (`input_last`: it
    is stored [*out, *in], see dequantize_groups). Returns x's dtype."""
    if w_scale.ndim == w8.ndim:  # a scale per group of the last input axis (W4A16): dequantized first
        w = dequantize_groups(w8, w_scale, num_input_axes, x.dtype, zero, input_last)
        return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum(equation, x, w8.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w_scale).astype(x.dtype)


# name -> the einsum of the projection (its input axes: quantization.QUANTIZED_PARAMS), and the
# engine's fused ones (models/params.py: FUSED_PROJECTIONS; one input axis each)
PROJECTIONS = {"wq": "...d,dhk->...hk", "wk": "...d,dhk->...hk", "wv": "...d,dhk->...hk", "wo": "...hk,hkd->...d",
               "w_gate": "...d,df->...f", "w_up": "...d,df->...f", "w_down": "...f,fd->...d",
               "wqkv": "...d,dkgh->...kgh", "w_gate_up": "...d,dsf->...sf"}  # fmt: skip
INPUT_AXES = {**QUANTIZED_PARAMS, "wqkv": 1, "w_gate_up": 1}


# The most rows an FP8 product computes weight-only on GPUs (`project`'s weight_only_rows): decode steps.
WEIGHT_ONLY_MAX_ROWS = 16

# A projection weight stored with its input axes last ([*out, *in]) is held as `<name>_t` (the
# engine's layout of fp8 weights: models/params.py transpose_layer). XLA's GPU GEMMs read an
# fp8 weight faster that way, the input axis contiguous: the Llama-3.1-8B layer's weight-only product
# at one row 128 us against 163, and cuBLASLt's FP8 GEMM, which takes both operands K-major, 739 us
# against 883 at 2,048 rows (H100; benchmarks/RESULTS.md, "FP8 weights stored input axes last").
TRANSPOSED_SUFFIX = "_t"

# Which weight-only formats the engine stores input axes last too (their scales and offsets keep the
# checkpoint's layout): W8A16's int8 weights with a scale per output channel, as fp8 ones, and W4A16's
# int4 weights (groups under GROUPED_MIN_GROUP channels while SMALL_GROUP_DOT_ROWS > 0), whose batch
# of group dots a decode step computes (`grouped_linear`) then reads each group's channels
# contiguous. H100, Llama-3.1-8B shape, batch-1 decode: W4A16 (groups of 128) 4.10 -> 3.43 ms a
# token, with offsets 4.53 -> 3.96, W8A16 3.81 -> 3.40; prefill 0.2-2.6 ms slower
# (benchmarks/RESULTS.md, "Weight-only weights stored input axes last"). None: on GPUs only
# (jax.default_backend()), since the CPU's XLA reads an int8 weight stored so far slower: SmolLM2 in
# W8A16 decoded at 84-89 ms a token that way against 39-41 (2 cores, float32).
WEIGHT_ONLY_INPUT_LAST: dict[str, bool | None] = {"int8": None, "int4": None}


def stores_input_last(w, scale, num_input_axes: int) -> bool:
    """Whether the engine stores a projection weight `w` (with its scale, or None) input axes last:
    every float8 weight, and (WEIGHT_ONLY_INPUT_LAST) W8A16's int8 ones (a scale per output channel)
    and W4A16's int4 ones (groups under GROUPED_MIN_GROUP channels only while SMALL_GROUP_DOT_ROWS >
    0). `w` and `scale` may be arrays or jax.ShapeDtypeStructs."""
    if w.dtype == FP8_DTYPE:
        return True
    switch = WEIGHT_ONLY_INPUT_LAST.get(jnp.dtype(w.dtype).name, False)
    if scale is None or not (jax.default_backend() == "gpu" if switch is None else switch):
        return False
    if len(scale.shape) < len(w.shape):  # a scale per output channel (W8A16)
        return w.dtype == jnp.int8
    small_groups = SMALL_GROUP_DOT_ROWS > 0
    return w.dtype == jnp.int4 and (small_groups or _group_size(w, scale, num_input_axes) >= GROUPED_MIN_GROUP)


def holds(lp: dict, name: str) -> bool:
    """Whether a layer's params hold projection `name`, in either layout."""
    return name in lp or name + TRANSPOSED_SUFFIX in lp


def _input_last(equation: str, num_input_axes: int) -> str:
    """A projection's einsum for its weight stored input axes last: "...d,dhk->...hk" -> "...d,hkd->...hk"."""
    x, rest = equation.split(",")
    w, out = rest.split("->")
    return f"{x},{w[num_input_axes:] + w[:num_input_axes]}->{out}"


def transpose_input_last(w: jax.Array, num_input_axes: int) -> jax.Array:
    """A weight [*in, *out] -> [*out, *in]."""
    return jnp.transpose(w, tuple(range(num_input_axes, w.ndim)) + tuple(range(num_input_axes)))


def transpose_input_first(w: jax.Array, num_input_axes: int) -> jax.Array:
    """Inverse of transpose_input_last: [*out, *in] -> [*in, *out]."""
    n = w.ndim - num_input_axes
    return jnp.transpose(w, tuple(range(n, w.ndim)) + tuple(range(n)))


def project(lp: dict, name: str, x: jax.Array, weight_only_rows: int = 0) -> jax.Array:
    """Layer projection `name` (wq, wk, wv, wo, w_gate, w_up, w_down, or fused wqkv, w_gate_up) of x
    with this layer's params `lp`: the float einsum, or `fp8_linear` / `weight_only_linear` when lp
    holds the weight quantized.

    weight_only_rows: an fp8 product of at most this many rows is computed weight-only (the engine's
    steps on GPUs pass WEIGHT_ONLY_MAX_ROWS; 0: never)."""
    num_input_axes = INPUT_AXES[name]
    w, equation, input_last = lp.get(name), PROJECTIONS[name], name not in lp
    if input_last:  # stored input axes last (TRANSPOSED_SUFFIX)
        w, equation = lp[name + TRANSPOSED_SUFFIX], _input_last(equation, num_input_axes)
    scale = lp.get(name + SCALE_SUFFIX)
    if scale is None:
        return jnp.einsum(equation, x, w)
    rows = math.prod(x.shape[: x.ndim - num_input_axes])
    zero = lp.get(name + ZERO_SUFFIX)
    if w.dtype == jnp.int4 and scale.ndim == w.ndim and rows <= weight_only_rows and GROUPED_DOTS[0]:
        group = _group_size(w, scale, num_input_axes, input_last)
        if group >= GROUPED_MIN_GROUP or (input_last and rows <= SMALL_GROUP_DOT_ROWS):
            return grouped_linear(x, w, scale, equation, num_input_axes, zero, input_last)
    if w.dtype in WEIGHT_ONLY_DTYPES or rows <= weight_only_rows:  # W8A16 / W4A16, or an FP8 decode
        return weight_only_linear(x, w, scale, equation, num_input_axes, zero, input_last)
    return fp8_linear(x, w, scale, equation, num_input_axes, lp.get(name + INPUT_SCALE_SUFFIX))
