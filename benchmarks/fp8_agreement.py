"""FP8 against bf16 on a model shape with random weights (issue 26's "on the 8B shape"), on the GPU.

The same random tokens, teacher-forced through the whole model (`forward_dense`): the bf16 model,
and the same weights quantized as `QuantConfig(quant_algo='FP8')` makes them on load (per output channel
E4M3 weights, per-token E4M3 activations, the fp8 x fp8 product: the engine's path for steps of
more than 16 rows) and weight-only (the fp8 weight widened into a bf16 product: its decode steps'
path on GPUs). Reports top-1 agreement with bf16 over every position, the mean change of bf16's top
token's log-probability, the logits' error relative to their spread, and bf16's own margin (top-1
minus top-2 log-probability).

Random weights are no trained model: their logits are flat (small margins, so a small error flips
many positions) and nothing in them damps an error, which grows with depth (`--layers N` keeps the
first N). What transfers is the arithmetic: the same shape and weights give the same errors on the
CPU (XLA's FP8 emulated) and the GPU (cuBLASLt's FP8 GEMM and the weight-only fusion), so the
agreement of real SmolLM2 and Gemma 3 measured on the CPU (tests/test_real_models.py; real
checkpoints cannot travel to the GPU machine) is what the GPU computes too.

    PYTHONUNBUFFERED=1 python benchmarks/fp8_agreement.py [--model llama-3.1-8b] [--batch 4 --length 512]
    python benchmarks/fp8_agreement.py --smoke      # the SmolLM2 shape, 2 x 32 tokens, on the CPU
    python benchmarks/fp8_agreement.py --layers 4   # the 8B shape's first 4 layers
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from common import CONFIGS, default_out, device_name, software_versions, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a shape in benchmarks/configs/")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="the shape's first N layers only (how the error grows with depth)")
    parser.add_argument("--smoke", action="store_true", help="the SmolLM2 shape, 2 x 32 tokens (the CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.length = "smollm2-135m", 2, 32

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.checkpoints import loader
    from jaxllm.models.params import flatten_paths, init_params, unflatten_paths
    from jaxllm.models.transformer import forward_dense
    from jaxllm.quantization import quantize_flat

    resolved = loader.resolve(str(CONFIGS / args.model))
    cfg = loader.read_config(resolved)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers, layer_types=cfg.layer_types[: args.layers])
    fp8_cfg = dataclasses.replace(cfg, quant_algo="FP8_PER_CHANNEL_PER_TOKEN")
    t0 = time.perf_counter()
    params = init_params(cfg, jnp.bfloat16, jax.random.key(args.seed))
    fp8_params = unflatten_paths(quantize_flat(flatten_paths(params), fp8_cfg), fp8_cfg)
    jax.block_until_ready(fp8_params)
    tokens = jnp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.length)),
                         jnp.int32)  # fmt: skip
    print(f"{device_name()}: {args.model} ({cfg.num_layers} layers), {args.batch} x {args.length} tokens; "
          f"weights made in {time.perf_counter() - t0:.1f} s", flush=True)

    def log_probs(p, c, weight_only: bool):
        # weight_only: every fp8 product computed as a decode step's (layers/linear.py: project)
        rows = args.batch * args.length if weight_only else 0
        return jax.jit(lambda p, t: jax.nn.log_softmax(forward_dense(p, t, c, weight_only_rows=rows), -1))(p, tokens)

    ref = log_probs(params, cfg, False)
    top2 = jax.lax.top_k(ref, 2)[0]
    margin = np.asarray(top2[..., 0] - top2[..., 1]).ravel()
    top = jnp.argmax(ref, -1)
    centered = ref - ref.mean(-1, keepdims=True)  # the logits' spread, the relative error's measure
    result = {"device": device_name(), "versions": software_versions(), "model": args.model, "layers": cfg.num_layers,
              "positions": int(top.size),
              "bf16_margin_p10_p50": [float(np.percentile(margin, q)) for q in (10, 50)]}  # fmt: skip
    print(f"bf16's top-1 margin (log-prob) p10 {result['bf16_margin_p10_p50'][0]:.3f}, "
          f"p50 {result['bf16_margin_p10_p50'][1]:.3f}", flush=True)
    for name, weight_only in (("FP8 weights and activations (steps of > 16 rows)", False),
                              ("FP8 weights only (decode steps)", True)):  # fmt: skip
        got = log_probs(fp8_params, fp8_cfg, weight_only)
        agree = float((top == jnp.argmax(got, -1)).mean())
        delta = float(jnp.abs(jnp.take_along_axis(ref - got, top[..., None], -1)).mean())
        # the logits' error relative to their spread: comparable across models, flat or peaked
        error = (got - got.mean(-1, keepdims=True)) - centered
        relative = float(jnp.sqrt(jnp.mean(error**2) / jnp.mean(centered**2)))
        result["weight_only" if weight_only else "fp8"] = {"top1_agreement": agree, "mean_abs_delta_logprob": delta,
                                                           "relative_logit_error": relative}  # fmt: skip
        print(f"{name}: top-1 agreement with bf16 {agree:.4f} over {top.size} positions, "
              f"mean |d logprob| {delta:.4f}, logits' relative error {relative:.4f}", flush=True)
    path = write_json(args.out or f"{default_out()}/fp8_agreement_{args.model}.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
