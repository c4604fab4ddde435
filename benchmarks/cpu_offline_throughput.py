"""Offline throughput on the CPU: continuous batching vs one request at a time, same run.

    python benchmarks/cpu_offline_throughput.py [--requests 32] [--isl 64] [--osl 64]

SmolLM2-135M-Instruct (float32). The same fixed-length synthetic requests are generated twice:
all queued at once (the engine batches them continuously), then one after another. It also runs
a mixed workload (varied prompt lengths, sampling options, streaming) and reports how many step
executables it compiled against the bucket bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from common import default_out, synthetic, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(default_out(), "cpu_offline.json"))
    args = parser.parse_args()

    from jaxllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.osl, ignore_eos=True)
    with LLM(model="smollm2", dtype="float32", max_batch_size=64, max_num_tokens=1024) as llm:
        prompts = synthetic(args.requests, args.isl, llm.config.vocab_size, seed=0, margin=100)
        llm.generate(prompts, params, use_tqdm=False)  # warm: compile the shapes both modes use
        for p in prompts[:2]:
            llm.generate(p, params, use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        batched = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        t0 = time.perf_counter()
        for p in prompts:
            llm.generate(p, params, use_tqdm=False)
        sequential = time.perf_counter() - t0

    import numpy as np

    with LLM(model="smollm2", dtype="float32", max_batch_size=64, max_num_tokens=1024) as llm:
        rng = np.random.default_rng(1)
        futures = []
        for i in range(120):
            length = int(rng.integers(1, 400))
            prompt = [int(t) for t in rng.integers(100, 40000, size=length)]
            sp = SamplingParams(max_tokens=int(rng.integers(1, 80)), ignore_eos=True,
                                temperature=[0.0, 0.8][i % 2], top_p=[None, 0.9][i % 3 == 0],
                                logprobs=[None, 2][i % 5 == 0])  # fmt: skip
            futures.append(llm.generate_async(prompt, sp, streaming=i % 4 == 0))
        for f in futures:
            f.result()
        runner = llm._engine.runner
        compilations = runner.num_compilations
        bound = len(runner.bucket_shapes())

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, float32",
        "requests": args.requests, "isl": args.isl, "osl": args.osl,
        "continuous_batching_tok_s": tokens / batched,
        "one_at_a_time_tok_s": tokens / sequential,
        "speedup": sequential / batched,
        "mixed_workload_requests": 120,
        "mixed_workload_compilations": compilations,
        "bucket_bound_plain_shapes": bound,
    }  # fmt: skip
    write_json(args.out, result)
    print(f"\nSmolLM2-135M float32 offline, {args.requests} requests ISL/OSL {args.isl}/{args.osl}, {result['machine']}")
    print(f"continuous batching : {result['continuous_batching_tok_s']:8.1f} output tok/s")
    print(f"one at a time       : {result['one_at_a_time_tok_s']:8.1f} output tok/s   ({result['speedup']:.2f}x slower)")
    print(f"mixed workload (120 requests, prompt 1-400 tokens, mixed sampling): {compilations} compilations "
          f"(plain-shape bound {bound})")


if __name__ == "__main__":
    main()
