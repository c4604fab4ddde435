"""Where an engine's time goes, step by step: an optional trace of every step (what it ran, how much
of it was padding, how long the host worked and how long it waited for the devices), and the
breakdown of a trace that `jaxllm bench throughput --breakdown` prints.

A step is one engine iteration (engine.py `Engine.step`): schedule, dispatch, read, postprocess. Its
kind is what its forward program ran: "prefill" (prompt chunks only), "mixed" (prompt chunks and
decodes), "decode" (one decode per sequence) or "multi-step" (several decodes per sequence in one
dispatch); `ahead` when the overlap scheduler dispatched it before the previous one was read. Its
useful tokens are the prompt tokens it computed and the tokens its decodes gave requests; its row
tokens, the rows it computed for requests (a multi-step decode computes every step for every
row, also past a request's last token); its padded tokens, what the compiled bucket computed
(engine/buckets.py). useful / padded is the share of the work that counted. Host time is the step's
wall time less the time the engine thread waited for the devices' results; with the overlap
scheduler the device runs the next dispatch during the host time of this one. Its dispatch time is
the part of the host time spent in the runner's dispatch calls: on a GPU a call returns once its
kernels are queued, and a program of more kernels than the launch queue holds (a multi-step decode)
can keep the call until the device has run all but the queue's last ones, and then dispatch time is
mostly the device's.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, defaultdict

KINDS = ("prefill", "mixed", "decode", "multi-step")


@dataclasses.dataclass
class StepRecord:
    kind: str  # one of KINDS
    decode_steps: int  # decodes per sequence in the dispatch (1 unless multi-step)
    seqs: int  # sequences in the step
    padded_seqs: int  # the bucket's rows
    tokens: int  # useful: prompt tokens computed, plus tokens the decodes gave requests
    row_tokens: int  # computed in rows of requests (decode_steps x the forward's real tokens)
    padded_tokens: int  # the bucket computed (decode_steps x its token rows)
    prompt_tokens: int  # of `tokens`, prompt tokens (prefill chunks)
    wall_s: float  # the whole step
    wait_s: float  # the engine thread blocked on the devices' results
    dispatch_s: float = 0.0  # of the rest, in the runner's dispatch calls (the step dispatched ahead's too)
    ahead: bool = False  # dispatched before the previous step was read (the overlap scheduler)


def step_kind(num_prompt_tokens: int, num_decodes: int, decode_steps: int) -> str:
    if decode_steps > 1:
        return "multi-step"
    if num_prompt_tokens and num_decodes:
        return "mixed"
    return "prefill" if num_prompt_tokens else "decode"


class StepTrace:
    """The records of an engine's steps while tracing is on (`Engine.trace_steps`); the engine
    thread appends, any thread takes."""

    def __init__(self):
        self._records: list[StepRecord] = []
        self._lock = threading.Lock()

    def add(self, record: StepRecord) -> None:
        with self._lock:
            self._records.append(record)

    def take(self) -> list[StepRecord]:
        with self._lock:
            records, self._records = self._records, []
        return records


# The StepRecord fields a breakdown sums over a kind's (or a bucket's) steps.
_SUMMED = ("wall_s", "wait_s", "dispatch_s", "tokens", "row_tokens", "padded_tokens", "prompt_tokens", "seqs",
           "padded_seqs")


def breakdown(records: list[StepRecord]) -> dict:
    """The figures of a trace: per kind, its steps, time, tokens and padding; per kind and bucket
    (the tokens a forward of the step computes), its steps, share of the time and ms a forward (a
    multi-step decode's wall time over its decodes); and overall, the share of computed tokens that
    were useful and the host time per step."""
    # per kind, and per kind and bucket (the tokens one forward of the step computes)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    by_bucket: dict[tuple, Counter] = defaultdict(Counter)
    for r in records:
        for sums in (by_kind[r.kind], by_bucket[(r.kind, r.padded_tokens // r.decode_steps)]):
            sums["steps"] += 1
            sums["decodes"] += r.decode_steps
            for field in _SUMMED:
                sums[field] += getattr(r, field)
    total_wall = sum(r.wall_s for r in records) or 1e-12
    steps = len(records) or 1
    kinds = {}
    for name in KINDS:
        if name not in by_kind:
            continue
        k = by_kind[name]
        kinds[name] = {
            "steps": k["steps"],
            "share_of_steps": k["steps"] / steps,
            "share_of_time": k["wall_s"] / total_wall,
            "mean_step_ms": 1e3 * k["wall_s"] / k["steps"],
            "mean_host_ms": 1e3 * (k["wall_s"] - k["wait_s"]) / k["steps"],
            "mean_dispatch_ms": 1e3 * k["dispatch_s"] / k["steps"],
            "mean_seqs": k["seqs"] / k["steps"],
            "useful_token_share": k["tokens"] / max(k["padded_tokens"], 1),
            "useful_row_share": k["seqs"] / max(k["padded_seqs"], 1),
            "tokens": k["tokens"],
            "row_tokens": k["row_tokens"],
            "padded_tokens": k["padded_tokens"],
        }
    tokens = sum(r.tokens for r in records)
    padded = sum(r.padded_tokens for r in records)
    buckets = [{"kind": kind, "bucket_tokens": size, "steps": b["steps"], "share_of_time": b["wall_s"] / total_wall,
                "ms_per_forward": 1e3 * b["wall_s"] / b["decodes"], "mean_seqs": b["seqs"] / b["steps"],
                "useful_token_share": b["tokens"] / max(b["padded_tokens"], 1)}
               for (kind, size), b in sorted(by_bucket.items())]  # fmt: skip
    return {
        "steps": len(records),
        "wall_s": sum(r.wall_s for r in records),
        "tokens": tokens,
        "row_tokens": sum(r.row_tokens for r in records),
        "padded_tokens": padded,
        "useful_token_share": tokens / max(padded, 1),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "mean_host_ms": 1e3 * sum(r.wall_s - r.wait_s for r in records) / steps,
        "host_share": sum(r.wall_s - r.wait_s for r in records) / total_wall,
        "mean_dispatch_ms": 1e3 * sum(r.dispatch_s for r in records) / steps,
        "ahead_share": sum(r.ahead for r in records) / steps,
        "kinds": kinds,
        "buckets": buckets,
    }


def table(figures: dict) -> str:
    """A breakdown as a plain-text table."""
    lines = [
        f"steps {figures['steps']}, {figures['wall_s']:.2f} s; tokens computed {figures['padded_tokens']:,}, "
        f"in requests' rows {figures['row_tokens']:,}, useful {figures['tokens']:,} "
        f"({100 * figures['useful_token_share']:.1f}%); host time "
        f"{figures['mean_host_ms']:.2f} ms/step ({100 * figures['host_share']:.1f}% of the wall time; of it "
        f"{figures['mean_dispatch_ms']:.2f} ms in dispatch calls); "
        f"{100 * figures['ahead_share']:.1f}% of steps dispatched ahead of the last one's read",
        f"{'kind':<11}{'steps':>7}{'% steps':>9}{'% time':>8}{'ms/step':>9}{'host ms':>9}{'dispatch':>9}{'seqs':>7}"
        f"{'% useful tok':>14}{'% useful rows':>15}",
    ]
    for name, k in figures["kinds"].items():
        lines.append(f"{name:<11}{k['steps']:>7}{100 * k['share_of_steps']:>9.1f}{100 * k['share_of_time']:>8.1f}"
                     f"{k['mean_step_ms']:>9.2f}{k['mean_host_ms']:>9.2f}{k['mean_dispatch_ms']:>9.2f}"
                     f"{k['mean_seqs']:>7.1f}"
                     f"{100 * k['useful_token_share']:>14.1f}{100 * k['useful_row_share']:>15.1f}")  # fmt: skip
    if figures.get("buckets"):
        lines.append(f"{'kind':<11}{'bucket':>7}{'steps':>7}{'% time':>8}{'ms a forward':>14}{'seqs':>7}{'% useful tok':>14}")
        for b in figures["buckets"]:
            lines.append(f"{b['kind']:<11}{b['bucket_tokens']:>7}{b['steps']:>7}{100 * b['share_of_time']:>8.1f}"
                         f"{b['ms_per_forward']:>14.2f}{b['mean_seqs']:>7.1f}{100 * b['useful_token_share']:>14.1f}")  # fmt: skip
    return "\n".join(lines)
