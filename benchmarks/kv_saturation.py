"""Offline requests that outgrow the KV cache: the two capacity policies side by side, one process.

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/kv_saturation.py                    # CPU, small
    PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 python benchmarks/kv_saturation.py \\
        --model llama-3.1-8b --requests 1000 --isl 128 --osl 2048 --kv-tokens 0 --max-batch-size 2048  # a GPU

Every request has a fixed prompt and output length (ignore_eos; --osl-min: output lengths drawn
from a range), all queued at once, into a KV cache that holds only part of them at full length
(--kv-tokens: the cache's bound; 0: the device's default). MAX_UTILIZATION (jaxllm's default)
admits what this step's pages fit and, since these requests' lengths are known, what the projected
peak of every sequence's growth fits (scheduler.SureGrowth), and preempts the newest sequence when
a page runs out (it is recomputed later: its prompt and its output so far); GUARANTEED_NO_EVICT
(TensorRT-LLM's default) admits a sequence only when its whole length fits beside the whole
lengths the running ones may still take. Block reuse is on, as by default (a preempted
sequence's full pages stay cached until evicted, and its return reuses what is left of them);
--no-block-reuse turns it off. For each, an engine of its own (dummy weights of
benchmarks/configs/MODEL), a warm-up of two requests, then the run: output tok/s, steps, forwards
(a multi-step decode counts its decodes), the tokens computed against the requests' own (the
excess is recomputation after preemption), the step kinds. Nothing is subtracted. JSON to --out.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from common import CONFIGS, default_out, device_name, synthetic, write_json

POLICIES = ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT")


def run(policy: str, args) -> dict:
    from jaxllm import LLM, KvCacheConfig, SamplingParams, SchedulerConfig
    from jaxllm.engine import scheduler, step_trace

    scheduler.PROJECT_SURE_GROWTH = not args.no_projection

    bound = {"max_tokens": args.kv_tokens} if args.kv_tokens else {}
    kv = KvCacheConfig(enable_block_reuse=not args.no_block_reuse, **bound)
    started = time.perf_counter()
    llm = LLM(model=str(CONFIGS / args.model), load_format="dummy", dtype=args.dtype, skip_tokenizer_init=True,
              max_batch_size=args.max_batch_size, max_seq_len=args.isl + args.osl + 32, kv_cache_config=kv,
              scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy))  # fmt: skip
    ready_s = time.perf_counter() - started
    engine = llm._engine
    prompts = synthetic(args.requests, args.isl, llm.config.vocab_size, 1)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in output_lengths(args)]
    llm.generate(synthetic(2, args.isl, llm.config.vocab_size, 2), params[:2], use_tqdm=False)
    engine.trace_steps(True)
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    records = engine.trace_steps(False)
    capacity = (engine.runner.config.num_pages - 1) * engine.runner.config.page_size
    llm.shutdown()
    figures = step_trace.breakdown(records)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    computed = sum(r.tokens for r in records)
    needed = sum(args.isl + p.max_tokens for p in params)
    return {"policy": policy + (" (no projection)" if args.no_projection and policy == "MAX_UTILIZATION" else ""),
            "ready_s": ready_s, "wall_s": wall, "output_tok_s": output_tokens / wall,
            "kv_capacity_tokens": capacity, "full_length_sequences_that_fit": capacity // (args.isl + args.osl),
            "mean_output_length": sum(p.max_tokens for p in params) / len(params),
            "steps": len(records), "forwards": sum(r.decode_steps for r in records),
            "tokens_computed": computed, "tokens_of_the_requests": needed,
            "recomputed_share": max(0, computed - needed) / needed,
            "kinds": {k: {"steps": v["steps"], "mean_seqs": v["mean_seqs"], "share_of_time": v["share_of_time"]}
                      for k, v in figures["kinds"].items()}}  # fmt: skip


def output_lengths(args) -> list[int]:
    """Each request's output length: --osl, or with --osl-min drawn uniformly from [osl-min, osl] (seeded)."""
    if args.osl_min is None:
        return [args.osl] * args.requests
    rng = random.Random(0)
    return [rng.randint(args.osl_min, args.osl) for _ in range(args.requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a shape in benchmarks/configs (dummy weights)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--isl", type=int, default=16)
    parser.add_argument("--osl", type=int, default=240)
    parser.add_argument("--osl-min", type=int, default=None,
                        help="output lengths drawn uniformly from [OSL_MIN, OSL] (seeded) instead of all OSL")
    parser.add_argument("--kv-tokens", type=int, default=4096, help="the KV cache's bound in tokens (0: the default)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the engine's (2048 is its GPU default)")
    parser.add_argument("--no-block-reuse", action="store_true",
                        help="no prefix cache (by default a preempted sequence's full pages stay cached until evicted)")
    parser.add_argument("--no-projection", action="store_true",
                        help="MAX_UTILIZATION without the projection of sure growth (scheduler.PROJECT_SURE_GROWTH), "
                             "as before 2026-12-05")  # fmt: skip
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated, run in this order (default: {','.join(POLICIES)})")
    parser.add_argument("--out", default=os.path.join(default_out(), "kv_saturation.json"))
    args = parser.parse_args()
    if args.osl_min is not None and not 1 <= args.osl_min <= args.osl:
        parser.error(f"--osl-min {args.osl_min}: allowed 1..--osl ({args.osl})")
    policies = args.policies.split(",")
    for policy in policies:
        if policy not in POLICIES:
            parser.error(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")

    rows = []
    for policy in policies:  # the JSON is written after each, so a run cut short keeps what finished
        rows.append(run(policy, args))
        r = rows[-1]
        print(f"{policy}: engine ready in {r['ready_s']:.0f} s, the run {r['wall_s']:.0f} s, "
              f"{r['output_tok_s']:,.0f} output tok/s", flush=True)  # fmt: skip
        write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "args": vars(args),
                              "rows": rows})  # fmt: skip
    osl = args.osl if args.osl_min is None else f"{args.osl_min}-{args.osl}"
    print(f"{args.model}, {args.requests} x {args.isl}/{osl}, KV {rows[0]['kv_capacity_tokens']:,} tokens "
          f"({rows[0]['full_length_sequences_that_fit']} sequences at full length)")  # fmt: skip
    print("| policy | output tok/s | steps | forwards | tokens computed / the requests' | recomputed "
          "| step kinds (steps x mean sequences) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v['steps']} x {v['mean_seqs']:.0f}" for k, v in r["kinds"].items())
        print(f"| {r['policy']} | {r['output_tok_s']:,.0f} | {r['steps']} | {r['forwards']} "
              f"| {r['tokens_computed']:,} / {r['tokens_of_the_requests']:,} | {100 * r['recomputed_share']:.0f}% "
              f"| {kinds} |")  # fmt: skip


if __name__ == "__main__":
    main()
