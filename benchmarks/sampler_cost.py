"""The sampler's time on this machine: `sample` over [B, V] float32 logits, the rows sampled at
temperature 0.8 (the draw's cost does not depend on it), in the "plain" flavor or, with --top-p, the
"full" one (top-p truncation), against another tree's.

  PYTHONPATH=$PWD python benchmarks/sampler_cost.py [--rows 256,64] [--vocab 49152] [--top-p 0.9] [--old DIR]

DIR holds another tree's `jaxllm/` (`git archive <commit> jaxllm | tar -x -C DIR`); each tree runs in
its own process, the two alternating, median of 10 calls after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxllm.layers.sampling import SamplingBatch, sample
from jaxllm.layers.sampling import BAN_WIDTH
B, V, top_p = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
logits = 3 * jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
rows = dict(temperature=jnp.full(B, 0.8), seeds=jnp.zeros((B, 2), jnp.uint32), counters=jnp.zeros(B, jnp.int32))
if top_p < 1:
    rows.update(top_k=jnp.zeros(B, jnp.int32), top_p=jnp.full(B, top_p), min_p=jnp.zeros(B),
                bias_slots=jnp.zeros(B, jnp.int32), banned_tokens=jnp.full((B, BAN_WIDTH), -1, jnp.int32))
s = SamplingBatch(**rows, flavor="full" if top_p < 1 else "plain")
bias = jnp.zeros((2, V), jnp.float32)
f = jax.jit(lambda x, s: sample(x, s, bias))
jax.block_until_ready(f(logits, s))
times = []
for _ in range(10):
    t0 = time.perf_counter(); jax.block_until_ready(f(logits, s)); times.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1e3 * float(np.median(times)), "device": str(jax.devices()[0].device_kind)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="256", help="batch sizes, comma-separated")
    parser.add_argument("--top-p", type=float, default=1.0, help="below 1: the 'full' flavor with this top_p")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--old", default=None, help="a directory holding another tree's jaxllm/")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, **({"old": os.path.abspath(args.old)} if args.old else {})}
    rows = []
    for batch in [int(b) for b in args.rows.split(",")]:
        for _ in range(args.repeats):
            for name, root in trees.items():
                env = {**os.environ, "PYTHONPATH": root}
                out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(args.vocab), str(args.top_p)],
                                     env=env, cwd=root, capture_output=True, text=True, check=True)  # fmt: skip
                rows.append((batch, name, json.loads(out.stdout.strip().splitlines()[-1])))
    flavor = "plain" if args.top_p >= 1 else f"full (top_p {args.top_p})"
    print(f"sample(), {flavor} flavor, {args.vocab} tokens a row, {rows[0][2]['device']}")
    print("| rows | tree | ms a call (median of 10) |\n|---|---|---|")
    for batch, name, r in rows:
        print(f"| {batch} | {name} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
