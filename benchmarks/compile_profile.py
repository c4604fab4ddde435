"""Where an empty-cache start-up's time goes: tracing + lowering against XLA compiling, per program kind,
alone and on all threads, and what XLA options cost (compile time and step time).

    PYTHONUNBUFFERED=1 python benchmarks/compile_profile.py --card h200 --mode single
    PYTHONUNBUFFERED=1 python benchmarks/compile_profile.py --card h200 --mode all [--threads N]

single: LLM() without precompiling (the weights alone), then one program of each kind lowered and
        compiled on one thread, the single-step forwards' step timed (zeros as inputs: the weights'
        GEMMs, not attention, set a step's time here). Compare --options in separate processes: XLA's
        in-process autotuning cache would serve a second compile.
all:    every program of the engine on N threads (default: the cores), lowering and compiling timed
        apart. No persistent cache in either mode. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import CARDS, print_result


def kind_of(shape) -> str:
    name = type(shape).__name__
    if getattr(shape, "decode_steps", 1) > 1:
        return f"{name}/multi-{shape.sampling}"
    if name == "ForwardShape":
        return f"{name}/{'decode' if shape.max_query_len == 1 else 'mixed'}"
    if name == "SamplerShape":
        return f"{name}/{shape.flavor}"
    return name


def _one_step(shape) -> bool:
    return type(shape).__name__ == "ForwardShape" and shape.decode_steps == 1


def make_llm(card: str):
    os.environ["JAXLLM_PRECOMPILE"] = "0"
    os.environ["JAXLLM_COMPILE_CACHE"] = "off"
    from jaxllm import LLM

    spec = CARDS[card]
    t = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["llm"])
    return llm, time.perf_counter() - t


def time_step(runner, shape, exe, repeats: int = 20) -> float:
    """Median seconds of `exe` (a forward program) on zeros: the KV cache threads through."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.engine.step_inputs import host_layout

    _, size = host_layout(runner.host_inputs(shape), with_size=True)
    flat = jnp.zeros((size,), jnp.uint32)
    tokens = jnp.zeros((shape.num_tokens,), jnp.int32)
    times = []
    for _ in range(repeats + 3):
        t = time.perf_counter()
        out, runner.kv_cache, runner.token_pages = exe(runner.params, runner.kv_cache, runner.token_pages, flat,
                                                       tokens, runner._prev, None)  # fmt: skip
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return float(np.median(times[3:]))


def single(card: str, options: dict | None, forwards_only: bool = False) -> dict:
    from jaxllm.engine.buckets import ForwardShape, HeadShape, SamplerShape

    llm, llm_s = make_llm(card)
    runner = llm._engine.runner
    shapes = runner.bucket_shapes()
    seqs = runner.buckets.seq_buckets

    def first(kind, **fields):
        return next((s for s in shapes if isinstance(s, kind) and all(getattr(s, k) == v for k, v in fields.items())),
                    None)  # fmt: skip

    picks = [first(ForwardShape, max_query_len=1, decode_steps=1, num_seqs=n) for n in (seqs[0], 64, 256)]
    picks += [first(ForwardShape, max_query_len=t) for t in (64, 256, 1024, runner.buckets.max_num_tokens)]
    picks += [
             first(ForwardShape, decode_steps=runner.buckets.decode_steps, num_seqs=seqs[0], sampling="plain"),
             first(ForwardShape, decode_steps=runner.buckets.decode_steps, num_seqs=64, sampling="plain"),
             first(SamplerShape, flavor="full", num_seqs=seqs[-1]), first(SamplerShape, flavor="plain", num_seqs=seqs[-1]),
             first(HeadShape, num_tokens=1024, all_logits=False)]
    rows = []
    picks = [p for p in picks if p is not None and not (forwards_only and not _one_step(p))]
    for shape in dict.fromkeys(picks):
        row = {"shape": repr(shape), "kind": kind_of(shape)}
        t = time.perf_counter()
        lowered = runner._lower(shape)
        row["lower_s"] = time.perf_counter() - t
        t = time.perf_counter()
        exe = lowered.compile(compiler_options=options) if options else lowered.compile()
        row["compile_s"] = time.perf_counter() - t
        if _one_step(shape):
            row["step_ms"] = 1e3 * time_step(runner, shape, exe)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    llm.shutdown()
    return {"mode": "single", "options": options, "llm_without_programs_s": llm_s, "programs": len(shapes), "rows": rows}


def all_programs(card: str, threads: int | None, options: dict | None) -> dict:
    llm, llm_s = make_llm(card)
    runner = llm._engine.runner
    programs = runner.programs
    if options:
        own = programs._compiler_options
        programs._compiler_options = lambda shape: {**(own(shape) or {}), **options}
    lower_seconds: dict = {}
    lower = programs._lower

    def timed_lower(shape):
        t = time.perf_counter()
        out = lower(shape)
        lower_seconds[shape] = time.perf_counter() - t
        return out

    programs._lower = timed_lower
    shapes = runner.bucket_shapes()
    cpu = {"start": os.times()}
    t = time.perf_counter()
    programs.prepare(shapes, progress=False, threads=threads)
    wall = time.perf_counter() - t
    end = os.times()
    by_kind: dict = {}
    for shape, (_, seconds) in programs.seconds.items():
        k = by_kind.setdefault(kind_of(shape), {"count": 0, "lower_s": 0.0, "compile_s": 0.0})
        k["count"] += 1
        k["lower_s"] += lower_seconds.get(shape, 0.0)
        k["compile_s"] += seconds - lower_seconds.get(shape, 0.0)
    llm.shutdown()
    return {"mode": "all", "options": options, "threads": threads or os.cpu_count(), "llm_without_programs_s": llm_s,
            "programs": len(shapes), "wall_s": wall,
            "process_cpu_s": (end.user + end.system) - (cpu["start"].user + cpu["start"].system),
            "by_kind": by_kind}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--card", default="h200", choices=sorted(CARDS))
    parser.add_argument("--mode", default="single", choices=["single", "all"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--forwards-only", action="store_true", help="single: only the single-step forwards")
    parser.add_argument("--options", type=json.loads, default=None, help="XLA options for every compile (JSON)")
    args = parser.parse_args()
    if args.mode == "single":
        result = single(args.card, args.options, args.forwards_only)
    else:
        result = all_programs(args.card, args.threads, args.options)
    if args.mode == "all":
        print(f"{args.card}: {result['programs']} programs on {result['threads']} threads in {result['wall_s']:.1f} s "
              f"(process CPU {result['process_cpu_s']:.0f} s; weights alone {result['llm_without_programs_s']:.1f} s)")  # fmt: skip
        print("| kind | count | lower s | compile s |\n|---|---|---|---|")
        for k, v in sorted(result["by_kind"].items()):
            print(f"| {k} | {v['count']} | {v['lower_s']:.1f} | {v['compile_s']:.1f} |")
    else:
        print(f"{args.card} {args.options or ''}: LLM() without programs {result['llm_without_programs_s']:.1f} s")
        print("| program | lower s | compile s | step ms |\n|---|---|---|---|")
        for r in result["rows"]:
            step = f"{r['step_ms']:.2f}" if "step_ms" in r else ""
            print(f"| {r['shape']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {step} |")
    print_result(result)


if __name__ == "__main__":
    main()
