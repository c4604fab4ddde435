"""Realistic load on one card, and where its time goes: the ShareGPT-like mix offline (every request
queued at once), its first pass (compilation included, never subtracted) beside its second, with
output tok/s, TTFT and TPOT percentiles and the engine's step breakdown (engine/step_trace.py:
step kinds, padding waste, host time per step); then, on a GPU, the kernels the mix leans on
against what the card can do: prefill attention (the ragged Pallas kernel against cuDNN's
`jax.nn.dot_product_attention`, at the mix's prompt lengths, same run) and the model's GEMMs
(achieved TFLOP/s against the datasheet's dense bf16 rate).

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/realistic_load.py --card h200   # JSON to $OUT
    PYTHONPATH=$PWD python benchmarks/realistic_load.py --card cpu                       # SmolLM2, small mix

--requests / --prompt-mean / --output-mean / --sigma / --max-prompt / --max-output / --seed change
the mix (defaults: the card's, common.CARDS); --decode-batch-sizes the decode buckets (finer ones
pad a decode of the mix's tail less, and compile more programs); --max-batch-size / --max-num-tokens
the engine's limits (default: the card's); --skip-kernels leaves out the kernel section;
--model / --kv-cache-dtype another config of benchmarks/configs and an FP8 KV cache; --fixed IN/OUT
runs --requests fixed-length requests instead of the mix; --passes 1-4 with
--decode-cap on|off|alternate sets the engine's decode cap in each pass (jaxllm/engine/decode_cap.py).
Prints tables, and one JSON line (RESULT ...) that is also written to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from common import CARDS, CONFIGS, default_out, print_result, time_calls, write_json

# Datasheet dense bf16 tensor-core rates, TFLOP/s (no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


PASSES = (("first_pass", "realistic-load-first"), ("second_pass", None), ("third_pass", "realistic-load-third"),
          ("fourth_pass", "realistic-load-fourth"))


def run_mix(llm, requests, log, passes: int = 2, decode_cap: str = "default") -> dict:
    """The mix `passes` times (1 to 4) through the same engine: the first pass (whatever it compiles
    counts), then the others, each with its summary and step breakdown. `decode_cap` ("on", "off",
    or "alternate": on in odd passes, off in even ones) sets the engine's decode cap
    (jaxllm/engine/decode_cap.py) for each pass; "default" leaves it."""
    from jaxllm.bench.offline import throughput_pass
    from jaxllm.engine import step_trace
    from jaxllm.engine.decode_cap import DecodeCap

    engine = llm._check_open()
    cap = engine.decode_cap or DecodeCap(engine.runner.buckets.seq_buckets, engine.decode_steps)
    result = {}
    for number, (name, salt) in enumerate(PASSES[:passes]):
        if decode_cap != "default":
            engine.decode_cap = cap if decode_cap == "on" or (decode_cap == "alternate" and number % 2 == 0) else None
        capped_before = cap.num_capped
        engine.trace_steps(True)
        summary = throughput_pass(llm, requests, salt)
        records = engine.trace_steps(False)
        figures = step_trace.breakdown(records)
        # every step, in order: kind, sequences, the bucket's tokens a forward, decodes, wall ms
        steps = [[r.kind, r.seqs, r.padded_tokens // r.decode_steps, r.decode_steps, round(1e3 * r.wall_s, 2)]
                 for r in records]  # fmt: skip
        result[name] = {"summary": summary, "breakdown": figures, "steps": steps,
                        "decode_cap": engine.decode_cap is not None, "capped_steps": cap.num_capped - capped_before}
        log(f"\n{name} (decode cap {'on' if engine.decode_cap is not None else 'off'}, "
            f"{cap.num_capped - capped_before} steps capped): "
            f"{summary['total_output_throughput_tok_s']:,.0f} output tok/s, "
            f"TTFT p50/p99 {summary['ttft_ms']['p50']:.0f}/{summary['ttft_ms']['p99']:.0f} ms, "
            f"TPOT p50/p99 {summary['tpot_ms']['p50']:.1f}/{summary['tpot_ms']['p99']:.1f} ms, "
            f"{summary['total_latency_s']:.1f} s")  # fmt: skip
        log(step_trace.table(figures))
    if passes > 1:
        first, second = (result[k]["summary"]["total_output_throughput_tok_s"] for k in ("first_pass", "second_pass"))
        result["second_over_first"] = second / first
    return result


def profile_pass(llm, requests, log) -> dict:
    """One more pass of `requests` under the JAX profiler; the GPU's busy time and top kernels."""
    import glob
    import tempfile

    import jax

    import trace_summary
    from jaxllm.bench.offline import throughput_pass

    trace_dir = tempfile.mkdtemp(prefix="jaxllm-realistic-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    summary = throughput_pass(llm, requests, "realistic-load-profile")
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    events, processes = trace_summary.load_events(path)
    gpus = trace_summary.summarize(events, processes, top=30)
    log(f"\nprofiled pass of {len(requests)} requests: {summary['total_output_throughput_tok_s']:,.0f} output tok/s "
        f"(the profiler slows it)")  # fmt: skip
    log(trace_summary.format_summary(path, top=30))
    return {"requests": len(requests), "summary": summary, "gpus": gpus}


def prefill_attention(prompt_lens, log) -> list[dict]:
    """kernel_bandwidth's prefill comparison (ragged Pallas, cuDNN, XLA) at `prompt_lens`."""
    import numpy as np

    import kernel_bandwidth as kb

    setup = dataclasses.replace(kb.FULL, prefill_lens=tuple(prompt_lens))
    return kb.bench_prefill(setup, np.random.default_rng(0), log)


def gemm_efficiency(config, token_counts, peak_tflops: float | None, log) -> list[dict]:
    """The decoder layer's GEMMs of `config` (bf16) at `token_counts` rows: achieved TFLOP/s, and
    the share of the datasheet rate."""
    import jax
    import jax.numpy as jnp

    h, ffn = config.hidden_size, config.intermediate_size
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    shapes = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * ffn), "down": (ffn, h)}
    rows = []
    log(f"\n{'tokens':>6}  {'gemm':<8} {'K x N':>13} {'time us':>9} {'TFLOP/s':>8} {'% peak':>7}")
    for tokens in token_counts:
        for name, (k, n) in shapes.items():
            # 16 products in one program, each with its own weight, as a forward's layers have: one
            # program's launch and the wait for it (~250 us) are shared, and no weight is still in
            # L2 from the product before (a shared one was, and XLA may merge products that share one).
            key = jax.random.key(tokens)
            xs = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (tokens, k), jnp.bfloat16),
                   (jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (k, n), jnp.bfloat16) * 0.02))
                  for i in range(16)]  # fmt: skip
            seconds, _ = time_calls(lambda x, w: x @ w, xs, repeats=5)
            del xs
            tflops = 2 * tokens * k * n / seconds / 1e12
            row = {"tokens": tokens, "gemm": name, "k": k, "n": n, "seconds": seconds, "tflop_per_s": tflops,
                   "share_of_peak": tflops / peak_tflops if peak_tflops else None}  # fmt: skip
            rows.append(row)
            share = f"{100 * row['share_of_peak']:.1f}" if peak_tflops else "-"
            log(f"{tokens:>6}  {name:<8} {f'{k} x {n}':>13} {seconds * 1e6:>9.1f} {tflops:>8.1f} {share:>7}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", choices=sorted(CARDS), default="h200")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--prompt-mean", type=float, default=None)
    parser.add_argument("--output-mean", type=float, default=None)
    parser.add_argument("--sigma", type=float, default=None)
    parser.add_argument("--max-prompt", type=int, default=None)
    parser.add_argument("--max-output", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None,
                        help="a config of benchmarks/configs with random weights instead of the card's (e.g. "
                             "llama-3.1-8b-fp8: a ModelOpt FP8 checkpoint's format)")
    parser.add_argument("--kv-cache-dtype", choices=("fp8",), default=None, help="an FP8 KV cache")
    parser.add_argument("--fixed", default=None, metavar="IN/OUT",
                        help="fixed-length requests instead of the mix: --requests of IN prompt tokens and OUT "
                             "output tokens each (e.g. 128/2048)")
    parser.add_argument("--passes", type=int, choices=(1, 2, 3, 4), default=2, help="passes of the mix (default 2)")
    parser.add_argument("--decode-cap", choices=("default", "on", "off", "alternate"), default="default",
                        help="the engine's decode cap (jaxllm/engine/decode_cap.py) in each pass; alternate: on "
                             "in the first and third, off in the second and fourth (default: the engine's)")
    parser.add_argument("--skip-kernels", action="store_true", help="only the mix")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then a third pass of the mix's first N requests under the JAX profiler: its GPU "
                             "kernels, grouped (benchmarks/trace_summary.py)")
    parser.add_argument("--decode-batch-sizes", default=None, metavar="B1,B2,...",
                        help="the decode buckets (cuda_graph_config.batch_sizes; default: powers of two)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="the engine's (default: the card's)")
    parser.add_argument("--max-num-tokens", type=int, default=None, help="the engine's (default: the card's)")
    parser.add_argument("--rope-in-kv-write", choices=("on", "off"), default=None,
                        help="whether the compiled 'pallas' backend rotates q and k in its K/V write kernel "
                             "(jaxllm/layers/attention.py ROPE_IN_KV_WRITE; default: the engine's, on since "
                             "2026-12-05)")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = parser.parse_args(argv)
    if args.fixed is not None:
        parts = args.fixed.split("/")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            parser.error(f"--fixed must be IN/OUT in tokens, e.g. 128/2048; got {args.fixed!r}")
    import jax

    from jaxllm import LLM
    from jaxllm.layers import attention

    if args.rope_in_kv_write is not None:
        attention.ROPE_IN_KV_WRITE["pallas"] = args.rope_in_kv_write == "on"
    from jaxllm.bench.datasets import fixed_requests, sharegpt_like_requests

    card = dict(CARDS[args.card])
    if args.model:
        card["model"] = str(CONFIGS / args.model)
    llm_args = dict(card["llm"])
    if args.kv_cache_dtype:
        llm_args["kv_cache_config"] = {**llm_args.get("kv_cache_config", {}), "dtype": args.kv_cache_dtype}
    for key in ("max_batch_size", "max_num_tokens"):
        if getattr(args, key) is not None:
            llm_args[key] = getattr(args, key)
    if args.decode_batch_sizes:
        llm_args["cuda_graph_config"] = {"batch_sizes": [int(b) for b in args.decode_batch_sizes.split(",")]}
    mix = dict(card["mix"])
    for key in ("requests", "prompt_mean", "output_mean", "sigma", "max_prompt", "max_output"):
        if getattr(args, key) is not None:
            mix["n" if key == "requests" else key] = getattr(args, key)

    def log(line):
        print(line, flush=True)

    device = jax.devices()[0]
    result = {"card": args.card, "model": card["model"], "device": device.device_kind, "jax": jax.__version__,
              "mix": mix, "date": time.strftime("%Y-%m-%d"), "decode_batch_sizes": args.decode_batch_sizes,
              "rope_in_kv_write": getattr(attention, "ROPE_IN_KV_WRITE", {}).get("pallas", False),  # older trees: none
              "llm_args": {k: v for k, v in llm_args.items() if isinstance(v, (int, str, dict))}}  # fmt: skip
    log(f"device: {device.device_kind}; mix: {mix}")
    started = time.perf_counter()
    with LLM(model=card["model"], **llm_args) as llm:
        result["llm_s"] = time.perf_counter() - started
        if args.fixed:
            prompt_len, output_len = (int(x) for x in args.fixed.split("/"))
            requests = fixed_requests(mix["n"], prompt_len, output_len, llm.config.vocab_size, args.seed)
            result["fixed"] = args.fixed
        else:
            requests = sharegpt_like_requests(mix["n"], llm.config.vocab_size, args.seed, mix["prompt_mean"],
                                              mix["output_mean"], mix["sigma"], mix["max_prompt"],
                                              mix["max_output"])  # fmt: skip
        lens = sorted(len(r.prompt) for r in requests)
        result["prompt_tokens_p50_p90_p99"] = [lens[len(lens) * q // 100] for q in (50, 90, 99)]
        log(f"LLM() ready in {result['llm_s']:.1f} s; prompt tokens p50/p90/p99 {result['prompt_tokens_p50_p90_p99']}")
        result.update(run_mix(llm, requests, log, args.passes, args.decode_cap))
        if args.profile:
            result["profile"] = profile_pass(llm, requests[: args.profile], log)
        config = llm.config
    if not args.skip_kernels and device.platform == "gpu":
        from common import free_device

        free_device()
        page = 64
        prompt_lens = sorted({max(page, round(n / page) * page) for n in result["prompt_tokens_p50_p90_p99"]} | {2048})
        result["prefill_attention"] = prefill_attention(prompt_lens, log)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind), None)
        result["gemm"] = gemm_efficiency(config, (64, 256, 1024, 4096), peak, log)
    out = Path(args.out or Path(default_out()) / f"realistic_load_{args.card}_{result['date']}.json")
    write_json(out, result)
    brief = {k: v for k, v in result.items() if k not in ("prefill_attention", "gemm", "first_pass", "second_pass")}
    for name in ("first_pass", "second_pass")[: args.passes]:
        s, b = result[name]["summary"], result[name]["breakdown"]
        brief[name] = {"output_tok_s": s["total_output_throughput_tok_s"], "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"],
                       "useful_token_share": b["useful_token_share"], "mean_host_ms": b["mean_host_ms"],
                       "share_of_time": {k: v["share_of_time"] for k, v in b["kinds"].items()}}  # fmt: skip
    print_result(brief)
    return 0


if __name__ == "__main__":
    sys.exit(main())
