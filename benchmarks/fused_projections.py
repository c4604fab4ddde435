"""Fused projections on the GPU: one QKV product and one gate/up product a layer, against three and two.

The mix of issue 21 is device-bound, and ~13 kernels run a layer, most of them GEMMs on few rows
(benchmarks/RESULTS.md "The mix is device-bound"). This times a stack of decoder layers of the
Llama-3.1-8B shape (distinct random weights a layer: more than the L2 holds) without attention
(a stand-in reads q, k and v elementwise), for token counts from a decode batch to a prefill chunk:

  separate    wq, wk, wv, w_gate, w_up each its own product (the checkpoint's layout, which the engine
              served until a5093d0), q and k rotated apart
  fused       one [D, K, G+2, d] product for q, k and v (grouped by KV head, so a split of the KV
              heads keeps its own q, k and v) and one [D, 2, F] product for gate and up
(q, k and v pass an optimization barrier before the stand-in attention, as they reach the engine's
attention kernels unfused.) Three forms of the rotation after the fused product (q and k as one
array; each half apart with half-width tables; the tables gathered from one made outside the step)
were timed with it and moved nothing beyond 3% (benchmarks/RESULTS.md "Fused projections"; the
script that timed them is in git history, 7ea4c76).

Each variant is checked against `separate` (same weights, rel. error) and timed: median of 20
calls after two warm-ups (ms for the stack), compile time beside. Prints one table; the figures
go to $OUT/fused_projections.json.

    python benchmarks/fused_projections.py [--layers 32] [--ms 64,256,512,2048,8192] [--small]
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

from jaxllm.layers.norms import rms_norm
from jaxllm.layers.rope import apply_rotary, rotary_cos_sin
from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.models.params import fuse_layer, split_fused


def make_layers(key, L, D, H, K, d, F, dtype):
    layers = []
    for i in range(L):
        ks = jax.random.split(jax.random.fold_in(key, i), 6)
        n = lambda k, s: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype)  # noqa: E731
        layers.append({"wq": n(ks[0], (D, H, d)), "wk": n(ks[1], (D, K, d)), "wv": n(ks[2], (D, K, d)),
                       "wo": n(ks[3], (H, d, D)), "w_gate": n(ks[4], (D, F)), "w_up": n(ks[5], (D, F)),
                       "w_down": n(jax.random.fold_in(ks[5], 1), (F, D)),
                       "attn_norm": jnp.ones((D,), dtype), "mlp_norm": jnp.ones((D,), dtype)})  # fmt: skip
    return layers


def stand_in_attention(q, k, v, G):
    # [T, H, d] from q and [T, K, d] k, v: elementwise, so every output is read; the barrier keeps
    # the rotation out of it, as the engine's attention kernels do
    q, k, v = jax.lax.optimization_barrier((q, k, v))
    return q + jnp.repeat(k * v, G, axis=1)


def layer_separate(lp, x, cos, sin, G):
    h = rms_norm(x, lp["attn_norm"], 1e-5, 0.0)
    q = jnp.einsum("td,dhk->thk", h, lp["wq"])
    k = jnp.einsum("td,dhk->thk", h, lp["wk"])
    v = jnp.einsum("td,dhk->thk", h, lp["wv"])
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = stand_in_attention(q, k, v, G)
    x = x + jnp.einsum("thk,hkd->td", a, lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], 1e-5, 0.0)
    g = jnp.einsum("td,df->tf", h, lp["w_gate"])
    u = jnp.einsum("td,df->tf", h, lp["w_up"])
    return x + jnp.einsum("tf,fd->td", jax.nn.silu(g) * u, lp["w_down"])


def layer_fused(lp, x, cos, sin, G, cfg):
    h = rms_norm(x, lp["attn_norm"], 1e-5, 0.0)
    q, k, v = split_fused(cfg, "wqkv", jnp.einsum("td,dkgh->tkgh", h, lp["wqkv"]))  # from [T, K, G+2, d]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = stand_in_attention(q, k, v, G)
    x = x + jnp.einsum("thk,hkd->td", a, lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], 1e-5, 0.0)
    gu = jnp.einsum("td,dsf->tsf", h, lp["w_gate_up"])
    return x + jnp.einsum("tf,fd->td", jax.nn.silu(gu[:, 0]) * gu[:, 1], lp["w_down"])


def make_stack(variant, cfg):
    G, rope, d = cfg.q_per_kv, cfg.rope, cfg.head_dim

    @jax.jit
    def stack(layers, x, positions):
        cos, sin = rotary_cos_sin(positions, rope, d, x.dtype)
        for lp in layers:
            x = layer_separate(lp, x, cos, sin, G) if variant == "separate" else layer_fused(lp, x, cos, sin, G, cfg)
        return x

    return stack


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ms", default="16,64,128,256,512,2048,8192")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="a tiny shape (a check on the CPU)")
    args = ap.parse_args()
    D, H, K, d, F = (64, 4, 2, 16, 128) if args.small else (4096, 32, 8, 128, 14336)
    dtype = jnp.bfloat16
    # the model's shape, for the engine's fused layout (models/params.py fuse_layer)
    cfg = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=1, hidden_size=D,
                      intermediate_size=F, num_layers=args.layers, num_heads=H, num_kv_heads=K, head_dim=d,
                      rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0))  # fmt: skip
    layers = make_layers(jax.random.key(0), args.layers, D, H, K, d, F, dtype)
    fused = [fuse_layer(lp, cfg) for lp in layers]
    jax.block_until_ready(fused)
    variants = {"separate": layers, "fused": fused}
    rows = []
    for m in [int(s) for s in args.ms.split(",")]:
        xs = [jax.random.normal(jax.random.key(100 + i), (m, D), jnp.float32).astype(dtype) for i in range(2)]
        positions = jnp.asarray(np.random.default_rng(m).integers(0, 4096, m), jnp.int32)
        ref = None
        for name, params in variants.items():
            fn = make_stack(name, cfg)
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(params, xs[0], positions))
            first = time.perf_counter() - t0
            out32 = np.asarray(out.astype(jnp.float32))
            if ref is None:
                ref = out32
            err = float(np.linalg.norm(out32 - ref) / max(np.linalg.norm(ref), 1e-30))
            jax.block_until_ready(fn(params, xs[1], positions))
            times = []
            for r in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, xs[r % 2], positions))
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            rows.append({"m": m, "variant": name, "ms": ms, "first_call_s": first, "rel_err_vs_separate": err,
                         "finite": bool(np.isfinite(out32).all())})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "fused_projections.json"), "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "layers": args.layers,
                       "shape": {"D": D, "H": H, "K": K, "d": d, "F": F}, "rows": rows}, f, indent=1)  # fmt: skip
    print(f"\n{jax.devices()[0].device_kind}, {args.layers} layers, ms for the stack (median of {args.reps})")
    names = list(variants)
    print("| tokens | " + " | ".join(names) + " | fused / separate | rel. err (" + ", ".join(names[1:]) + ") |")
    print("|---" * (len(names) + 3) + "|")
    by = {(r["m"], r["variant"]): r for r in rows}
    for m in sorted({r["m"] for r in rows}):
        cells = " | ".join(f"{by[(m, n)]['ms']:.3f}" for n in names)
        errs = ", ".join(f"{by[(m, n)]['rel_err_vs_separate']:.0e}" for n in names[1:])
        print(f"| {m} | {cells} | {by[(m, 'fused')]['ms'] / by[(m, 'separate')]['ms']:.3f} | {errs} |")


if __name__ == "__main__":
    main()
