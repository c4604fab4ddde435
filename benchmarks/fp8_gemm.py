"""FP8 and int4 GEMM formulations for the Llama-3.1-8B layer shapes, against bf16, on the GPU.

Which form of a quantized projection XLA turns into fast code decides how jaxllm's quantized linear is
written (jaxllm/layers/linear.py). Per layer: the fused QKV [4096 -> 6144], wo [4096 -> 4096],
the fused gate/up [4096 -> 28672] and down [14336 -> 4096], over `LAYERS` layers of distinct
weights (more than the L2 holds), for token counts M from batch-1 decode to a prefill chunk.

Variants:
  bf16        x @ w in bf16 (today's path).
  w8-convert  fp8 E4M3 weights, converted to bf16 inside the jitted step and scaled per output
              channel after the dot: what XLA makes of a weight-only dequantization (jaxllm's
              form for decode-sized FP8 products on GPUs: linear.py weight_only_linear).
  w8t-convert the same with the fp8 weight stored transposed, [N, K] (the input axis contiguous).
  w8t-f32scale the same, its bf16 product scaled in float32 (per output channel) before the cast back.
  engine-w8t  jaxllm's weight-only product (float32 accumulation) of the fp8 weight stored [N, K].
  engine-fp8t jaxllm's FP8 product of the fp8 weight stored [N, K] (cuBLASLt's FP8 GEMM reads both
              operands K-major).
  engine-fp8ts engine-fp8t with a static input scale (1: a ModelOpt checkpoint's calibrated one, or the
              engine's for dummy weights): no per-row amax pass.
  fp8ts-bf16out the same fp8 x fp8 dot with a bf16 result (cuBLASLt writes half the bytes of float32),
              scaled per output channel after, in float32, and cast back: the form fp8_linear took
              in 2435bfe, spelled out (engine-fp8ts is the same since; before, its dot wrote float32).
  engine-fp8  jaxllm's own FP8 product (layers/linear.py fp8_linear: rows quantized per token,
              fp8 x fp8 dot accumulated in float32 and written in x's dtype, scaled per row and
              channel after).
  engine-w8   jaxllm's own weight-only product of an fp8 weight (linear.py weight_only_linear).
  fp8-dot     x quantized per tensor on the fly (amax / 448), dot(convert(x8) * sx,
              convert(w8) * sw): the pattern XLA's GEMM rewriter turns into cuBLASLt's FP8 GEMM.
  fp8-native  jax.lax.dot_general on the fp8 operands with a bf16 result, scaled after.
  engine-w4g128, engine-w4g32, engine-w4g32z, engine-w4g128z
              jaxllm's W4A16 (int4 weights, a scale per group of 128 or 32 input channels; z: and an
              offset, asymmetric groups) through linear.weight_only_linear: dequantized in float32
              before the dot.
  w4g32-bf16, w4g32z-bf16
              the same groups of 32 dequantized in bf16 (x's dtype) before the dot.
  w4g128-grouped, w4g32-grouped, w4g128z-grouped, w4g32z-grouped, w4tg128-grouped, w4tg32z-grouped
              the int4 groups as a batch of dots, one a group, the int4 weight widened inside each dot
              (no dequantized copy), the products scaled per group and channel and summed over the
              groups (offsets: the groups' input sums times them); t: the weight stored [N, K].
  engine-w4tg32z
              groups of 32 with offsets stored [N, K], dequantized before the dot.
  w8t-reduce, w8t-reduce-bf16
              the fp8 weight [N, K] times the rows as a multiply and a reduction over K, no dot
              (float32 or bf16 products): a decode's few rows streamed by XLA's reduction emitter.
  bf16-reduce, bf16t-reduce
              the same for bf16 weights stored [K, N] (the engine's) or [N, K].

Prints one table (us per layer, TB/s of the weights' bytes with their scales and offsets, TFLOP/s,
rel. error against a float32 dot of the same bf16 inputs); the full figures go to $OUT/fp8_gemm.json.

    python benchmarks/fp8_gemm.py [--layers 4] [--ms 1,8,32,128,512,2048,8192] [--variants bf16,w8-convert]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import quantization
from jaxllm.layers import linear

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def quantize_weight(w):
    """bf16 [K, N] -> (fp8 [K, N], float32 [N] per-output-channel scale)."""
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0)
    scale = jnp.maximum(amax, 1e-12) / E4M3_MAX
    return (w.astype(jnp.float32) / scale).astype(E4M3), scale


def quantize_weight_tensor(w):
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)))
    scale = jnp.maximum(amax, 1e-12) / E4M3_MAX
    return (w.astype(jnp.float32) / scale).astype(E4M3), scale


def q_act(x):
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    sx = jnp.maximum(amax, 1e-12) / E4M3_MAX
    return (x.astype(jnp.float32) / sx).astype(E4M3), sx


def v_bf16(x, w):
    return x @ w


def v_w8_convert(x, wq):
    w8, s = wq
    return (x @ w8.astype(jnp.bfloat16)) * s.astype(jnp.bfloat16)


def quantize_weight_t(w):
    w8, s = quantize_weight(w)
    return w8.T, s


def v_w8t_convert(x, wq):
    w8t, s = wq
    return jnp.einsum("mk,nk->mn", x, w8t.astype(jnp.bfloat16)) * s.astype(jnp.bfloat16)


def v_w8t_f32scale(x, wq):
    w8t, s = wq
    return (jnp.einsum("mk,nk->mn", x, w8t.astype(x.dtype)).astype(jnp.float32) * s).astype(x.dtype)


def v_engine_w8t(x, wq):
    return linear.weight_only_linear(x, wq[0], wq[1], "mk,nk->mn", 1)


def v_engine_fp8t(x, wq):
    return linear.fp8_linear(x, wq[0], wq[1], "mk,nk->mn", 1)


STATIC_SCALE = jnp.ones((), jnp.float32)


def v_w8t_reduce(x, wq):
    """The product as a multiply and a row reduction over the weight's contiguous input axis (no dot:
    XLA's reduction emitter streams the weight), float32 products."""
    w8t, s = wq
    y = jnp.sum(x.astype(jnp.float32)[:, None, :] * w8t.astype(jnp.float32)[None], axis=-1)
    return (y * s).astype(x.dtype)


def v_w8t_reduce_bf16(x, wq):
    """v_w8t_reduce with bf16 products, summed in float32."""
    w8t, s = wq
    y = jnp.sum(x[:, None, :] * w8t.astype(x.dtype)[None], axis=-1, dtype=jnp.float32)
    return (y * s).astype(x.dtype)


def v_bf16_reduce(x, w):
    """bf16 weights [K, N] as the engine stores them, the product as a multiply and a column reduction."""
    return jnp.sum(x[:, :, None] * w[None], axis=1, dtype=jnp.float32).astype(x.dtype)


def v_bf16t_reduce(x, wt):
    """bf16 weights stored [N, K], the product as a multiply and a row reduction."""
    return jnp.sum(x[:, None, :] * wt[None], axis=-1, dtype=jnp.float32).astype(x.dtype)


def v_engine_fp8ts(x, wq):
    return linear.fp8_linear(x, wq[0], wq[1], "mk,nk->mn", 1, STATIC_SCALE)


def v_fp8ts_bf16out(x, wq):
    w8t, s = wq
    x8, sx = linear.quantize_rows(x, 1, STATIC_SCALE)
    y = jnp.einsum("mk,nk->mn", x8, w8t, preferred_element_type=jnp.bfloat16)
    return (y.astype(jnp.float32) * sx[:, None] * s).astype(x.dtype)


def v_fp8_dot(x, wq):
    w8, sw = wq  # per-tensor weight scale
    x8, sx = q_act(x)
    a = x8.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16)
    b = w8.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16)
    return jnp.dot(a, b, preferred_element_type=jnp.bfloat16)


def v_fp8_native(x, wq):
    w8, sw = wq
    x8, sx = q_act(x)
    y = jax.lax.dot_general(x8, w8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)
    return y * (sx * sw).astype(jnp.bfloat16)


def v_engine_fp8(x, wq):
    return linear.fp8_linear(x, wq[0], wq[1], "mk,kn->mn", 1)


def v_engine_w8(x, wq):
    return linear.weight_only_linear(x, wq[0], wq[1], "mk,kn->mn", 1)


def quantize_w4g128(w):
    return quantization.quantize_int(w, 1, "W4A16", 128)


def quantize_w4g32(w):
    return quantization.quantize_int(w, 1, "W4A16", 32)


def quantize_w4g32z(w):
    return quantization.quantize_int_asymmetric(w, 1, 32)


def quantize_w4g128z(w):
    return quantization.quantize_int_asymmetric(w, 1, 128)


def v_engine_w4(x, wq):
    return linear.weight_only_linear(x, wq[0], wq[1], "mk,kn->mn", 1, *wq[2:])


def v_w4_bf16(x, wq):
    """int4 groups dequantized in x's dtype (bf16 products and sums, no float32 step) before the dot."""
    q, s, *zero = wq
    groups = s.shape[0]
    w = q.reshape(groups, -1, q.shape[1]).astype(x.dtype) * s[:, None].astype(x.dtype)
    if zero:
        w = w + zero[0][:, None].astype(x.dtype)
    return jnp.einsum("mk,kn->mn", x, w.reshape(q.shape), preferred_element_type=jnp.float32).astype(x.dtype)


def v_w4_grouped(x, wq):
    """int4 groups as a batch of dots, one a group: jaxllm's form for GPU decode steps
    (linear.grouped_linear)."""
    return linear.grouped_linear(x, wq[0], wq[1], "mk,kn->mn", 1, *wq[2:])


def quantize_w4t_grouped(quantize):
    def transposed(w):
        q, s, *zero = quantize(w)
        return (q.T, s, *zero)

    return transposed


def v_w4t_grouped(x, wq):
    """linear.grouped_linear's batch of group dots with the int4 weight stored [N, K] (the input axis
    contiguous; the engine's layout on GPUs)."""
    return linear.grouped_linear(x, wq[0], wq[1], "mk,nk->mn", 1, *wq[2:], input_last=True)


def v_engine_w4t(x, wq):
    """The int4 weight stored [N, K], dequantized before the product (linear.weight_only_linear)."""
    return linear.weight_only_linear(x, wq[0], wq[1], "mk,nk->mn", 1, *wq[2:], input_last=True)


W4T_G128, W4T_G32Z = quantize_w4t_grouped(quantize_w4g128), quantize_w4t_grouped(quantize_w4g32z)
VARIANTS = {"bf16": (v_bf16, None), "w8-convert": (v_w8_convert, quantize_weight),
            "w8t-convert": (v_w8t_convert, quantize_weight_t), "w8t-f32scale": (v_w8t_f32scale, quantize_weight_t),
            "engine-w8t": (v_engine_w8t, quantize_weight_t), "engine-fp8t": (v_engine_fp8t, quantize_weight_t),
            "engine-fp8ts": (v_engine_fp8ts, quantize_weight_t), "fp8ts-bf16out": (v_fp8ts_bf16out, quantize_weight_t),
            "engine-fp8": (v_engine_fp8, quantize_weight), "engine-w8": (v_engine_w8, quantize_weight),
            "fp8-dot": (v_fp8_dot, quantize_weight_tensor), "fp8-native": (v_fp8_native, quantize_weight_tensor),
            "engine-w4g128": (v_engine_w4, quantize_w4g128), "engine-w4g32": (v_engine_w4, quantize_w4g32),
            "engine-w4g32z": (v_engine_w4, quantize_w4g32z), "w4g32-bf16": (v_w4_bf16, quantize_w4g32),
            "w4g32z-bf16": (v_w4_bf16, quantize_w4g32z), "w8t-reduce": (v_w8t_reduce, quantize_weight_t),
            "w8t-reduce-bf16": (v_w8t_reduce_bf16, quantize_weight_t), "bf16-reduce": (v_bf16_reduce, None),
            "bf16t-reduce": (v_bf16t_reduce, jnp.transpose), "w4g128-grouped": (v_w4_grouped, quantize_w4g128),
            "w4g32z-grouped": (v_w4_grouped, quantize_w4g32z), "w4tg128-grouped": (v_w4t_grouped, W4T_G128),
            "w4tg32z-grouped": (v_w4t_grouped, W4T_G32Z), "engine-w4g128z": (v_engine_w4, quantize_w4g128z),
            "w4g128z-grouped": (v_w4_grouped, quantize_w4g128z), "w4g32-grouped": (v_w4_grouped, quantize_w4g32),
            "engine-w4tg32z": (v_engine_w4t, W4T_G32Z)}


def chain(fn, consume=False):
    """All layers' four projections, each fed from the last (so none is dead code). consume: each
    product's whole output is summed (read once, as the layer's next operation reads it), not one
    element of it, so what the product writes and any pass over it after the dot are timed too."""

    def run(x, weights):
        acc = jnp.zeros((), jnp.float32)
        for layer in weights:
            for (k, n), w in zip(SHAPES, layer):
                xin = x if k == x.shape[1] else jnp.tile(x, (1, k // x.shape[1] + 1))[:, :k]
                y = fn(xin, w)
                acc = acc + (jnp.sum(y, dtype=jnp.float32) if consume else y[0, 0].astype(jnp.float32))
        return acc

    return jax.jit(run)


def time_fn(f, *args, repeats=30):
    f(*args).block_until_ready()
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ms", default="1,8,32,128,512,2048,8192")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--consume", action="store_true",
                    help="sum each product's whole output (its bytes and any scaling pass timed), not one element")
    ap.add_argument("--json", default="fp8_gemm.json", help="the file under $OUT the figures go to")
    args = ap.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    ms = [int(m) for m in args.ms.split(",")]
    key = jax.random.PRNGKey(0)
    weights = []
    for layer in range(args.layers):
        row = []
        for k, n in SHAPES:
            key, sub = jax.random.split(key)
            row.append((jax.random.normal(sub, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16))
        weights.append(row)
    by_quantizer = {q: ([[q(w) for w in row] for row in weights] if q else weights) for _, q in variants.values()}
    quantized = {name: by_quantizer[q] for name, (_, q) in variants.items()}
    params = sum(k * n for k, n in SHAPES)
    results = []
    outputs = "summed whole" if args.consume else "one element read"
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.layers} layers of "
          f"{params / 1e6:.0f}M; outputs {outputs}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for m in ms:
        key, sub = jax.random.split(key)
        x = jax.random.normal(sub, (m, SHAPES[0][0]), jnp.float32).astype(jnp.bfloat16)
        # accuracy on the first projection alone
        ref = np.asarray(x, np.float32) @ np.asarray(weights[0][0], np.float32)
        for name, (fn, _) in variants.items():
            wq = quantized[name]
            try:
                t0 = time.perf_counter()
                f = chain(fn, args.consume)
                f(x, wq).block_until_ready()
                compile_s = time.perf_counter() - t0
                sec = time_fn(f, x, wq)
                y = np.asarray(jax.jit(fn)(x, wq[0][0]), np.float32)
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            except Exception as e:  # a variant XLA cannot compile: say so and go on
                results.append({"m": m, "variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            per_layer = sec / args.layers
            wbytes = sum(a.on_device_size_in_bytes() for a in jax.tree.leaves(wq)) / args.layers
            print(f"  M={m} {name}: {per_layer * 1e6:.1f} us/layer", flush=True)
            results.append({"m": m, "variant": name, "us_per_layer": per_layer * 1e6, "compile_s": compile_s,
                            "weight_TBps": wbytes / per_layer / 1e12, "TFLOPs": 2 * m * params / per_layer / 1e12,
                            "rel_err": err})
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, args.json), "w") as f:
            json.dump(results, f, indent=1)
    print(f"{'M':>6} {'variant':<13} {'us/layer':>9} {'w TB/s':>7} {'TFLOP/s':>8} {'rel err':>8} {'compile s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['m']:>6} {r['variant']:<13} FAILED {r['error'][:90]}")
        else:
            print(f"{r['m']:>6} {r['variant']:<13} {r['us_per_layer']:>9.1f} {r['weight_TBps']:>7.2f} "
                  f"{r['TFLOPs']:>8.1f} {r['rel_err']:>8.1e} {r['compile_s']:>9.2f}")


if __name__ == "__main__":
    main()
