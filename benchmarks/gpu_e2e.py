"""The engine on the GPU, end to end, in one call: correctness of 'pallas' vs 'xla', the Llama-3.1-8B
shape in bf16 (decode latency against the weight-streaming floor, time to first token, offline
throughput, KV capacity), HF transformers on the same card as the peer, and cold start.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_e2e.py [--parts perf,correctness,hf,coldstart] [--out DIR]
        [--quantization fp8] [--kv-cache-dtype fp8]       # the perf part with FP8 weights / KV cache
        [--model llama-3.1-8b-fp8]     # a ModelOpt FP8 checkpoint's format: static input scales, FP8 KV
        [--breakdown] [--profile-batch N] [--profile-prefill N] [--profile-exact]   # where the time goes
    python benchmarks/gpu_e2e.py --smoke        # tiny sizes on the CPU, to check the script runs

Weights are random (load_format="dummy") from the config.json files in benchmarks/configs/: real
checkpoints cannot travel to the GPU machine (over the 64 MiB a call may carry). `llama-3.1-8b-fp8`
is the 8B config with the hf_quant_config.json of nvidia/Llama-3.1-8B-Instruct-FP8 (the checkpoint
TensorRT-LLM's FP8 figures run): its random weights come in that format, float8 with a static input
scale per projection, where `--quantization fp8` quantizes as it loads and scales activations per
token (no calibration data). Each part writes
its JSON as soon as it finishes, so a partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (CONFIGS, decode_ms_per_token, default_out, device_name, hbm_tbs, software_versions, synthetic,
                    write_json)  # fmt: skip


# ---- correctness: 'pallas' against 'xla' in the whole model ---------------------------------------
def part_correctness(args) -> dict:
    from jaxllm import LLM, SamplingParams

    models = ["smollm2-135m", "gemma3-270m"]
    prompts = synthetic(4, 1, 1000, 0)
    prompts = [p * n for p, n in zip(prompts, (7, 40, 130, 600))]  # lengths 7..600 (Gemma's window is 512)
    rows = []
    for name in models:
        got = {}
        for backend in ("xla", "pallas"):
            with LLM(model=str(CONFIGS / name), load_format="dummy",
                     dtype="float32", skip_tokenizer_init=True, backend=backend, max_batch_size=8,
                     max_num_tokens=1024, max_seq_len=1024) as llm:  # fmt: skip
                outs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True, logprobs=1),
                                    use_tqdm=False)  # fmt: skip
                got[backend] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
        agree, total, max_diff = 0, 0, 0.0
        for (ta, la), (tb, lb) in zip(got["xla"], got["pallas"]):
            for i, (a, b) in enumerate(zip(ta, tb)):
                total += 1
                agree += a == b
                if a != b:
                    break
                max_diff = max(max_diff, abs(la[i][a].logprob - lb[i][b].logprob))
        rows.append({"model": name, "dtype": "float32", "tokens_compared": total, "tokens_identical": agree,
                     "greedy_identical": all(a[0] == b[0] for a, b in zip(got["xla"], got["pallas"])),
                     "max_logprob_diff": max_diff})  # fmt: skip
    return {"correctness": rows}


# ---- the 8B shape -------------------------------------------------------------------------------------
STATS_KEPT = 200_000  # iterations: more than any offline run here makes (2,048 decodes a wave of 128/2048)


def part_perf(args) -> dict:
    import jax

    from jaxllm import LLM, SamplingParams
    from jaxllm.engine import step_trace

    cfg_dir = CONFIGS / args.model
    max_batch, max_tokens = args.max_batch, args.max_num_tokens
    t0 = time.perf_counter()
    quant = {"quant_config": {"quant_algo": args.quantization.upper()}} if args.quantization else {}
    if args.quantization == "w4a16":
        quant["quant_config"].update(group_size=args.group_size, has_zero_point=args.zero_point)
    if args.kv_cache_dtype:
        quant["kv_cache_config"] = {"dtype": args.kv_cache_dtype}
    if args.calibrate:  # calib_config over random token ids (timing; random weights have nothing to learn)
        import tempfile

        import numpy as np

        vocab = json.loads((cfg_dir / "config.json").read_text())["vocab_size"]
        rows = np.random.default_rng(0).integers(0, vocab, (args.calibrate, 512)).tolist()
        dataset = Path(tempfile.mkdtemp()) / "calibration.jsonl"
        dataset.write_text("\n".join(json.dumps({"input_ids": row}) for row in rows))
        quant["calib_config"] = {"calib_dataset": str(dataset), "calib_batches": args.calibrate}
    if args.capacity_policy:
        from jaxllm import SchedulerConfig

        quant["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy=args.capacity_policy)
    # Every iteration's stats kept (the default keeps the last 1,000), so an offline run's median
    # decode step and most active sequences are the whole run's, not its tail's.
    llm = LLM(model=str(cfg_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_batch_size=max_batch, max_num_tokens=max_tokens, max_seq_len=args.max_seq_len,
              iter_stats_max_iterations=STATS_KEPT, **quant)  # fmt: skip
    engine = llm._engine
    runner = engine.runner
    build_s = time.perf_counter() - t0
    # LLM() made every program the engine can run (loaded from the program cache or compiled).
    shapes = runner.bucket_shapes()
    precompile_s = runner.compile_seconds
    vocab = llm.config.vocab_size
    # as stored: int4 packed two a byte or not, as the machine's XLA decides (benchmarks/RESULTS.md, 2026-12-06)
    weight_bytes = sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(llm.params))
    tbs = hbm_tbs(jax.devices()[0].device_kind)
    floor_ms = weight_bytes / (tbs * 1e12) * 1e3
    result = {"device": device_name(), "versions": software_versions(), "model": args.model,
              "backend": runner.config.backend,
              "capacity_policy": args.capacity_policy or "MAX_UTILIZATION (the engine's default)",
              "quantization": args.quantization or llm.config.quant_algo,
              "kv_dtype": jax.numpy.dtype(runner.config.kv_dtype).name,
              "weight_bytes": weight_bytes, "hbm_tbs": tbs, "floor_ms": floor_ms, "build_s": build_s,
              "precompiled_shapes": len(shapes), "precompile_s": precompile_s,
              "kv_pages": runner.config.num_pages, "page_size": runner.config.page_size,
              "max_batch_size": runner.config.max_batch_size, "max_num_tokens": runner.config.max_num_tokens}  # fmt: skip
    result["kv_capacity_tokens"] = (runner.config.num_pages - 1) * runner.config.page_size
    result["kv_capacity_2k_sequences"] = result["kv_capacity_tokens"] // 2048
    # Each figure is printed as it is measured, so a run cut short by a time limit still reports.
    print(f"LLM() ready in {build_s:.0f} s ({len(shapes)} programs, {precompile_s:.0f} s compiling); "
          f"KV {result['kv_capacity_tokens']:,} tokens", flush=True)  # fmt: skip

    def timed(prompts, params):
        llm.get_stats()
        compile0 = runner.compile_seconds
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        compiled = runner.compile_seconds - compile0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return wall, compiled, tokens, llm.get_stats()

    if not args.skip_latency:
        latency(args, result, timed, vocab, floor_ms)
    # Offline throughput, all requests queued at once.
    offline = []
    for isl, osl, n in args.offline:
        prompts = synthetic(n, isl, vocab, 10 + isl + osl)
        if args.breakdown:
            engine.trace_steps(True)
        wall, compiled, tokens, stats = timed(prompts, SamplingParams(max_tokens=osl, ignore_eos=True))
        offline.append({"isl": isl, "osl": osl, "requests": n, "output_tokens": tokens, "wall_s": wall,
                        "compile_s_during": compiled, "output_tok_s": tokens / wall,
                        "median_decode_step_ms": decode_ms_per_token(stats),
                        "max_active": max(s["numActiveRequests"] for s in stats)})  # fmt: skip
        print(f"offline {isl}/{osl} x{n}: {tokens / wall:.0f} tok/s (compiling {compiled:.1f} s of it)", flush=True)
        if args.breakdown:  # where the run's time went: step kinds, padding, host time (engine/step_trace.py)
            figures = step_trace.breakdown(engine.trace_steps(False))
            offline[-1]["breakdown"] = figures
            print(step_trace.table(figures), flush=True)
    result["offline"] = offline
    if args.profile_batch:  # a wide batch's steps under the profiler: where a large decode's time goes
        prompts = synthetic(args.profile_batch, 128, vocab, 7)
        params = SamplingParams(max_tokens=64, ignore_eos=True)
        timed(prompts, params)  # its shapes' first run outside the trace
        profiled(f"{args.profile_batch} requests of 128/64", timed, prompts, params, args.profile_exact)
    if args.profile_prefill:  # prompts no earlier run cached: prefill and mixed steps of max_num_tokens
        prompts = synthetic(args.profile_prefill, 128, vocab, 8)
        profiled(f"{args.profile_prefill} new requests of 128/8", timed, prompts,
                 SamplingParams(max_tokens=8, ignore_eos=True), args.profile_exact)  # fmt: skip
    if args.profile_mixed:  # a window of a 128/128 run's steady state: mixed steps (prompts beside decodes)
        prompts = synthetic(args.profile_mixed, 128, vocab, 9)
        params = SamplingParams(max_tokens=128, ignore_eos=True)
        engine.trace_steps(True)
        profiled_window(f"{args.profile_mixed} new requests of 128/128, seconds 8-10", llm, prompts, params,
                        8.0, 2.0, args.profile_exact)  # fmt: skip
        kinds = step_trace.breakdown(engine.trace_steps(False))["kinds"]
        print("its steps: " + ", ".join(f"{k} {v['steps']} ({v['mean_step_ms']:.1f} ms)" for k, v in kinds.items()))
    result["compilations_total"] = runner.num_compilations
    result["memory"] = memory_report(llm, runner, weight_bytes)
    llm.shutdown()
    return {"perf": result}


def latency(args, result: dict, timed, vocab: int, floor_ms: float) -> None:
    """Batch-1 decode (and its profile, with --profile) and the time to a first token."""
    from jaxllm import SamplingParams

    prompt = synthetic(1, 128, vocab, 1)
    timed(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    wall, compiled, tokens, stats = timed(prompt, SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True))
    step = decode_ms_per_token(stats)
    result["batch1"] = {"decode_ms_per_token": step, "tokens_per_s": 1e3 / step, "fraction_of_floor": floor_ms / step,
                        "wall_s": wall, "compile_s_during": compiled}  # fmt: skip
    print(f"batch-1 decode: {step:.2f} ms/token", flush=True)
    if args.profile:  # the same decode once more under the JAX profiler: where a token's time goes
        profiled("batch-1 decode of 32 tokens", timed, prompt, SamplingParams(max_tokens=33, ignore_eos=True))
    # Time to first token.
    for length in (args.short, args.long):
        p = synthetic(1, length, vocab, 2)
        timed(p, SamplingParams(max_tokens=1, ignore_eos=True))
        samples = [timed(synthetic(1, length, vocab, 3 + i), SamplingParams(max_tokens=1, ignore_eos=True))[0]
                   for i in range(3)]  # fmt: skip
        result[f"ttft_{length}_ms"] = statistics.median(samples) * 1e3
        print(f"TTFT {length}: {result[f'ttft_{length}_ms']:.1f} ms", flush=True)
    result["ttft_lengths"] = [args.short, args.long]


def profiled(what: str, timed, prompts, params, exact: bool = False) -> None:
    """Generate `prompts` under the JAX profiler and print the trace's top kernels (and with
    `exact`, the top kernels each under its own name, for benchmarks/hlo_fusions.py)."""
    import jax

    trace_dir = _start_trace()
    timed(prompts, params)
    jax.profiler.stop_trace()
    _print_trace(what, trace_dir, exact)


def profiled_window(what: str, llm, prompts, params, start_s: float, seconds: float, exact: bool) -> None:
    """Submit `prompts` at once, trace `seconds` of the run from `start_s` after the submission under
    the JAX profiler, print the window's top kernels (as `profiled`), and wait for the run to end."""
    import jax

    futures = [llm.generate_async(p, params) for p in prompts]
    time.sleep(start_s)
    trace_dir = _start_trace()
    time.sleep(seconds)
    jax.profiler.stop_trace()
    for f in futures:
        f.result()
    _print_trace(what, trace_dir, exact)


def _start_trace() -> str:
    """Start the JAX profiler into a new temporary directory (a perfetto trace); returns it."""
    import tempfile

    import jax

    trace_dir = tempfile.mkdtemp(prefix="jaxllm-e2e-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    return trace_dir


def _print_trace(what: str, trace_dir: str, exact: bool) -> None:
    """The top kernels of the trace under `trace_dir` (and with `exact`, each under its own name)."""
    import glob

    import trace_summary

    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    print(f"{what} under the profiler:\n" + trace_summary.format_summary(path, top=24), flush=True)
    if exact:
        print(f"{what}, kernels by name:\n" + trace_summary.format_summary(path, top=48, exact=True), flush=True)


def memory_report(llm, runner, weight_bytes: int) -> dict | None:
    """The device's allocator limit and peak against the weights, the KV cache and the planner's
    activation estimate: how much of the estimate the programs (every part run so far) used."""
    import jax

    from jaxllm.engine import kv_planner

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return None
    kv = runner.config.num_pages * runner.config.page_size * kv_planner.bytes_per_token(llm.config, runner.kv_dtype)
    reserve = kv_planner.activation_reserve(llm.config, runner.config.max_num_tokens, runner.config.max_batch_size)
    report = {"bytes_limit": stats.get("bytes_limit"), "peak_bytes_in_use": stats["peak_bytes_in_use"],
              "weights": weight_bytes, "kv_cache": kv, "activation_reserve": reserve,
              "peak_beyond_weights_and_kv": stats["peak_bytes_in_use"] - weight_bytes - kv}  # fmt: skip
    gb = 1e9
    print(f"memory: allocator limit {report['bytes_limit'] / gb:.1f} GB, "
          f"peak {report['peak_bytes_in_use'] / gb:.1f} GB = weights {weight_bytes / gb:.1f} + KV {kv / gb:.1f} "
          f"+ {report['peak_beyond_weights_and_kv'] / gb:.2f} (the planner's activation estimate: {reserve / gb:.2f})",
          flush=True)  # fmt: skip
    return report


# ---- HF transformers on the same card ---------------------------------------------------------------
HF_CHILD = r"""
import json, sys, time, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
rows = []
for batch, new in [(1, 128), (64, 128)]:
    ids = torch.randint(10, cfg.vocab_size - 10, (batch, 128), device="cuda")
    def run(n):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize(); return time.perf_counter() - t
    run(4); pre = run(1); total = run(new)
    rows.append({"batch": batch, "isl": 128, "osl": new, "ms_per_step": (total - pre) / (new - 1) * 1e3,
                 "output_tok_s": batch * new / total})
print("HFRESULT" + json.dumps(rows))
"""


def part_hf(args) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", HF_CHILD, str(CONFIGS / args.model)], capture_output=True,
                          text=True, env=env, timeout=args.hf_timeout)  # fmt: skip
    line = next((l for l in proc.stdout.splitlines() if l.startswith("HFRESULT")), None)
    if line is None:
        return {"hf": {"error": proc.stderr[-2000:]}}
    return {"hf": {"transformers_eager": json.loads(line[len("HFRESULT") :])}}


# ---- cold start ---------------------------------------------------------------------------------------
COLD_CHILD = r"""
import sys, time
t0 = time.perf_counter()
from jaxllm import LLM, SamplingParams
kwargs = dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_batch_size=8,
              max_num_tokens=512, max_seq_len=1024)
if sys.argv[2] != "-":
    kwargs["compilation_cache_dir"] = sys.argv[2]
llm = LLM(model=sys.argv[1], **kwargs)
llm.generate([list(range(10, 42))], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
print("COLDRESULT", time.perf_counter() - t0)
llm.shutdown()
"""


def part_coldstart(args) -> dict:
    cache = Path(args.out) / "jax_cache"
    rows = {}
    # An empty cache compiles everything (as no cache does) and fills it; the second start reads it.
    for label, cache_arg in (("empty_cache", str(cache)), ("warm_cache", str(cache))):
        proc = subprocess.run([sys.executable, "-c", COLD_CHILD, str(CONFIGS / args.model), cache_arg],
                              capture_output=True, text=True, timeout=args.hf_timeout)  # fmt: skip
        line = next((l for l in proc.stdout.splitlines() if l.startswith("COLDRESULT")), None)
        rows[label] = float(line.split()[1]) if line else proc.stderr[-1500:]
    return {"coldstart_s_to_first_token": rows}


def report(results: dict) -> None:
    p = results.get("perf")
    if p:
        weights = p.get("quantization") or "bf16"
        print(f"\n== {p['model']} {weights} random weights, KV {p['kv_dtype']}, {p['device']}, backend {p['backend']} ==")
        print(f"weights {p['weight_bytes'] / 1e9:.2f} GB -> floor {p['floor_ms']:.2f} ms/token at {p['hbm_tbs']} TB/s")
        b = p.get("batch1")
        if b:
            print(f"batch-1 decode: {b['decode_ms_per_token']:.2f} ms/token ({b['tokens_per_s']:.0f} tok/s), "
                  f"{b['fraction_of_floor'] * 100:.0f}% of floor, "
                  f"{b['decode_ms_per_token'] / p['floor_ms']:.2f}x floor")
            print("   ".join(f"TTFT {n}: {p[f'ttft_{n}_ms']:.1f} ms" for n in p["ttft_lengths"]))
        print(f"KV capacity: {p['kv_capacity_tokens']} tokens = {p['kv_capacity_2k_sequences']} sequences of 2k")
        print(f"precompiled {p['precompiled_shapes']} shapes in {p['precompile_s']:.0f} s; total compilations "
              f"{p.get('compilations_total')}")
        for o in p.get("offline", []):
            print(f"offline {o['isl']}/{o['osl']} x{o['requests']}: {o['output_tok_s']:.0f} output tok/s "
                  f"(wall {o['wall_s']:.1f} s; decode step {o['median_decode_step_ms']:.1f} ms, compile during "
                  f"{o['compile_s_during']:.1f} s)")
    if "hf" in results:
        for r in results["hf"].get("transformers_eager", []):
            print(f"HF transformers eager batch {r['batch']} {r['isl']}/{r['osl']}: {r['ms_per_step']:.1f} ms/step, "
                  f"{r['output_tok_s']:.0f} tok/s")
        if "error" in results["hf"]:
            print("HF error:", results["hf"]["error"][-500:])
    for r in results.get("correctness", []):
        print(f"pallas vs xla {r['model']} {r['dtype']}: {r['tokens_identical']}/{r['tokens_compared']} tokens identical "
              f"before divergence; greedy identical: {r['greedy_identical']}; max logprob diff {r['max_logprob_diff']:.2e}")
    if "coldstart_s_to_first_token" in results:
        print("cold start LLM() -> first token (s):", results["coldstart_s_to_first_token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Children (hf, coldstart) first: this process holds the GPU's memory once it starts JAX.
    parser.add_argument("--parts", default="hf,coldstart,perf,correctness")
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--quantization", choices=("fp8", "w8a16", "w4a16"), default=None,
                        help="quantized weights (QuantConfig's quant_algo)")
    parser.add_argument("--kv-cache-dtype", choices=("fp8",), default=None, help="an FP8 KV cache")
    parser.add_argument("--calibrate", type=int, default=0, metavar="N",
                        help="calib_config over N samples of 512 random token ids: FP8's static input scales and the "
                             "fp8 cache's K/V scales measured as the weights load (LLM()'s time includes it)")
    parser.add_argument("--offline", default=None,
                        help="offline runs as ISL/OSLxREQUESTS,... (default 128/128x1024,128/2048x128,2048/128x128; "
                             "'none': no offline run)")  # fmt: skip
    parser.add_argument("--fp8-weight-only-rows", type=int, default=None,
                        help="FP8 projections of at most this many rows are weight-only on GPUs "
                             "(jaxllm/layers/linear.py WEIGHT_ONLY_MAX_ROWS; 0: none)")  # fmt: skip
    parser.add_argument("--rope-in-kv-write", choices=("on", "off"), default=None,
                        help="whether the compiled 'pallas' backend rotates q and k in its K/V write kernel "
                             "(jaxllm/layers/attention.py ROPE_IN_KV_WRITE; default: the engine's, on since "
                             "2026-12-05)")  # fmt: skip
    parser.add_argument("--decodes-apart", choices=("on", "off"), default=None,
                        help="whether a mixed step's decodes go to the decode kernel (jaxllm/layers/attention.py "
                             "DECODES_APART; default: the engine's, on since 2026-12-06)")  # fmt: skip
    parser.add_argument("--w4-grouped", choices=("on", "off"), default=None,
                        help="whether decode-sized W4A16 products are a batch of dots, one a group "
                             "(jaxllm/layers/linear.py GROUPED_DOTS; default: the engine's, on since "
                             "2026-12-07)")  # fmt: skip
    parser.add_argument("--weight-only-layout", choices=("input-last", "input-first"), default=None,
                        help="how W8A16's int8 weights and W4A16's int4 ones are stored "
                             "(jaxllm/layers/linear.py WEIGHT_ONLY_INPUT_LAST; default: the engine's, input axes "
                             "last on GPUs since 2026-12-07)")  # fmt: skip
    parser.add_argument("--small-group-rows", type=int, default=None,
                        help="steps of at most this many rows compute int4 groups under 128 channels as group dots, "
                             "the weights stored input axes last (jaxllm/layers/linear.py SMALL_GROUP_DOT_ROWS; 0: "
                             "never, the checkpoint's layout)")  # fmt: skip
    parser.add_argument("--quantized-triton-rows", type=int, default=None,
                        help="a quantized model's forward programs of at most this many tokens keep Triton GEMMs "
                             "(jaxllm/engine/buckets.py QUANTIZED_TRITON_GEMM_MAX_ROWS; 8: as a bf16 model's, "
                             "TRITON_GEMM_MAX_ROWS)")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=128, help="W4A16's group_size")
    parser.add_argument("--zero-point", action="store_true", help="W4A16's has_zero_point (asymmetric groups)")
    parser.add_argument("--skip-latency", action="store_true",
                        help="no batch-1 decode or time-to-first-token runs: the offline runs alone")
    parser.add_argument("--breakdown", action="store_true",
                        help="trace each offline run's steps and print where its time went (step kinds, padding)")
    parser.add_argument("--profile", action="store_true", help="profile a batch-1 decode and print its top kernels")
    parser.add_argument("--profile-batch", type=int, default=0, metavar="N",
                        help="after the offline runs, profile N requests of 128/64 at once and print the top kernels")
    parser.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                        help="then profile N new requests of 128/8 at once (prefill and mixed steps)")
    parser.add_argument("--profile-mixed", type=int, default=0, metavar="N",
                        help="then profile 2 s of N new requests of 128/128 at once, from 8 s in (mixed steps)")
    parser.add_argument("--profile-exact", action="store_true",
                        help="the profiles' top kernels also each under its own name (benchmarks/hlo_fusions.py)")
    parser.add_argument("--capacity-policy", choices=("MAX_UTILIZATION", "GUARANTEED_NO_EVICT"), default=None,
                        help="the scheduler's capacity policy (default: the engine's, MAX_UTILIZATION)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the engine's max_batch_size (default: the engine's, 2048 on GPUs; 256 until 2026-12-05)")
    args = parser.parse_args()
    offline = args.offline
    if args.rope_in_kv_write is not None or args.decodes_apart is not None:
        from jaxllm.layers import attention

        if args.rope_in_kv_write is not None:
            attention.ROPE_IN_KV_WRITE["pallas"] = args.rope_in_kv_write == "on"
        if args.decodes_apart is not None:
            attention.DECODES_APART[0] = args.decodes_apart == "on"
    if args.w4_grouped is not None or args.small_group_rows is not None or args.weight_only_layout is not None:
        from jaxllm.layers import linear

        if args.w4_grouped is not None:
            linear.GROUPED_DOTS[0] = args.w4_grouped == "on"
        if args.small_group_rows is not None:
            linear.SMALL_GROUP_DOT_ROWS = args.small_group_rows
        if args.weight_only_layout is not None:
            for name in linear.WEIGHT_ONLY_INPUT_LAST:
                linear.WEIGHT_ONLY_INPUT_LAST[name] = args.weight_only_layout == "input-last"
    if args.quantized_triton_rows is not None:
        from jaxllm.engine import buckets

        buckets.QUANTIZED_TRITON_GEMM_MAX_ROWS = args.quantized_triton_rows
    if args.fp8_weight_only_rows is not None:
        from jaxllm.models import transformer

        transformer.WEIGHT_ONLY_MAX_ROWS = args.fp8_weight_only_rows
    args.tokens, args.decode_tokens = 16, 128
    args.max_batch, args.max_num_tokens, args.max_seq_len = args.max_batch_size, 8192, 4224
    args.short, args.long = 128, 2048
    args.offline = [(128, 128, 1024), (128, 2048, 128), (2048, 128, 128)]
    args.compile_threads, args.hf_timeout = 8, 170
    if args.smoke:
        args.model, args.tokens, args.decode_tokens = "smollm2-135m", 4, 8
        args.max_batch, args.max_num_tokens, args.max_seq_len = 8, 256, 512
        args.short, args.long = 16, 128
        args.offline = [(16, 8, 8), (128, 8, 4)]
        args.compile_threads = 2
    if offline is not None:
        args.offline = [] if offline == "none" else [
            tuple(int(v) for v in run.replace("x", "/").split("/")) for run in offline.split(",")]  # fmt: skip
    results: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    file = Path(args.out) / "gpu_e2e.json"
    for part in args.parts.split(","):
        started = time.perf_counter()
        try:
            results.update(globals()[f"part_{part}"](args))
        except Exception as e:  # keep what the other parts measure
            import traceback

            traceback.print_exc()
            results[f"{part}_error"] = f"{type(e).__name__}: {e}"
        results[f"{part}_wall_s"] = time.perf_counter() - started
        write_json(file, results)
        print(f"[{part} done in {results[f'{part}_wall_s']:.0f} s]", flush=True)
    report(results)


if __name__ == "__main__":
    main()
