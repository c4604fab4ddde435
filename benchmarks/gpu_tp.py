"""Tensor parallelism on two GPUs, in one call: TP=2 against TP=1 (greedy agreement in bf16 on the
SmolLM2 and Llama-3.1-8B shapes, batch-1 decode latency), the all-reduce share of a TP=2 decode
step, offline 128/128 throughput at TP=2, and disaggregated serving across the two GPUs (prefill
on one, decode on the other) against the aggregated tokens.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_tp.py [--out DIR]
    python benchmarks/gpu_tp.py --smoke      # CPU, 8 virtual devices, tiny sizes

Random weights (load_format="dummy") from benchmarks/configs/. The all-reduce share is estimated
from a measurement: the step's all-reduces (two per layer and the embedding's, of [tokens, hidden]
float32 as XLA runs them) timed as standalone psums on the same mesh, over the measured TP=2 token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from common import batch1_ms, default_out, engine, greedy, median_ms, offline, recorder, synthetic

if "--smoke" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def use_vocab_parallel_sampling(llm, args, on: bool, precompile=()) -> None:
    """Switch the engine's TP sampling between vocabulary-split and gathered [B, V] logits (its
    programs are made again)."""
    runner = llm._engine.runner
    if runner.config.vocab_parallel_sampling != on:
        runner.config = dataclasses.replace(runner.config, vocab_parallel_sampling=on)
        runner.reset_programs()
        runner.precompile(progress=False)


def disaggregated(ctx, gen, prompts, n):
    """Greedy tokens of prompts prefilled on `ctx` (context_only) and decoded on `gen` (generation_only)."""
    from jaxllm import DisaggregatedParams, SamplingParams

    params = SamplingParams(max_tokens=n, ignore_eos=True)
    first = ctx.generate(prompts, params, use_tqdm=False, disaggregated_params=DisaggregatedParams(request_type="context_only"))
    follow = [DisaggregatedParams(request_type="generation_only", first_gen_tokens=o.outputs[0].disaggregated_params.first_gen_tokens,
                                  ctx_request_id=o.request_id, opaque_state=o.outputs[0].disaggregated_params.opaque_state)
              for o in first]  # fmt: skip
    return [o.outputs[0].token_ids for o in gen.generate(prompts, params, use_tqdm=False, disaggregated_params=follow)]


def agreement(ref, other) -> dict:
    """Greedy agreement of `other` (token lists, or (tokens, logprobs)) with `ref` ((tokens, logprobs)):
    the identical prefix of each prompt and, where they part, how far apart the two tokens were in
    the reference's own distribution (log-prob of its top token minus that of the other's token; a
    near-tie is a few hundredths of a nat in bf16; None: the other's token is not in its top 2)."""
    prefixes, gaps = [], []
    for (tokens, logprobs), o in zip(ref, other):
        o = o[0] if isinstance(o, tuple) else o
        i = next((i for i, (x, y) in enumerate(zip(tokens, o)) if x != y), None)
        prefixes.append(len(tokens) if i is None else i)
        if i is not None:
            entry = logprobs[i]
            gaps.append(round(entry[tokens[i]].logprob - entry[o[i]].logprob, 4) if o[i] in entry else None)
    return {"identical_prefix_lengths": prefixes, "tokens_per_prompt": len(ref[0][0]),
            "identical": all(p == len(r[0]) for p, r in zip(prefixes, ref)), "divergence_gaps_nats": gaps}


def allreduce_ms(mesh, rows: int, hidden: int, layers: int) -> float:
    """Time of one decode step's collectives, run standalone on `mesh`: two all-reduces of
    [rows, hidden] per layer and the embedding's (vocabulary-parallel sampling adds three of [rows])."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jax.device_put(jnp.ones((mesh.size, rows, hidden), jnp.float32), NamedSharding(mesh, P("tp")))

    @jax.jit
    def collectives(x):
        out = x
        for _ in range(2 * layers + 1):
            out = jax.shard_map(lambda a: jax.lax.psum(a, "tp"), mesh=mesh, in_specs=P("tp"), out_specs=P("tp"))(out)
        return out

    return median_ms(collectives, x, reps=10)


def gpu_only(trace: Path, out: Path) -> None:
    """Write the GPU processes' events of a perfetto trace (and the metadata naming them) to `out`."""
    import gzip

    from trace_summary import load_events

    events, processes = load_events(str(trace))
    gpus = {pid for pid, name in processes.items() if "GPU" in name}
    with gzip.open(out, "wt") as f:
        json.dump({"traceEvents": [e for e in events if e.get("pid") in gpus]}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default="llama-3.1-8b", help="the big model's shape (benchmarks/configs/)")
    parser.add_argument("--offline-requests", type=int, default=256)
    parser.add_argument("--batch1-only", metavar="TAG", help="only batch-1 decode at TP=2 and TP=1, saved as "
                        "gpu_tp_TAG.json (to compare XLA_FLAGS settings process by process)")
    parser.add_argument("--tp-sizes", default="2,1", help="with --batch1-only or --profile: the TP sizes to time, in order "
                        "(under `python -m jaxllm.launch`, only the process count)")
    parser.add_argument("--jnp-split-merge", action="store_true", help="merge the decode attention's splits with "
                        "the plain-jnp merge (the kernel's reference) instead of its Pallas kernel, to time the two")
    parser.add_argument("--xla-kv-write", action="store_true", help="write the step's K/V with XLA's two scatters "
                        "(the kernel's reference) instead of the Pallas write kernel, to time the two")
    parser.add_argument("--no-overlap", action="store_true", help="the engine without its overlap scheduler "
                        "(disable_overlap_scheduler=True), to time the two")
    parser.add_argument("--min-decode-rows", type=int, default=None, help="the engine's smallest decode bucket "
                        "(default: the engine's own, 2 on GPUs; 1 times one-row decode steps)")
    parser.add_argument("--profile", action="store_true", help="only batch-1 decode at TP=2 and TP=1: "
                        "ms/token and a profiler trace (GPU events as perfetto JSON under --out, for benchmarks/trace_summary.py; "
                        "GPU and host summaries of the decode as text)")
    parser.add_argument("--check-tokens", action="store_true", help="only greedy batch-1 tokens with the overlap "
                        "scheduler and one-graph decodes against neither, in one process (--tp-sizes)")
    parser.add_argument("--one-graph", choices=("on", "off"), help="small multi-step decodes as one CUDA graph "
                        "(the runner's one_graph_decode; default: the runner's choice, on for TP > 1)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decodes per dispatch (the engine's "
                        "num_scheduler_steps; default 8)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens of the timed batch-1 request")
    parser.add_argument("--profile-tokens", type=int, default=9, help="with --profile: the tokens of the traced request")
    parser.add_argument("--sampling", action="store_true", help="only TP=2 sampling from vocabulary-split against "
                        "gathered logits: batch-1 decode and offline 128/128 of each")
    args = parser.parse_args()
    small, big = "smollm2-135m", args.model
    args.max_batch, args.max_tokens, args.max_seq_len = 256, 8192, 2304
    tokens, decode_n, off_128 = 16, args.decode_tokens, args.offline_requests
    if args.smoke:
        big, args.max_batch, args.max_tokens, args.max_seq_len = small, 8, 256, 512
        tokens, decode_n, off_128 = 4, 8, 8
    import jax

    from jaxllm.distributed import initialize_from_env

    initialize_from_env()  # under `python -m jaxllm.launch`: join the other processes before touching devices
    if args.jnp_split_merge:
        import pallas_kernels.paged_decode_attention as decode

        decode.combine_splits_kernel = lambda acc, m, l, *, out_dtype, interpret=False: (
            decode.combine_splits(acc, m, l).astype(out_dtype))
    if args.xla_kv_write:
        from jaxllm.layers import attention

        attention.KV_WRITERS["pallas"] = attention.write_kv
    name = f"gpu_tp_{args.batch1_only}.json" if args.batch1_only else "gpu_tp.json"
    result, save = recorder(Path(args.out) / name, device=jax.devices()[0].device_kind, devices=jax.device_count(),
                            processes=jax.process_count(), xla_flags=os.environ.get("XLA_FLAGS", ""))  # fmt: skip
    if args.profile:
        import shutil

        from trace_summary import format_summary

        from jaxllm import SamplingParams

        for tp in map(int, args.tp_sizes.split(",")):
            with engine(big, tp, None, args, [(1, 1)]) as llm:
                K = llm._engine.runner.config.decode_steps
                save(f"llama8b_tp{tp}_batch1decode_ms_per_token_steps{K}", batch1_ms(llm, llm.config.vocab_size, decode_n, K))
                prompt = synthetic(1, 128, llm.config.vocab_size, 1)
                # Default: a prefill, then one 8-step decode; more tokens show the overlap scheduler's follow-ons.
                params = SamplingParams(max_tokens=args.profile_tokens, ignore_eos=True)
                for _ in range(2):  # the second run takes the cached prompt's step shape, as the traced one does
                    llm.generate(prompt, params, use_tqdm=False)
                trace_dir = Path(args.out) / f"trace_tp{tp}"
                jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
                llm.generate(prompt, params, use_tqdm=False)
                jax.profiler.stop_trace()
                found = next(trace_dir.rglob("perfetto_trace.json.gz"))
                summary = format_summary(str(found), top=30, window="paged_decode_attention", host=True)
                (Path(args.out) / f"trace_tp{tp}_summary.txt").write_text(summary)
                print(summary, flush=True)
                gpu_only(found, Path(args.out) / f"trace_tp{tp}.json.gz")  # host events would not fit 16 MiB
                shutil.rmtree(trace_dir)
                save(f"trace_tp{tp}", (Path(args.out) / f"trace_tp{tp}.json.gz").stat().st_size)
        return
    if args.sampling:
        # TP=2 sampling from vocabulary-split logits against gathered [B, V] logits, batch 1 and offline.
        shapes = [(1, 1), (args.max_tokens, 128), (args.max_batch, 1), (128, 128)]
        with engine(big, 2, None, args, shapes) as llm:
            vocab, K = llm.config.vocab_size, llm._engine.runner.config.decode_steps
            for tag, vocab_parallel in (("", True), ("_gathered_logits", False), ("_vocab_parallel_again", True)):
                use_vocab_parallel_sampling(llm, args, vocab_parallel, shapes)
                save(f"llama8b_tp2_batch1decode_ms_per_token_steps{K}{tag}", batch1_ms(llm, vocab, decode_n, K))
                save(f"llama8b_tp2_offline_128_128{tag}", offline(llm, 128, 128, off_128, vocab))
        return
    if args.check_tokens:
        # In one process (the same autotuned kernels), greedy tokens of batch-1 decodes with the overlap
        # scheduler and with one-graph decodes against neither: identical, or diverging at a near-tie.
        # Every run after a first, cold one: the prompt then comes from the prefix cache in all of them
        # (a cold prefill computes its last position in another kernel, which rounds differently in bf16).
        for tp in map(int, args.tp_sizes.split(",")):
            with engine(big, tp, None, args, [(1, 1)]) as llm:
                runner, prompt = llm._engine.runner, synthetic(1, 128, llm.config.vocab_size, 1)
                ref = None
                greedy(llm, prompt, 40)  # cold
                for name, overlap, one_graph in (("plain", False, False), ("overlap", True, False),
                                                 ("overlap_one_graph", True, True), ("plain_again", False, False)):  # fmt: skip
                    llm._engine.overlap = overlap
                    if runner.config.one_graph_decode is not one_graph:
                        runner.config = dataclasses.replace(runner.config, one_graph_decode=one_graph)
                        for shape in [s for s in runner.executables if getattr(s, "decode_steps", 1) > 1]:
                            del runner.executables[shape]
                    got = greedy(llm, prompt, 40)
                    ref = ref or got
                    save(f"llama8b_tp{tp}_greedy_{name}_vs_plain", agreement(ref, got))
        return
    if args.batch1_only:
        for tp in map(int, args.tp_sizes.split(",")):
            with engine(big, tp, None, args, [(1, 1)]) as llm:
                for steps in (1, llm._engine.runner.config.decode_steps):
                    wall: dict = {}
                    save(f"llama8b_tp{tp}_batch1decode_ms_per_token_steps{steps}",
                         batch1_ms(llm, llm.config.vocab_size, decode_n, steps, wall))  # fmt: skip
                    save(f"llama8b_tp{tp}_batch1decode_wall_ms_per_token_steps{steps}", wall["ms"])
                # The timed prompt's greedy tokens, to compare across variants (same weights: seeded).
                from jaxllm import SamplingParams

                out = llm.generate(synthetic(1, 128, llm.config.vocab_size, 1), SamplingParams(max_tokens=40, ignore_eos=True),
                                   use_tqdm=False)  # fmt: skip
                save(f"llama8b_tp{tp}_batch1_greedy_tokens", list(out[0].outputs[0].token_ids))
        return

    # Most important first, each saved as soon as it exists: a run cut short keeps what it measured.
    # (A small engine takes about 30 s to compile on the GPU: SmolLM2's agreement checks come last.)
    prompts = [p * k for p, k in zip(synthetic(4, 1, 1000, 0), (7, 40, 130, 300))]
    agree_shapes = [(512, 300), (4, 1)]  # the four prompts together, then their decodes
    ref, K = {}, None
    for tp in (1, 2):
        t0 = time.perf_counter()
        shapes = agree_shapes + [(128, 128), (1, 1)]
        if tp == 2:
            shapes += [(args.max_tokens, 128), (args.max_batch, 1)]
        with engine(big, tp, None, args, shapes) as llm:
            vocab, K = llm.config.vocab_size, llm._engine.runner.config.decode_steps
            save(f"llama8b_tp{tp}_build_s", time.perf_counter() - t0)
            ref[tp] = greedy(llm, prompts, tokens)
            for steps in (1, K):
                save(f"llama8b_tp{tp}_batch1decode_ms_per_token_steps{steps}", batch1_ms(llm, vocab, decode_n, steps))
            if tp == 1:  # disaggregated: prefill on GPU 0, decode on GPU 1, against the aggregated tokens
                with engine(big, 1, None, args, agree_shapes, devices=[jax.devices()[1]]) as gen:
                    save("llama8b_disaggregated_gpu0_to_gpu1_vs_aggregated",
                         agreement(ref[1], disaggregated(llm, gen, prompts, tokens)))
            if tp == 2:
                save("llama8b_bf16_tp2_vs_tp1", agreement(ref[1], ref[2]))
                for steps in (1, K):
                    key = f"batch1decode_ms_per_token_steps{steps}"
                    save(f"tp2_over_tp1_{key}", result[f"llama8b_tp2_{key}"] / result[f"llama8b_tp1_{key}"])
                cfg = llm.engine_config
                collective = allreduce_ms(llm.mesh, 1, cfg.hidden_size, cfg.num_layers)
                save("llama8b_tp2_batch1_collectives_ms", collective)
                save("allreduce_share_of_tp2_batch1_token", collective / result[f"llama8b_tp2_batch1decode_ms_per_token_steps{K}"])
                save("llama8b_tp2_offline_128_128", offline(llm, 128, 128, off_128, vocab))
                llm._engine.decode_steps = 1
                save("llama8b_tp2_offline_128_128_steps1", offline(llm, 128, 128, off_128, vocab))
                # The same engine sampling from gathered [B, V] logits, the way before vocab-parallel sampling.
                use_vocab_parallel_sampling(llm, args, False, [(128, 128), (1, 1)])
                for steps in (1, K):
                    save(f"llama8b_tp2_batch1decode_ms_per_token_steps{steps}_gathered_logits", batch1_ms(llm, vocab, decode_n, steps))
    for dtype in ("bfloat16", "float32"):  # float32: the same function, so the same tokens up to rounding
        smol = {}
        for tp in (1, 2):
            with engine(small, tp, None, args, agree_shapes, dtype=dtype) as llm:
                smol[tp] = greedy(llm, prompts, tokens)
        save(f"smollm2_{dtype}_tp2_vs_tp1", agreement(smol[1], smol[2]))

    r = result
    print(f"\n== {big} bf16 random weights on {r['devices']} x {r['device']} ==")
    for steps in (1, K):
        key = f"batch1decode_ms_per_token_steps{steps}"
        print(f"batch-1 decode, {steps} decode(s) per dispatch: TP1 {r['llama8b_tp1_' + key]:.2f} ms/token, "
              f"TP2 {r['llama8b_tp2_' + key]:.2f} ms/token (TP2/TP1 = {r['tp2_over_tp1_' + key]:.2f}, target <= 0.6)")
    print(f"TP2 batch-1 from gathered logits: {r['llama8b_tp2_batch1decode_ms_per_token_steps1_gathered_logits']:.2f} / "
          f"{r[f'llama8b_tp2_batch1decode_ms_per_token_steps{K}_gathered_logits']:.2f} ms/token (1 / {K} decodes per dispatch)")
    print(f"offline 128/128 TP2: {r['llama8b_tp2_offline_128_128']['output_tok_s']:.0f} tok/s "
          f"(one decode per dispatch: {r['llama8b_tp2_offline_128_128_steps1']['output_tok_s']:.0f})")
    print(f"collectives of a TP2 batch-1 step: {r['llama8b_tp2_batch1_collectives_ms']:.2f} ms "
          f"= {r['allreduce_share_of_tp2_batch1_token'] * 100:.0f}% of a token")
    print("greedy agreement:", {k: v["identical_prefix_lengths"] for k, v in r.items() if k.endswith(("vs_tp1", "aggregated"))})


if __name__ == "__main__":
    main()
