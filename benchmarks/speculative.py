"""Speculative decoding at batch 1: time per output token with n-gram drafts
(`NGramDecodingConfig`; with --draft-model, a draft model's) against the same engine without them,
in one call.

    PYTHONPATH=$PWD python benchmarks/speculative.py                      # Llama-3.1-8B shape, bf16
    PYTHONPATH=$PWD python benchmarks/speculative.py --model smollm2-135m --dtype float32 --tokens 64   # CPU smoke

Random weights (load_format="dummy"). Three prompts, each generating `--tokens` greedy tokens,
streaming, the time per token measured after the first token (first run and a second run):
  repetitive: a 64-token passage four times over (as code editing repeats its input);
  own output: a prompt whose greedy continuation the shared pattern pool has seen once (a request
    with the same prompt ran before): every draft is what the model writes, the drafter's ceiling;
  random: no repetition, the drafts' overhead.
Each engine's steps with and without drafts are timed from get_stats (iterLatencyMS). The greedy
tokens of the two engines are compared. Prints a table and one RESULT line (JSON, also to $OUT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from common import CONFIGS, print_result


def timed(llm, prompt, params) -> tuple[float, list[int]]:
    """(ms per output token after the first, the tokens) of one streaming request."""
    marks = []
    out = None
    for out in llm.generate_async(prompt, params, streaming=True):
        marks.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (t1 - t0) / max(1, n1 - n0) * 1e3, list(out.outputs[0].token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--draft-model", default=None, metavar="SHAPE",
                        help="draft with a model of this shape (benchmarks/configs/, random weights) instead of n-grams")
    parser.add_argument("--no-command-buffers", action="store_true",
                        help="LLM(cuda_graph_config=None): XLA records no command buffers (CUDA graphs)")
    parser.add_argument("--profile", action="store_true",
                        help="trace 64 tokens of the own-output case with drafts (JAX profiler, under $OUT/trace)")
    parser.add_argument("--sync-baseline", action="store_true",
                        help="also time the engine with one decode a dispatch and no step ahead")
    args = parser.parse_args()
    import jax
    import numpy as np

    from jaxllm import LLM, DraftTargetDecodingConfig, NGramDecodingConfig, SamplingParams

    engine_args = dict(load_format="dummy", dtype=args.dtype, skip_tokenizer_init=True, max_batch_size=16,
                       max_num_tokens=2048, max_seq_len=2048)  # fmt: skip
    if args.no_command_buffers:
        engine_args["cuda_graph_config"] = None
    rng = np.random.default_rng(0)
    result = {"device": jax.devices()[0].device_kind, "model": args.model, "dtype": args.dtype,
              "drafter": args.draft_model or "ngram",
              "command_buffers": not args.no_command_buffers,
              "draft_len": args.draft_len, "tokens": args.tokens, "cases": {}}  # fmt: skip
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    runs: dict[str, dict] = {}
    if args.draft_model:  # a draft model's drafts (random weights of its shape) in the drafted engine's place
        spec_config = DraftTargetDecodingConfig(max_draft_len=args.draft_len, speculative_model=str(CONFIGS / args.draft_model))
    else:
        spec_config = NGramDecodingConfig(max_draft_len=args.draft_len)
    engines = [("plain", {}), ("ngram", {"speculative_config": spec_config})]
    if args.sync_baseline:  # one decode a dispatch, read before the next is scheduled: a verify step's setting
        engines.insert(1, ("plain, one step a dispatch", dict(num_scheduler_steps=1, disable_overlap_scheduler=True)))
    for name, extra in engines:
        started = time.perf_counter()
        llm = LLM(model=str(CONFIGS / args.model), **engine_args, **extra)
        vocab = llm.config.vocab_size
        passage = [int(t) for t in rng.integers(10, vocab - 10, size=64)] if name == "plain" else runs["plain"]["passage"]
        own = [int(t) for t in rng.integers(10, vocab - 10, size=32)] if name == "plain" else runs["plain"]["own"]
        noise = [int(t) for t in rng.integers(10, vocab - 10, size=256)] if name == "plain" else runs["plain"]["noise"]
        run = {"llm_s": time.perf_counter() - started, "passage": passage, "own": own, "noise": noise}
        llm.get_stats()
        timed(llm, own, params)  # the own-output case's earlier request (its tokens enter the pool)
        for case, prompt in (("repetitive", passage * 4), ("own output", own), ("random", noise)):
            first, tokens = timed(llm, prompt, params)
            second, again = timed(llm, prompt, params)
            stats = [s for s in llm.get_stats()]
            spec = [s["specDecodingStats"] for s in stats if "specDecodingStats" in s]
            verify = [s["iterLatencyMS"] for s in spec if s["numRequestsWithDraftTokens"]]
            drafted = sum(s["numDraftTokens"] for s in spec)
            taken = sum(s["numAcceptedTokens"] for s in spec)
            run[case] = {
                "first_ms_per_token": first, "second_ms_per_token": second, "tokens": tokens, "same_twice": tokens == again,
                "drafted": drafted, "accepted": taken, "verify_steps": len(verify),
                "acceptance_length": (taken + len(verify)) / len(verify) if verify else None,
                "verify_step_ms": statistics.median(verify) if verify else None,
            }  # fmt: skip
        if args.profile and name == "ngram":  # the own-output case again, its verify steps traced
            trace_dir = os.path.join(os.environ.get("OUT") or "/tmp", "trace")
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            timed(llm, own, SamplingParams(max_tokens=64, ignore_eos=True))
            jax.profiler.stop_trace()
            run["trace_dir"] = trace_dir
        llm.shutdown()
        runs[name] = run
    rows = []
    for case in ("repetitive", "own output", "random"):
        p, s = runs["plain"][case], runs["ngram"][case]
        result["cases"][case] = {
            "plain_ms": [p["first_ms_per_token"], p["second_ms_per_token"]],
            "ngram_ms": [s["first_ms_per_token"], s["second_ms_per_token"]],
            "same_tokens": p["tokens"] == s["tokens"], "drafted": s["drafted"], "accepted": s["accepted"],
            "verify_steps": s["verify_steps"], "acceptance_length": s["acceptance_length"],
            "verify_step_ms": s["verify_step_ms"],
        }  # fmt: skip
        c = result["cases"][case]
        rows.append(f"| {case} | {c['plain_ms'][0]:.2f} / {c['plain_ms'][1]:.2f} | {c['ngram_ms'][0]:.2f} / "
                    f"{c['ngram_ms'][1]:.2f} | {c['plain_ms'][1] / c['ngram_ms'][1]:.2f}x | "
                    f"{c['accepted']} / {c['drafted']} | {c['acceptance_length'] or 0:.2f} | "
                    f"{c['verify_step_ms'] or 0:.2f} | {c['same_tokens']} |")  # fmt: skip
    if args.sync_baseline:
        sync = runs["plain, one step a dispatch"]
        result["one_step_a_dispatch_ms"] = {case: [sync[case]["first_ms_per_token"], sync[case]["second_ms_per_token"]]
                                            for case in ("repetitive", "own output", "random")}  # fmt: skip
        rows.append("| (no drafts, one decode a dispatch, no step ahead) | " + " | ".join(
            f"{case}: {v[1]:.2f}" for case, v in result["one_step_a_dispatch_ms"].items()) + " | | | | | | |")
    result["llm_s"] = {name: runs[name]["llm_s"] for name in runs}
    print(f"{result['device']}, {args.model} ({args.dtype}), batch 1, {args.tokens} greedy tokens, drafts by "
          f"{args.draft_model or 'n-grams'}, max_draft_len {args.draft_len}, command buffers {'off' if args.no_command_buffers else 'on'}; ms per output token, "
          "first run / second")  # fmt: skip
    print("| prompt | no drafts | with drafts | speed-up (2nd) | drafts accepted | tokens a verify step | "
          "verify step ms | same tokens |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    print("\n".join(rows))
    print_result(result)
    out = os.environ.get("OUT")
    if out:
        import json

        name = (f"speculative_k{args.draft_len}{'_nocb' if args.no_command_buffers else ''}"
                f"{'_draft_' + args.draft_model if args.draft_model else ''}.json")
        with open(os.path.join(out, name), "w") as f:
            json.dump(result, f, indent=1)  # (one file a run: --draft-len in its name)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
