"""Replay a mix's decodes under the decode cap's row policies, with each bucket's measured cost.

`realistic_load.py` records every step of a pass (kind, sequences, bucket, decodes, wall ms). From
an uncapped pass's multi-step decodes this script recovers how many more dispatches each sequence
ran when the decodes began (a sequence ends where the count of sequences drops), takes each bucket's
median cost a forward, and replays the decodes with no cap and with the decode cap
(jaxllm/engine/decode_cap.py's rule, DecodeCap.rows, over the measured costs)
choosing its rows by least recently run, or as the scheduler does (`Scheduler._capped`: a sequence
left out of a step runs in the next, the others by the most dispatches still to come). The bucket
costs are taken as fixed (the engine times them as it goes and tries a bucket once before judging it).

    PYTHONPATH=$PWD python benchmarks/decode_cap_replay.py \
        benchmarks/results/mix_decode_cap_lru_ab_h100_2026-12-06.json [--pass second_pass]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

from jaxllm.engine.decode_cap import DecodeCap
from jaxllm.engine.scheduler import CAP_MAX_SKIPS


def replay(lengths: list[int], cost: dict[int, float], policy: str, decode_steps: int = 8) -> tuple[float, int]:
    """(seconds, dispatches) of decoding sequences that need `lengths` more dispatches each."""
    buckets = sorted(cost)
    cap = DecodeCap(buckets, decode_steps)  # the engine's rule, over these fixed costs
    cap.cost = cost.get
    left, last = list(lengths), [0] * len(lengths)
    seconds, dispatch = 0.0, 0
    while True:
        alive = [i for i, n in enumerate(left) if n > 0]
        if not alive:
            return seconds, dispatch
        n = len(alive)
        run, bucket = alive, next(b for b in buckets if b >= n)
        rows = cap.rows(n) if policy != "off" else n
        if rows < n:
            bucket = rows
            if policy == "least-recent":
                key = lambda i: (last[i], i)  # noqa: E731
            else:  # the scheduler's (Scheduler._capped): left out too long first, then the most to come
                key = lambda i: (dispatch - last[i] < CAP_MAX_SKIPS, -left[i], last[i], i)  # noqa: E731
            run = sorted(alive, key=key)[:bucket]
        for i in run:
            left[i] -= 1
            last[i] = dispatch + 1
        seconds += decode_steps * cost[bucket] / 1e3
        dispatch += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mix_json")
    parser.add_argument("--pass", dest="which", default="second_pass", help="an uncapped pass of the file")
    args = parser.parse_args(argv)
    record = json.load(open(args.mix_json))[args.which]
    steps = [s for s in record["steps"] if s[0] == "multi-step"]
    if record.get("decode_cap"):
        raise SystemExit(f"{args.which} ran with the decode cap on: replay an uncapped pass")
    per_bucket = collections.defaultdict(list)
    for _, _, bucket, decodes, ms in steps:
        per_bucket[bucket].append(ms / decodes)
    cost = {b: statistics.median(v) for b, v in per_bucket.items()}
    counts = [s[1] for s in steps] + [0]
    lengths = [j + 1 for j in range(len(counts) - 1) for _ in range(max(0, counts[j] - counts[j + 1]))]
    print("ms a forward by bucket:", {b: round(c, 2) for b, c in sorted(cost.items())})
    print(f"measured: {sum(s[4] for s in steps) / 1e3:.2f} s in {len(steps)} multi-step dispatches")
    for policy in ("off", "least-recent", "scheduler"):
        seconds, dispatches = replay(lengths, cost, policy)
        print(f"replayed, cap {policy:>12}: {seconds:.2f} s in {dispatches} dispatches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
