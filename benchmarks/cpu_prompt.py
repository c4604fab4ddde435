"""Prompts on this machine's CPU: time to first token and offline throughput of the built-in
SmolLM2-135M-Instruct (float32, the 'xla' attention path), against another tree's.

  PYTHONPATH=$PWD python benchmarks/cpu_prompt.py [--old DIR] [--repeats 2] [--out FILE.json]

DIR holds another tree's `jaxllm/` (`git archive <commit> jaxllm | tar -x -C DIR`); each tree runs
in its own process, the trees alternating. Each process builds `LLM()` with JAXLLM_PRECOMPILE=0, so
a workload's first run compiles the programs it visits: "first" is that run, compilation included,
"warm" the best of two more. Workloads: one prompt of 128 / 512 / 2,000 token ids (max_tokens 1: the
time to its first token); 8 prompts of 512 at once (max_tokens 1); 32 requests of 512 / 64 tokens
(ignore_eos: prompt chunks beside decodes, then decodes); 32 rows decoding 64 tokens from a short
prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, time
os.environ["JAXLLM_PRECOMPILE"] = "0"
import jax
from jaxllm import LLM, SamplingParams
llm = LLM("smollm2-135m-instruct")

def ids(n, salt):
    return {"prompt_token_ids": [(i * 7919 + salt * 104729) % 40000 + 100 for i in range(n)]}

def timed(run):
    times = []
    for salt in range(3):
        t0 = time.perf_counter(); run(salt + 1); times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "warm_s": min(times[1:])}

one = SamplingParams(max_tokens=1)
out = {}
for n in (128, 512, 2000):
    out[f"ttft_{n}"] = timed(lambda salt: llm.generate(ids(n, salt), one, use_tqdm=False))
out["prefill_8x512"] = timed(lambda salt: llm.generate([ids(512, salt * 8 + i) for i in range(8)], one, use_tqdm=False))
p64 = SamplingParams(max_tokens=64, ignore_eos=True)
out["offline_32x512_64"] = timed(lambda salt: llm.generate([ids(512, salt * 32 + i) for i in range(32)], p64,
                                                           use_tqdm=False))
out["decode_32x64"] = timed(lambda salt: llm.generate([ids(16, salt * 32 + i) for i in range(32)], p64, use_tqdm=False))
out["device"] = jax.devices()[0].device_kind
llm.shutdown()
print(json.dumps(out))
"""

ROWS = [  # (key, label, output tokens a run: tok/s where > 0)
    ("ttft_128", "TTFT, 128-token prompt", 0),
    ("ttft_512", "TTFT, 512-token prompt", 0),
    ("ttft_2000", "TTFT, 2,000-token prompt", 0),
    ("prefill_8x512", "8 prompts of 512, first tokens", 0),
    ("offline_32x512_64", "32 requests of 512 / 64", 32 * 64),
    ("decode_32x64", "32 rows decoding 64 tokens", 32 * 64),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=None, help="a directory holding another tree's jaxllm/")
    parser.add_argument("--repeats", type=int, default=2, help="processes a tree, alternating")
    parser.add_argument("--out", default=None, help="write every process's figures here (JSON)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, **({"old": os.path.abspath(args.old)} if args.old else {})}
    runs = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, root in reversed(trees.items()):
            env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
            done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)
    device = next(iter(runs.values()))[0]["device"]
    print(f"SmolLM2-135M-Instruct, float32, {device}; each cell: first (compiling) / warm, seconds "
          f"(output tok/s warm), one process a column")
    names = [(name, i) for i in range(args.repeats) for name in trees]
    print("| workload | " + " | ".join(f"{name}, run {i + 1}" for name, i in names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label, tokens in ROWS:
        cells = []
        for name, i in names:
            r = runs[name][i][key]
            rate = f" ({tokens / r['warm_s']:,.0f} tok/s)" if tokens else ""
            cells.append(f"{r['first_s']:.2f} / {r['warm_s']:.2f}{rate}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
