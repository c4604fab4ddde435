"""The scheduler's host time per step with thousands of requests queued: plain Python, no model.

    PYTHONPATH=$PWD python benchmarks/scheduler_host.py [--requests 30000] [--distinct 30000]

A Scheduler and BlockManager driven as the engine drives them (every scheduled token computed, a
sampled token appended when a sequence's tokens are all computed, finished ones removed), with
requests of known length (ignore_eos), all queued at once: the engine's GPU defaults (2,048
sequences and 8,192 tokens a step, pages of 32 tokens, prefix reuse on, MAX_UTILIZATION) and a
cache of --pages. --distinct prompts are cycled through (fewer than --requests: admissions reuse
cached prefixes). Prints the time of `schedule()` per step (mean, p99, max) and a hash of every
step's decisions, which two trees agree on when they schedule the same steps. To compare a tree
with an older one: `git archive <commit> jaxllm | tar -x -C DIR` and run this file with
`PYTHONPATH=DIR` beside the current tree's run.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig
from jaxllm.engine.sequence import Request, Sequence, SequenceStatus
from jaxllm.sampling_params import SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--distinct", type=int, default=30000, help="distinct prompts (fewer: prefix-cache hits)")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1500, help="the most steps to time")
    ap.add_argument("--pages", type=int, default=41000, help="KV pages (41,000 x 32 tokens: an H100's 8B bf16 cache)")
    ap.add_argument("--policy", default="MAX_UTILIZATION", choices=("MAX_UTILIZATION", "GUARANTEED_NO_EVICT"))
    args = ap.parse_args()

    page = 32
    bm = BlockManager(args.pages, page, enable_reuse=True)
    scheduler = Scheduler(SchedulerConfig(8192, 2048, capacity_policy=args.policy, max_seq_len=args.isl + args.osl), bm)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 30000) for _ in range(args.isl)] for _ in range(args.distinct)]
    params = SamplingParams(max_tokens=args.osl, ignore_eos=True)
    for i in range(args.requests):
        tokens = prompts[i % args.distinct]
        request = Request(request_id=i, prompt=None, prompt_token_ids=list(tokens), params=params, output=None,
                          priority=0.5, stop_token_ids=frozenset())  # fmt: skip
        seq = Sequence(seq_id=i, request=request, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                       seed=0)  # fmt: skip
        request.sequences.append(seq)
        scheduler.add(seq)

    times, decisions, rows = [], hashlib.sha256(), []
    while scheduler.has_work() and len(times) < args.steps:
        t = time.perf_counter()
        step = scheduler.schedule()
        times.append(time.perf_counter() - t)
        decisions.update(repr([(s.seq_id, n) for s, n in step.items] + [s.seq_id for s in step.preempted]).encode())
        rows.append(len(step.items))
        for seq, n in step.items:
            seq.num_computed += n
            bm.register_computed(seq)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= args.osl:
                    seq.status = SequenceStatus.FINISHED
                    scheduler.remove(seq)
    ms = sorted(x * 1e3 for x in times)
    print(f"{args.requests} requests {args.isl}/{args.osl}, {args.distinct} distinct prompts, {args.policy}: "
          f"{len(ms)} steps of {statistics.mean(rows):.0f} sequences on average; schedule() "
          f"mean {statistics.mean(ms):.2f} ms, p99 {ms[int(0.99 * len(ms))]:.1f}, max {ms[-1]:.1f}; "
          f"decisions {decisions.hexdigest()[:16]}")  # fmt: skip


if __name__ == "__main__":
    main()
