"""What a benchmark measured, per request and in summary: the figures trtllm-bench and vllm bench
report, a table on the terminal, and the JSON file.

Every time is in seconds inside and in milliseconds in the summary (`*_ms`); throughputs are per
second of the measured pass's wall time (first request submitted to last one finished).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestRecord:
    """One request's measurements.

    ttft: submission to its first output token (queueing included, as its user sees it).
    latency: submission to its last token.
    itl: gaps between successive arrivals of tokens (streamed only; a run of tokens arriving together,
      as multi-step decoding sends them, is one arrival).
    error: why it failed (None when it succeeded); a failed request counts in `failed`, never in the figures.
    """

    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def distribution(values_s: list[float]) -> dict:
    """mean and percentiles, in ms, of `values_s` (seconds); None figures when there are no values."""
    import numpy as np

    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}}


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """The figures of one pass of `records` that took `duration_s` of wall time.

    per_user_output_speed_tok_s: 1 / the mean TPOT, the rate a user's tokens arrive once the first
    has (trtllm-bench's per-user output speed); the reciprocal of the mean, not the mean of the
    reciprocals, which a request whose tokens all arrive in one burst (a tiny TPOT) would swamp.
    """
    done = [r for r in records if r.error is None]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [r.tpot for r in done if r.tpot is not None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    itl = [gap for r in done for gap in r.itl]
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "total_latency_s": duration_s,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput_req_s": len(done) / duration_s,
        "total_output_throughput_tok_s": output_tokens / duration_s,
        "total_token_throughput_tok_s": (prompt_tokens + output_tokens) / duration_s,
        "per_user_output_speed_tok_s": len(tpots) / sum(tpots) if tpots and sum(tpots) > 0 else None,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution(tpots),
        "itl_ms": distribution(itl),
        "e2e_latency_ms": distribution([r.latency for r in done if r.latency is not None]),
    }


_ROWS = (
    ("requests completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
    ("total latency (s)", lambda s: _num(s["total_latency_s"], 3)),
    ("prompt tokens", lambda s: str(s["total_prompt_tokens"])),
    ("output tokens", lambda s: str(s["total_output_tokens"])),
    ("request throughput (req/s)", lambda s: _num(s["request_throughput_req_s"], 3)),
    ("output throughput (tok/s)", lambda s: _num(s["total_output_throughput_tok_s"], 1)),
    ("total token throughput (tok/s)", lambda s: _num(s["total_token_throughput_tok_s"], 1)),
    ("per-user output speed (tok/s/user)", lambda s: _num(s["per_user_output_speed_tok_s"], 1)),
)


def _num(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(title: str, columns: dict[str, dict | None]) -> str:
    """A text table of summaries side by side (`columns`: heading -> summary; None columns left out)."""
    columns = {name: s for name, s in columns.items() if s is not None}
    width = 36
    lines = [f"== {title} ==", f"{'':{width}}" + "".join(f"{name:>16}" for name in columns)]
    for label, cell in _ROWS:
        lines.append(f"{label:{width}}" + "".join(f"{cell(s):>16}" for s in columns.values()))
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_latency_ms", "E2E latency")):
        if all(s[key]["mean"] is None for s in columns.values()):
            continue
        for stat in ("mean", *(f"p{q}" for q in PERCENTILES)):
            lines.append(f"{label + ' ' + stat + ' (ms)':{width}}"
                         + "".join(f"{_num(s[key][stat], 2):>16}" for s in columns.values()))  # fmt: skip
    for name, s in columns.items():
        for error, count in s["errors"].items():
            lines.append(f"{name}: {count} failed: {error}")
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> Path:
    """Write `result` to `path` as JSON, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
