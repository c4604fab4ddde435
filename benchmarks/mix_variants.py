"""The ShareGPT-like mix (realistic_load.py) under several engine settings, in one call: each variant
a new process with its own empty program cache (its first pass compiles whatever it visits; nothing
is subtracted), then one table of them: output tok/s, the share of computed tokens that were the
requests', each step kind's ms a step and padding, host time a step, LLM() ready time.

    PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 python benchmarks/mix_variants.py \\
        --variant card '' --variant rows1024 '--max-batch-size 1024' [--passes 2]    # JSON to $OUT

A variant's ARGS are realistic_load.py's options (its card, mix, engine limits, --passes); with
`--tree NAME DIR` that variant imports jaxllm from DIR (an older tree unpacked there) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import default_out, write_json

HERE = Path(__file__).resolve().parent


def run_variant(name: str, extra: str, tree: str | None, passes: int, out: Path, timeout: float) -> dict:
    path = out / f"mix_{name}_{time.strftime('%Y-%m-%d')}.json"
    root = Path(tree).resolve() if tree else HERE.parent
    env = dict(os.environ, JAXLLM_COMPILE_CACHE=tempfile.mkdtemp(prefix=f"jaxllm-cache-{name}-"),
               PYTHONPATH=f"{root}{os.pathsep}{HERE}")  # fmt: skip
    cmd = [sys.executable, str(HERE / "realistic_load.py"), "--passes", str(passes), "--skip-kernels",
           "--out", str(path), *shlex.split(extra)]  # fmt: skip
    print(f"\n=== {name}: {' '.join(cmd[2:])}" + (f" (jaxllm from {root})" if tree else ""), flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, timeout=timeout, text=True, capture_output=True)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s"}
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    print(tail, flush=True)
    if proc.returncode != 0 or not path.exists():
        print(proc.stderr[-3000:], flush=True)
        return {"name": name, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    result = json.loads(path.read_text())
    result.update(name=name, args=extra, tree=str(tree or ""), process_s=time.perf_counter() - started)
    write_json(path, result)
    return result


def table(results: list[dict]) -> str:
    def cell(r, f):
        try:
            return f(r)
        except (KeyError, TypeError, ZeroDivisionError):
            return "-"

    def kind(r, k, f):
        return cell(r, lambda r: f(r["first_pass"]["breakdown"]["kinds"][k]))

    rows = [
        ("first pass, output tok/s", lambda r: f"{r['first_pass']['summary']['total_output_throughput_tok_s']:,.0f}"),
        ("second pass, output tok/s", lambda r: f"{r['second_pass']['summary']['total_output_throughput_tok_s']:,.0f}"),
        ("useful share of tokens computed", lambda r: f"{100 * r['first_pass']['breakdown']['useful_token_share']:.1f}%"),
        ("steps", lambda r: f"{r['first_pass']['breakdown']['steps']}"),
        ("mixed: steps, ms a step, useful", lambda r: kind(r, "mixed", lambda k: f"{k['steps']}, {k['mean_step_ms']:.1f}, "
                                                                         f"{100 * k['useful_token_share']:.0f}%")),
        ("multi-step: steps, ms a step, seqs, useful",
         lambda r: kind(r, "multi-step", lambda k: f"{k['steps']}, {k['mean_step_ms']:.1f}, {k['mean_seqs']:.0f}, "
                                                   f"{100 * k['useful_token_share']:.0f}%")),
        ("decode: steps, ms a step, seqs, useful",
         lambda r: kind(r, "decode", lambda k: f"{k['steps']}, {k['mean_step_ms']:.1f}, {k['mean_seqs']:.0f}, "
                                               f"{100 * k['useful_token_share']:.0f}%")),
        ("prefill: steps, ms a step", lambda r: kind(r, "prefill", lambda k: f"{k['steps']}, {k['mean_step_ms']:.1f}")),
        ("host ms a step", lambda r: f"{r['first_pass']['breakdown']['mean_host_ms']:.1f}"),
        ("steps dispatched ahead of the last one's read",
         lambda r: f"{100 * r['first_pass']['breakdown']['ahead_share']:.1f}%"),
        ("TTFT p50 / p99 ms", lambda r: f"{r['first_pass']['summary']['ttft_ms']['p50']:.0f} / "
                                        f"{r['first_pass']['summary']['ttft_ms']['p99']:.0f}"),
        ("TPOT p50 / p99 ms", lambda r: f"{r['first_pass']['summary']['tpot_ms']['p50']:.1f} / "
                                        f"{r['first_pass']['summary']['tpot_ms']['p99']:.1f}"),
        ("LLM() ready, s", lambda r: f"{r['llm_s']:.1f}"),
    ]
    lines = ["| measure | " + " | ".join(r["name"] for r in results) + " |",
             "|---|" + "---|" * len(results)]  # fmt: skip
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r, f) if "error" not in r else r["error"] for r in results) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "ARGS"), required=True,
                        help="a name and realistic_load.py's options for it ('' for the card's)")  # fmt: skip
    parser.add_argument("--tree", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                        help="variant NAME imports jaxllm from DIR")  # fmt: skip
    parser.add_argument("--passes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a variant may take")
    parser.add_argument("--out", default=default_out())
    args = parser.parse_args(argv)
    trees = dict(args.tree)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, extra, trees.get(name), args.passes, out, args.timeout) for name, extra in args.variant]
    print("\n" + table(results), flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
