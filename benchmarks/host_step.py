"""The engine's host time per step at the GPU's batch sizes, on the CPU: a 1-layer Llama of hidden
size 32 (benchmarks/configs/host-bound-llama), 2,048 sequences and 8,192 tokens a step, multi-step
decodes of up to 2,048 rows, 4,096 requests of 128/128 queued at once, twice. XLA runs on one
thread (`XLA_FLAGS` below), so the engine thread has a core of its own; the step trace
(engine/step_trace.py) gives each step kind's host time (its wall time less the wait for results).

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" JAX_PLATFORMS=cpu \\
        python benchmarks/host_step.py [TREE]      # TREE: a `git archive` of another commit, side by side
"""

from __future__ import annotations

import dataclasses
import sys
import time

tree = sys.argv[1] if len(sys.argv) > 1 else None
if tree:
    sys.path.insert(0, tree)

from common import CONFIGS, synthetic  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.engine import step_trace  # noqa: E402


def main() -> None:
    llm = LLM(model=str(CONFIGS / "host-bound-llama"), load_format="dummy", dtype="float32",
              skip_tokenizer_init=True, max_batch_size=2048, max_num_tokens=8192, max_seq_len=4096,
              kv_cache_config={"max_tokens": 900_000})  # fmt: skip
    runner = llm._engine.runner  # multi-step decodes as wide as on a GPU (the CPU's default caps them)
    runner.buckets = dataclasses.replace(runner.buckets, multi_step_max_rows=2048)
    runner.reset_programs()
    runner.precompile(progress=False)
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    llm.generate(synthetic(2048, 128, 512, 1), params, use_tqdm=False)  # every shape once
    engine = llm._engine
    for rep in range(2):
        engine.trace_steps(True)
        start = time.perf_counter()
        llm.generate(synthetic(4096, 128, 512, 2 + rep), params, use_tqdm=False)
        wall = time.perf_counter() - start
        kinds = step_trace.breakdown(engine.trace_steps(False))["kinds"]
        figures = [f"{name} {k['mean_host_ms']:.1f} (of {k['mean_step_ms']:.1f}, {k['steps']} steps)"
                   for name, k in kinds.items()]  # fmt: skip
        print(f"{tree or 'this tree'}: wall {wall:.1f} s; host ms a step: " + ", ".join(figures), flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
