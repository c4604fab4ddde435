"""A batch job's figures: the progress bar and its counts, each engine's sizes and program times,
the processes' figures gathered on process 0, and the summary (a dict, printed and written as JSON).

Compile time is reported apart from generation time: `compile_s`, what the engines spent making
programs before the first request (in `LLM()`, on a thread while the weights load), and
`compile_in_generation_s`, what they compiled at first use during the run (JAXLLM_PRECOMPILE=0).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm


class Tally:
    """Counts and the progress bar of this process's share."""

    def __init__(self, total: int, show: bool):
        self.done = self.failed = self.prompt_tokens = self.output_tokens = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, desc="batch", unit="req", disable=not show or total == 0)

    def add(self, result: dict) -> None:
        response = result["response"]
        if response["status_code"] == 200:
            self.done += 1
            usage = response["body"].get("usage") or {}
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.output_tokens += usage.get("completion_tokens", 0)
        else:
            self.failed += 1
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{(self.done + self.failed) / elapsed:.2f} req/s, "
                                 f"{self.output_tokens / elapsed:.1f} out tok/s", refresh=False)  # fmt: skip
        self.bar.update()


def _programs(llm):
    engine = getattr(llm, "_engine", None)
    return engine.runner.programs if engine is not None else None


def compile_seconds(llm) -> float:
    programs = _programs(llm)
    return programs.compile_seconds if programs is not None else 0.0


def engine_stats(llm, engine_id: int, compile_before: float) -> dict:
    """One engine's sizes and programs; `compile_before`: its compile seconds when generation began
    (what it compiled later, at first use, ran inside the generation time)."""
    import os

    from jaxllm.engine.builder import PRECOMPILE_ENV

    programs = _programs(llm)
    total = compile_seconds(llm)
    return {"engine": engine_id, "max_seq_len": llm.max_seq_len, "max_batch_size": llm.args.max_batch_size,
            "max_num_tokens": llm.args.max_num_tokens,
            "precompiled": os.environ.get(PRECOMPILE_ENV, "1") != "0",
            "programs_compiled": programs.num_compiled if programs else 0,
            "programs_loaded": programs.num_loaded if programs else 0,
            "compile_s": compile_before, "compile_in_generation_s": total - compile_before}  # fmt: skip


def gather(layout, output_path, stats: dict) -> dict:
    """Every process's stats, summed, on process 0 (after a barrier: every part is then written)."""
    if layout.num_processes == 1:
        return stats
    from jax.experimental import multihost_utils

    path = Path(f"{output_path}.stats-{layout.rank}-of-{layout.num_processes}.json")
    path.write_text(json.dumps(stats), encoding="utf-8")
    multihost_utils.sync_global_devices("jaxllm batch: every part written")
    if layout.rank != 0:
        return stats
    total = {"done": 0, "failed": 0, "prompt_tokens": 0, "output_tokens": 0, "startup_s": 0.0, "generate_s": 0.0,
             "engines": []}  # fmt: skip
    for rank in range(layout.num_processes):
        other = Path(f"{output_path}.stats-{rank}-of-{layout.num_processes}.json")
        data = json.loads(other.read_text(encoding="utf-8"))
        for key in ("done", "failed", "prompt_tokens", "output_tokens"):
            total[key] += data[key]
        for key in ("startup_s", "generate_s"):  # the processes run side by side: the slowest
            total[key] = max(total[key], data[key])
        total["engines"] += data["engines"]
        other.unlink()
    return total


def summary(model_name, requests, output_path, layout, num_requests: int, skipped: int, stats: dict,
             wall_s: float) -> dict:  # fmt: skip
    generate_s = stats["generate_s"]
    ran = stats["done"] + stats["failed"]
    return {"model": model_name, "input": str(requests) if isinstance(requests, (str, Path)) else None,
            "output": None if output_path is None else str(output_path), "requests": num_requests,
            "done": stats["done"], "failed": stats["failed"], "skipped": skipped,
            "prompt_tokens": stats["prompt_tokens"], "output_tokens": stats["output_tokens"],
            "data_parallel_size": layout.data_parallel_size, "processes": layout.num_processes,
            "startup_s": round(stats["startup_s"], 3),
            "compile_s": round(sum(e["compile_s"] for e in stats["engines"]), 3),
            "compile_in_generation_s": round(sum(e["compile_in_generation_s"] for e in stats["engines"]), 3),
            "programs_compiled": sum(e["programs_compiled"] for e in stats["engines"]),
            "programs_loaded": sum(e["programs_loaded"] for e in stats["engines"]),
            "generate_s": round(generate_s, 3), "wall_s": round(wall_s, 3),
            "requests_per_s": round(ran / generate_s, 3) if generate_s > 0 else None,
            "output_tokens_per_s": round(stats["output_tokens"] / generate_s, 3) if generate_s > 0 else None,
            "engines": stats["engines"]}  # fmt: skip


def format_summary(summary: dict) -> str:
    """The summary as a few lines for the terminal."""
    rate = summary["requests_per_s"]
    lines = [
        f"requests: {summary['requests']} ({summary['done']} done, {summary['failed']} failed, "
        f"{summary['skipped']} already done)",
        f"tokens: {summary['prompt_tokens']} prompt, {summary['output_tokens']} output",
        f"engines: {summary['data_parallel_size']} over {summary['processes']} process(es), ready in "
        f"{summary['startup_s']:.1f} s; programs, summed over the engines: {summary['compile_s']:.1f} s before "
        "generation"
        + (f", {summary['compile_in_generation_s']:.1f} s at first use" if summary["compile_in_generation_s"] else "")
        + f" ({summary['programs_compiled']} compiled, {summary['programs_loaded']} loaded from the cache)",
        f"generation: {summary['generate_s']:.1f} s"
        + (f" ({rate:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s)" if rate else ""),
        f"wall: {summary['wall_s']:.1f} s",
    ]  # fmt: skip
    return "\n".join(lines)
