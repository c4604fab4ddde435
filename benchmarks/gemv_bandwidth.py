"""A decode step's projections at two rows: XLA's GEMMs against pallas_kernels/skinny_matmul.py.

Each GPU's weights of one Llama-3.1-8B layer at TP=2 (and at TP=1 with --tp1), two bfloat16 rows.
For each weight shape: 32 distinct weights (a layer stack, more than L2 holds) multiplied in one
jitted program, each by its own rows (kernel_bandwidth.time_calls); the median of REPEATS runs per matmul, and the TB/s of the
weight bytes it streams. XLA's dot first, then the kernel over a grid of tile configurations (the
best three printed), each checked against XLA's result first.

These timings do not predict the engine: XLA's GEMMs reached 0.2-1.8 TB/s here where the engine's
profile shows 3.55 TB/s for the same weights, and the kernel, ahead here at every shape, was slower in
the engine (benchmarks/RESULTS.md, 2026-11-28). Time a change in the engine (gpu_tp.py) before keeping it.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gemv_bandwidth.py --out $OUT     # one GPU
    python benchmarks/gemv_bandwidth.py --smoke --out /tmp/x     # CPU, interpret mode, tiny shapes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

LAYERS = 32
REPEATS = 20
ROWS = 2
# (name, K, N) of one GPU's weights, Llama-3.1-8B (hidden 4096, 32 / 8 heads of 128, MLP 14336).
TP2 = [("wq", 4096, 2048), ("wk|wv", 4096, 512), ("wo", 2048, 4096), ("w_gate|w_up", 4096, 7168), ("w_down", 7168, 4096)]
TP1 = [("wq|wo", 4096, 4096), ("wk|wv", 4096, 1024), ("w_gate|w_up", 4096, 14336), ("w_down", 14336, 4096)]
SMOKE = [("tiny", 256, 128)]


def configs(k: int, n: int, smoke: bool):
    from pallas_kernels.skinny_matmul import SkinnyConfig

    grid = [(32, 128, 1, 4)] if smoke else itertools.product((16, 32, 64), (256, 512), (1, 2, 4), (3, 4))
    for block_n, block_k, split_k, stages in grid:
        if n % block_n == 0 and k % (block_k * split_k) == 0:
            yield SkinnyConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--tp1", action="store_true", help="also TP=1's shapes")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.kernel_bandwidth import time_calls
    from pallas_kernels.skinny_matmul import skinny_matmul

    interpret = jax.default_backend() == "cpu"
    layers, repeats = (2, 2) if args.smoke else (LAYERS, REPEATS)
    shapes = SMOKE if args.smoke else TP2 + (TP1 if args.tp1 else [])
    result = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind, "rows": ROWS, "shapes": {}}
    out = Path(args.out) / "gemv_bandwidth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(0)
    for name, k, n in shapes:
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) for i in range(layers)]
        # Separate arrays, not slices of one: a slice XLA could fuse into its GEMM but not into the kernel.
        xs = [jax.random.normal(jax.random.fold_in(key, 1000 + i), (ROWS, k), jnp.bfloat16) for i in range(layers)]

        calls = list(zip(xs, ws))
        xla_s, want = time_calls(lambda x, w: x @ w, calls, repeats)  # as the model's projections
        want = np.asarray(want, np.float32)
        entry = {"k": k, "n": n, "weight_mb": k * n * 2 / 1e6, "xla_us": xla_s * 1e6, "kernel": []}
        for config in configs(k, n, args.smoke):
            try:
                kernel_s, got = time_calls(lambda x, w, c=config: skinny_matmul(x, w, c, interpret=interpret), calls,
                                           repeats)  # fmt: skip
                got = np.asarray(got, np.float32)
                if not np.allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max()):
                    entry["kernel"].append({"config": config.__dict__, "error": "differs from XLA's dot"})
                    continue
                entry["kernel"].append({"config": config.__dict__, "us": kernel_s * 1e6})
            except Exception as e:  # noqa: BLE001 - a config Triton cannot compile is reported, not fatal
                entry["kernel"].append({"config": config.__dict__, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        result["shapes"][name] = entry
        out.write_text(json.dumps(result, indent=2))
        tbs = lambda us: entry["weight_mb"] / us  # MB / us = TB/s  # noqa: E731
        best = sorted((r for r in entry["kernel"] if "us" in r), key=lambda r: r["us"])[:3]
        print(f"{name:12s} {k:5d} x {n:5d}: XLA {entry['xla_us']:7.2f} us ({tbs(entry['xla_us']):.2f} TB/s); kernel best "
              + "; ".join(f"{r['us']:.2f} us ({tbs(r['us']):.2f} TB/s) {r['config']}" for r in best), flush=True)
        errors = [r for r in entry["kernel"] if "error" in r]
        if errors:
            print(f"  {len(errors)} configs failed, e.g. {errors[0]}", flush=True)


if __name__ == "__main__":
    main()
