"""The all-reduce of a tensor-parallel decode step, alone: XLA's psum against the one-shot kernel.

A batch-1 decode step at TP=2 all-reduces [2, hidden] bfloat16 twice a layer, 64 times a step for
Llama-3.1-8B, and each took 6.9 us through NCCL on two H200s (benchmarks/RESULTS.md): 0.44 ms of a
3.4 ms step. This times, on all the machine's GPUs (one process, shard_map over a "tp" axis), a
chain of CHAIN all-reduces, each followed by one small elementwise kernel as in the model, under
XLA's default options and under the one-graph options the engine compiles small TP decodes with
(jaxllm/engine/runner.py, ONE_GRAPH_OPTIONS):

  none     the chain without its all-reduces (the elementwise kernels and launches alone)
  psum     lax.psum (XLA's all-reduce: its own collective kernels by default, NCCL's with the
           one-graph options)
  oneshot  pallas_kernels/all_reduce.py (peer loads over NVLink, no multicast)

Before timing, oneshot's result is compared with psum's, bit for bit, a different partial sum on
every device. Printed: microseconds per
all-reduce, (chain - none) / CHAIN, the median of REPEATS.

These chains do not predict the engine: psum took ~21 us a link here where the engine's profile shows
6.9 us a NCCL all-reduce, and the kernel, ahead here under the one-graph options, was slower in the
engine (benchmarks/RESULTS.md, 2026-11-28). Time a change in the engine (gpu_tp.py) before keeping it.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/allreduce_latency.py --out $OUT   # >= 2 GPUs
    python benchmarks/allreduce_latency.py --smoke --out /tmp/x   # CPU, 2 virtual devices: the script's
        own paths only (the kernel needs GPUs: its check reports the failure and it is not timed)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

if "--smoke" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

CHAIN = 64
REPEATS = 30
SHAPES = [(2, 4096), (2, 8192), (16, 4096)]  # 8B at batch 1 (two rows), 70B at batch 1, 8B at batch 16


def chain_fn(reduce, mesh):
    """CHAIN times: y = reduce(y) * 0.5 + x (a dependent chain; the scale keeps the values bounded)."""
    import jax
    from jax.sharding import PartitionSpec as P

    def body(x):
        y = x
        for _ in range(CHAIN):
            y = (reduce(y) * 0.5 + x).astype(x.dtype)
        return y

    return jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)


def time_us(compiled, x) -> float:
    compiled(x).block_until_ready()
    samples = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        compiled(x).block_until_ready()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jaxllm.engine.buckets import ONE_GRAPH_OPTIONS
    from pallas_kernels.all_reduce import one_shot_all_reduce

    devices = jax.devices()
    if len(devices) < 2 or (devices[0].platform != "gpu" and not args.smoke):
        sys.exit(f"needs two or more GPUs; found {devices}")
    mesh = Mesh(np.array(devices), ("tp",))
    reducers = {
        "none": lambda y: y,
        "psum": lambda y: jax.lax.psum(y, "tp"),
        "oneshot": functools.partial(one_shot_all_reduce, axis_name="tp"),
    }
    result = {"date": time.strftime("%Y-%m-%d"), "device": devices[0].device_kind, "devices": len(devices),
              "chain": CHAIN, "us_per_all_reduce": {}, "checks": {}}  # fmt: skip
    out = Path(args.out) / "allreduce_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.bfloat16)
        # The check: a different partial sum on every device (one slice each of a stacked array).
        parts = jax.device_put(jnp.asarray(np.random.default_rng(1).normal(size=(len(devices), *shape)), jnp.bfloat16),
                               jax.sharding.NamedSharding(mesh, P("tp")))  # fmt: skip
        once = {name: jax.jit(jax.shard_map(lambda a, fn=fn: fn(a[0])[None], mesh=mesh, in_specs=P("tp"),
                                            out_specs=P("tp"), check_vma=False))
                for name, fn in reducers.items() if name != "none"}  # fmt: skip
        want = once["psum"](parts)
        try:
            same = bool(jnp.array_equal(once["oneshot"](parts), want))
        except Exception as e:  # noqa: BLE001 - report and time the rest
            same = f"failed: {type(e).__name__}: {str(e)[:300]}"
        result["checks"][str(shape)] = same
        print(f"{shape}: oneshot == psum bit for bit: {same}", flush=True)
        for options_name, options in (("default", {}), ("one_graph", ONE_GRAPH_OPTIONS)):
            times = {}
            for name, fn in reducers.items():
                if name == "oneshot" and same is not True:
                    continue
                try:
                    compiled = jax.jit(chain_fn(fn, mesh)).lower(x).compile(compiler_options=options)
                    times[name] = time_us(compiled, x)
                except Exception as e:  # noqa: BLE001
                    print(f"  {options_name} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            per = {name: (t - times["none"]) / CHAIN for name, t in times.items() if name != "none" and "none" in times}
            result["us_per_all_reduce"][f"{shape} {options_name}"] = per
            out.write_text(json.dumps(result, indent=2))
            print(f"  {options_name}: " + ", ".join(f"{k} {v:.2f} us" for k, v in per.items())
                  + f" (chain without all-reduces {times.get('none', float('nan')) / CHAIN:.2f} us a link)", flush=True)
    print(f"\n== one all-reduce inside a chain of {CHAIN}, {len(devices)} x {devices[0].device_kind}, us ==")
    for key, per in result["us_per_all_reduce"].items():
        print(f"{key:24s} " + "  ".join(f"{k} {v:7.2f}" for k, v in per.items()))


if __name__ == "__main__":
    main()
