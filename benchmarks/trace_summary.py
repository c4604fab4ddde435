"""Summarize a JAX profiler trace (perfetto JSON, `jax.profiler.start_trace(create_perfetto_trace=True)`):
per device, the span from its first to its last kernel, the time some kernel runs (busy), and the
kernels that take the most time, grouped by name.

    python benchmarks/trace_summary.py TRACE.json.gz [--top 20] [--window paged_decode_attention] [--host]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re


def load_events(path: str) -> tuple[list[dict], dict[int, str]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, processes


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def kernel_group(name: str) -> str:
    """Fold numbered instances (fusion.12, all-reduce-start.3) into one row."""
    return re.sub(r"([._-])\d+", r"\1N", name)


def _top(events: list[dict], top: int, exact: bool = False) -> list[dict]:
    """The event names (numbered instances folded, unless `exact`) that take the most time, with
    their counts."""
    groups = collections.defaultdict(lambda: [0, 0.0, None])
    for e in events:
        g = groups[e["name"] if exact else kernel_group(e["name"])]
        g[0] += 1
        g[1] += e.get("dur", 0)
        g[2] = g[2] or e.get("args", {}).get("hlo_module")
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"name": n, "count": c, "total_ms": t / 1e3, "module": m} for n, (c, t, m) in rows]


def _span(events: list[dict]) -> tuple[float, float]:
    return min(e["ts"] for e in events), max(e["ts"] + e.get("dur", 0) for e in events)


def summarize(events: list[dict], processes: dict[int, str], top: int = 20, window: str | None = None,
              exact: bool = False) -> dict:  # fmt: skip
    """Per GPU: span, busy time and the top kernel groups; with `window`, only the kernels from the
    first to the last one whose name starts with it (e.g. the decode attention kernel, to leave
    out a prefill or a compilation caught in the trace)."""
    per_device = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "GPU" in processes.get(e.get("pid"), ""):
            per_device[processes[e["pid"]]].append(e)
    out = {}
    for device, evs in sorted(per_device.items()):
        marks = [e for e in evs if window and e["name"].startswith(window)]
        if marks:
            lo, hi = _span(marks)
            evs = [e for e in evs if lo <= e["ts"] and e["ts"] + e.get("dur", 0) <= hi]
        intervals = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in evs]
        start, end = _span(evs)
        out[device] = {"span_ms": (end - start) / 1e3, "busy_ms": busy_us(intervals) / 1e3, "kernels": len(evs),
                       "window_marks": len(marks), "top": _top(evs, top, exact)}  # fmt: skip
    return out


def summarize_host(events: list[dict], processes: dict[int, str], top: int = 25, window: str | None = None) -> dict:
    """Per host process (the profiler's thread events), the event names that take the most time,
    over the span of the GPU kernels named by `window` (the host clock and the GPUs' are one)."""
    gpu = {pid for pid, name in processes.items() if "GPU" in name}
    marks = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and window and e["name"].startswith(window)]
    lo, hi = _span(marks) if marks else (float("-inf"), float("inf"))
    per_process = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu and lo <= e["ts"] and e["ts"] + e.get("dur", 0) <= hi:
            per_process[processes.get(e.get("pid"), str(e.get("pid")))].append(e)
    return {proc: _top(evs, top) for proc, evs in per_process.items()}


def format_summary(path: str, top: int = 20, window: str | None = None, host: bool = False,
                   exact: bool = False) -> str:  # fmt: skip
    """The GPU summary of the trace at `path` as text (and, with `host`, the host threads'); with
    `exact`, each kernel name its own row (the HLO instruction a fusion kernel is named after)."""
    events, processes = load_events(path)
    summary = summarize(events, processes, top, window, exact)
    lines = [] if summary else [f"no GPU events in {path}"]

    def rows(top_rows):
        return [f"  {row['total_ms']:8.3f} ms  {row['count']:6d}x  {row['name'][:100]}"
                + (f"  [{row['module']}]" if exact and row.get("module") else "") for row in top_rows]

    for device, s in summary.items():
        marks = f" ({s['window_marks']} x {window})" if window else ""
        lines.append(f"\n{device}: span {s['span_ms']:.2f} ms{marks}, kernels busy {s['busy_ms']:.2f} ms, {s['kernels']} kernels")
        lines += rows(s["top"])
    if host:
        for proc, top_rows in summarize_host(events, processes, top, window).items():
            lines.append(f"\nhost {proc} (thread time, summed over threads)")
            lines += rows(top_rows)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--window", help="only from the first to the last kernel whose name starts with this")
    parser.add_argument("--host", action="store_true", help="also the host threads' events (traces that kept them)")
    parser.add_argument("--exact", action="store_true", help="each kernel name its own row (no folding of numbers)")
    args = parser.parse_args()
    print(format_summary(args.trace, args.top, args.window, args.host, args.exact))


if __name__ == "__main__":
    main()
