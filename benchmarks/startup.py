"""First contact, measured: LLM() with an empty program cache and with a warm one (each in a new
process), the first pass of a workload beside the second in the same process, and LLM() to the
first token.

    PYTHONUNBUFFERED=1 python benchmarks/startup.py --card h200 [--out DIR]   # Llama-3.1-8B shape, bf16
    python benchmarks/startup.py --card cpu                                    # SmolLM2-135M, the built-in

Each start runs in its own process (`--child`), the first with an empty cache directory and the
second with what the first left there; neither subtracts compile time from anything. Workloads:
  fixed   1,024 requests of 128 prompt / 128 output tokens (h200), 64 of 64 / 32 (cpu);
  mix     a ShareGPT-like mix: lognormal prompt and output lengths (means ~280 / ~220 tokens on the
          h200, 1,000 requests; ~60 / ~40 on the CPU, 48 requests), seeded;
each run twice in a row (other prompts of the same lengths the second time, so the prefix cache
serves neither), all requests queued at once. "first/second" is the second pass's output tokens/s
over the first's. Prints a table; writes startup_<card>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CARDS, HERE, parse_result, print_result, sharegpt_like, synthetic, write_json


def child(card: str, starts_only: bool = False) -> dict:
    """One process: LLM(), the first token, then each workload twice."""
    started = time.perf_counter()
    import logging

    logging.basicConfig(format="[t=%(relativeCreated).0f ms] %(name)s: %(message)s")
    logging.getLogger("jaxllm").setLevel(logging.INFO)
    from jaxllm import LLM, SamplingParams

    imported = time.perf_counter()
    spec = CARDS[card]
    llm = LLM(model=spec["model"], **spec["llm"])
    ready = time.perf_counter()
    llm.generate([11, 12, 13, 14], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    first_token = time.perf_counter()
    runner = llm._engine.runner
    result = {"import_s": imported - started, "llm_s": ready - imported, "first_token_s": first_token - ready,
              "programs": len(runner.bucket_shapes()), "compiled": runner.programs.num_compiled,
              "loaded": runner.programs.num_loaded, "prepare_s": runner.compile_seconds,
              "device": str(runner._devices()[0].device_kind)}  # fmt: skip
    by_kind: dict = {}
    for shape, (how, seconds) in runner.programs.seconds.items():
        key = f"{type(shape).__name__}{'/' + shape.sampling if getattr(shape, 'sampling', '') else ''}:{how}"
        count, total = by_kind.get(key, (0, 0.0))
        by_kind[key] = (count + 1, total + seconds)
    result["program_seconds_by_kind"] = {k: {"count": c, "seconds": t} for k, (c, t) in sorted(by_kind.items())}
    slowest = sorted(runner.programs.seconds.items(), key=lambda kv: -kv[1][1])[:8]
    result["slowest_programs"] = [[repr(shape), how, seconds] for shape, (how, seconds) in slowest]
    if starts_only:
        return result
    vocab = llm.config.vocab_size
    n, isl, osl = spec["fixed"]
    import numpy as np

    def fixed(seed):
        return synthetic(n, isl, vocab, seed), [osl] * n

    def mix(seed):
        return sharegpt_like(vocab=vocab, seed=seed, **spec["mix"])

    for name, workload in (("fixed", fixed), ("mix", mix)):
        runs = []
        for seed in (1, 2):  # other prompts each time: the prefix cache must not serve the second
            prompts, outputs = workload(seed)
            params = [SamplingParams(max_tokens=o, ignore_eos=True) for o in outputs]
            compiled0 = runner.programs.num_compiled
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            runs.append({"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
                         "compiled_during": runner.programs.num_compiled - compiled0})  # fmt: skip
        result[name] = {"requests": len(prompts), "mean_prompt": float(np.mean([len(p) for p in prompts])),
                        "mean_output": float(np.mean(outputs)), "first": runs[0], "second": runs[1],
                        "first_over_second": runs[1]["output_tok_s"] / runs[0]["output_tok_s"]}  # fmt: skip
        print(f"[{card}] {name}: first {runs[0]['output_tok_s']:.0f} tok/s, second {runs[1]['output_tok_s']:.0f} "
              f"tok/s ({result[name]['first_over_second']:.3f}x)", file=sys.stderr, flush=True)  # fmt: skip
    llm.shutdown()
    result["total_s"] = time.perf_counter() - started
    return result


def run_child(card: str, cache: Path, timeout: float, starts_only: bool = False) -> dict:
    env = {**os.environ, "JAXLLM_COMPILE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("JAXLLM_PRECOMPILE", None)
    command = [sys.executable, __file__, "--child", "--card", card] + (["--starts-only"] if starts_only else [])
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    log = [line for line in proc.stderr.splitlines() if line.startswith("[t=") or line.startswith("[")]
    sys.stderr.write("\n".join(log[-30:]) + "\n")
    result = parse_result(proc.stdout)
    if result is None:
        return {"error": proc.stderr[-3000:], "returncode": proc.returncode}
    return {**result, "log": log}


def report(card: str, rows: dict) -> None:
    print(f"\n== start-up and first passes, {card} ({rows.get('empty_cache', {}).get('device', '?')}) ==")
    print(f"{'':22}{'empty cache':>14}{'warm cache':>14}")
    labels = (("llm_s", "LLM() s"), ("first_token_s", "then 1st token s"), ("programs", "programs"),
              ("compiled", "compiled"), ("loaded", "from the cache"), ("prepare_s", "programs' s"))
    for key, label in labels:
        values = [rows.get(r, {}).get(key) for r in ("empty_cache", "warm_cache")]
        print(f"{label:22}" + "".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v!s:>14}" for v in values))
    for name in ("fixed", "mix"):
        for r in ("empty_cache", "warm_cache"):
            w = rows.get(r, {}).get(name)
            if w:
                print(f"{name} ({w['requests']} req, {w['mean_prompt']:.0f}/{w['mean_output']:.0f}) {r}: first "
                      f"{w['first']['output_tok_s']:.0f} tok/s, second {w['second']['output_tok_s']:.0f} tok/s, "
                      f"first/second {w['first_over_second']:.3f}x, compiled during "
                      f"{w['first']['compiled_during']}/{w['second']['compiled_during']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", choices=sorted(CARDS), default="cpu")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--starts-only", action="store_true", help="LLM() and the first token; no workloads")
    parser.add_argument("--cache", default=None, help="the program cache directory (emptied first; default: a "
                                                      "temporary one)")
    args = parser.parse_args()
    if args.child:
        print_result(child(args.card, args.starts_only))
        return
    rows = {"date": time.strftime("%Y-%m-%d"), "card": args.card, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "programs"
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("empty_cache", "warm_cache"):
            rows[label] = run_child(args.card, cache, args.timeout, args.starts_only)
            write_json(Path(args.out) / f"startup_{args.card}.json", rows)
    report(args.card, rows)


if __name__ == "__main__":
    main()
