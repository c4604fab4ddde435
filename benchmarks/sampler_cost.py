"""The sampler's time on this machine: `sample` of the "plain" flavor over [B, V] float32 logits,
the rows sampled at temperature 0.8 (the draw's cost does not depend on it), against another tree's.

  PYTHONPATH=$PWD python benchmarks/sampler_cost.py [--rows 256] [--vocab 49152] [--old DIR]

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
B, V = int(sys.argv[1]), int(sys.argv[2])
logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
s = SamplingBatch(temperature=jnp.full(B, 0.8), seeds=jnp.zeros((B, 2), jnp.uint32), counters=jnp.zeros(B, jnp.int32))
f = jax.jit(sample)
jax.block_until_ready(f(logits, s))
times = []
for _ in range(10):
    t0 = time.perf_counter(); jax.block_until_ready(f(logits, s)); times.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1e3 * float(np.median(times)), "device": str(jax.devices()[0].device_kind)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--old", default=None, help="a directory holding another tree's jaxllm/")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, **({"old": os.path.abspath(args.old)} if args.old else {})}
    rows = []
    for _ in range(args.repeats):
        for name, root in trees.items():
            env = {**os.environ, "PYTHONPATH": root}
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.rows), str(args.vocab)], env=env, cwd=root,
                                 capture_output=True, text=True, check=True)  # fmt: skip
            rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"sample(), plain flavor, {args.rows} rows x {args.vocab} tokens, {rows[0][1]['device']}")
    print("| tree | ms a call (median of 10) |\n|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
