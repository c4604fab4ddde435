"""Tensor parallelism on two GPUs, in one call: TP=2 against TP=1 (greedy agreement in bf16 on the
SmolLM2 and Llama-3.1-8B shapes, batch-1 decode latency), the all-reduce share of a TP=2 decode
step, offline 128/128 throughput at TP=2, and disaggregated serving across the two GPUs (prefill
on one, decode on the other) against the aggregated tokens.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_tp.py [--out DIR]
    python benchmarks/gpu_tp.py --smoke      # CPU, 8 virtual devices, tiny sizes

Random weights (load_format="dummy") from benchmarks/configs/. The all-reduce share is estimated
from a measurement: the step's all-reduce volume (two per layer of [tokens, hidden] bf16, plus the
logits gather) timed as standalone psums on the same mesh, over the measured TP=2 step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_e2e import _decode_ms, synthetic  # noqa: E402


def engine(model: str, tp: int, backend: str | None, args, precompile=(), dtype: str = "bfloat16", devices=None):
    """An engine with random weights; `precompile` lists (num_tokens, max_query_len) of mixed steps
    and (B, 1) of decode steps to compile in parallel before anything is timed."""
    from jaxllm import LLM
    from jaxllm.engine.runner import QUERY_BUCKETS, StepShape, bucket_for

    llm = LLM(model=str(HERE / "configs" / model), load_format="dummy", dtype=dtype, skip_tokenizer_init=True,
              tensor_parallel_size=tp, backend=backend, max_batch_size=args.max_batch, max_num_tokens=args.max_tokens,
              max_seq_len=args.max_seq_len, devices=devices)  # fmt: skip
    runner = llm._engine.runner
    P, shapes = runner.page_buckets[0], []
    for tokens, q in precompile:
        if q == 1:
            B = bucket_for(min(tokens, args.max_batch), runner.seq_buckets)
            shapes.append(StepShape(B, B, P, 1))
            continue
        T = bucket_for(min(tokens, args.max_tokens), runner.token_buckets)
        Q = T if runner.config.backend == "xla" else min(T, bucket_for(q, QUERY_BUCKETS + [T]))
        shapes.append(StepShape(T, min(T, args.max_batch), P, Q))
    runner.precompile(shapes, progress=False, threads=8)
    return llm


def greedy(llm, prompts, n):
    from jaxllm import SamplingParams

    return [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)]


def disaggregated(ctx, gen, prompts, n):
    """Greedy tokens of prompts prefilled on `ctx` (context_only) and decoded on `gen` (generation_only)."""
    from jaxllm import DisaggregatedParams, SamplingParams

    params = SamplingParams(max_tokens=n, ignore_eos=True)
    first = ctx.generate(prompts, params, use_tqdm=False, disaggregated_params=DisaggregatedParams(request_type="context_only"))
    follow = [DisaggregatedParams(request_type="generation_only", first_gen_tokens=o.outputs[0].disaggregated_params.first_gen_tokens,
                                  ctx_request_id=o.request_id, opaque_state=o.outputs[0].disaggregated_params.opaque_state)
              for o in first]  # fmt: skip
    return [o.outputs[0].token_ids for o in gen.generate(prompts, params, use_tqdm=False, disaggregated_params=follow)]


def agreement(a, b) -> dict:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
    return {"tokens_equal": same, "tokens": sum(len(p) for p in a), "identical_prefix_lengths": first}


def batch1_ms(llm, vocab, n) -> float:
    from jaxllm import SamplingParams

    prompt = synthetic(1, 128, vocab, 1)
    llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.get_stats()
    llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
    return _decode_ms(llm.get_stats())


def offline(llm, isl, osl, n, vocab) -> dict:
    from jaxllm import SamplingParams

    runner = llm._engine.runner
    prompts = synthetic(n, isl, vocab, isl + osl)
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # the same shapes, warm
    c0, t0 = runner.compile_seconds, time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=osl, ignore_eos=True), use_tqdm=False)
    wall, compiled = time.perf_counter() - t0, runner.compile_seconds - c0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"isl": isl, "osl": osl, "requests": n, "output_tok_s": tokens / (wall - compiled), "wall_s": wall,
            "compile_s_during": compiled}  # fmt: skip


def allreduce_ms(mesh, rows: int, hidden: int, layers: int, vocab: int) -> float:
    """Time of one decode step's collectives, run standalone on `mesh`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jax.device_put(jnp.ones((mesh.size, rows, hidden), jnp.bfloat16), NamedSharding(mesh, P("tp")))
    logits = jax.device_put(jnp.ones((rows, vocab), jnp.float32), NamedSharding(mesh, P(None, "tp")))

    @jax.jit
    def collectives(x, logits):
        out = x
        for _ in range(2 * layers):  # attention output and MLP output, every layer
            out = jax.shard_map(lambda a: jax.lax.psum(a, "tp"), mesh=mesh, in_specs=P("tp"), out_specs=P("tp"))(out)
        whole = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))
        return out, whole

    jax.block_until_ready(collectives(x, logits))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(collectives(x, logits))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def recorder(file: Path, **header):
    """(result dict, save(key, value)): each figure is written to `file` and printed the moment it
    exists, so a run stopped at its time limit keeps what it measured."""
    result: dict = {"date": time.strftime("%Y-%m-%d"), **header}
    file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(key, value):
        result[key] = value
        result["elapsed_s"] = time.perf_counter() - started
        file.write_text(json.dumps(result, indent=2))
        print(f"[{result['elapsed_s']:6.1f}s] {key} {json.dumps(value)}", flush=True)

    return result, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--offline-requests", type=int, default=256)
    args = parser.parse_args()
    small, big = "smollm2-135m", "llama-3.1-8b"
    args.max_batch, args.max_tokens, args.max_seq_len = 256, 8192, 2304
    tokens, decode_n, off_128 = 16, 64, args.offline_requests
    if args.smoke:
        big, args.max_batch, args.max_tokens, args.max_seq_len = small, 8, 256, 512
        tokens, decode_n, off_128 = 4, 8, 8
    import jax

    result, save = recorder(Path(args.out) / "gpu_tp.json", device=jax.devices()[0].device_kind,
                            devices=jax.device_count())  # fmt: skip

    # Most important first, each saved as soon as it exists: a run cut short keeps what it measured.
    # (A small engine takes about 30 s to compile on the GPU: SmolLM2's agreement check comes last.)
    prompts = [p * k for p, k in zip(synthetic(4, 1, 1000, 0), (7, 40, 130, 300))]
    agree_shapes = [(512, 300), (4, 1)]  # the four prompts together, then their decodes
    ref = {}
    for tp in (1, 2):
        t0 = time.perf_counter()
        shapes = agree_shapes + [(128, 128), (1, 1)]
        if tp == 2:
            shapes += [(args.max_tokens, 128), (args.max_batch, 1)]
        with engine(big, tp, None, args, shapes) as llm:
            vocab = llm.config.vocab_size
            save(f"llama8b_tp{tp}_build_s", time.perf_counter() - t0)
            ref[tp] = greedy(llm, prompts, tokens)
            save(f"llama8b_tp{tp}_batch1_decode_ms", batch1_ms(llm, vocab, decode_n))
            if tp == 1:  # disaggregated: prefill on GPU 0, decode on GPU 1, against the aggregated tokens
                with engine(big, 1, None, args, shapes, devices=[jax.devices()[1]]) as gen:
                    save("llama8b_disaggregated_gpu0_to_gpu1_vs_aggregated",
                         agreement(ref[1], disaggregated(llm, gen, prompts, tokens)))
            if tp == 2:
                save("llama8b_bf16_tp2_vs_tp1", agreement(ref[1], ref[2]))
                save("tp2_over_tp1_batch1", result["llama8b_tp2_batch1_decode_ms"] / result["llama8b_tp1_batch1_decode_ms"])
                cfg = llm.engine_config
                collective = allreduce_ms(llm.mesh, 1, cfg.hidden_size, cfg.num_layers, cfg.vocab_size)
                save("llama8b_tp2_batch1_collectives_ms", collective)
                save("allreduce_share_of_tp2_batch1_step", collective / result["llama8b_tp2_batch1_decode_ms"])
                save("llama8b_tp2_offline_128_128", offline(llm, 128, 128, off_128, vocab))
    smol = {}
    for tp in (1, 2):  # float32: the same function, so the same tokens up to rounding
        with engine(small, tp, None, args, agree_shapes, dtype="float32") as llm:
            smol[tp] = greedy(llm, prompts, tokens)
    save("smollm2_fp32_tp2_vs_tp1", agreement(smol[1], smol[2]))

    r = result
    print(f"\n== {big} bf16 random weights on {r['devices']} x {r['device']} ==")
    print(f"batch-1 decode: TP1 {r['llama8b_tp1_batch1_decode_ms']:.2f} ms, TP2 {r['llama8b_tp2_batch1_decode_ms']:.2f} ms "
          f"(TP2/TP1 = {r['tp2_over_tp1_batch1']:.2f}, target <= 0.6)")
    print(f"offline 128/128 TP2: {r['llama8b_tp2_offline_128_128']['output_tok_s']:.0f} tok/s")
    print(f"collectives of a TP2 batch-1 step: {r['llama8b_tp2_batch1_collectives_ms']:.2f} ms "
          f"= {r['allreduce_share_of_tp2_batch1_step'] * 100:.0f}% of the step")
    print("greedy agreement:", {k: (v["tokens_equal"], v["tokens"]) for k, v in r.items() if k.endswith("vs_tp1")})


if __name__ == "__main__":
    main()
