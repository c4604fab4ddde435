"""A step run ahead launched on the engine thread or on the runner's launch thread
(jaxllm/engine/runner.py LAUNCH_APART), side by side in one engine: the switch is read at each
dispatch, not traced into a program, so one LLM() serves every pass. Passes alternate off / on
(new prompts each: no prefix-cache hits), each traced (engine/step_trace.py): output tok/s, and a
multi-step dispatch's and a mixed step's wall, host and dispatch-call milliseconds.

    PYTHONUNBUFFERED=1 python benchmarks/launch_apart.py [--model llama-3.1-8b-fp8 --kv-cache-dtype fp8]
        [--requests 2048] [--isl 128] [--osl 128] [--passes 4]
    python benchmarks/launch_apart.py --smoke        # tiny sizes on the CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CONFIGS, default_out, device_name, synthetic, write_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b-fp8", help="a config under benchmarks/configs")
    parser.add_argument("--kv-cache-dtype", choices=("fp8",), default="fp8")
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--passes", type=int, default=4, help="alternating off, on, off, on, ...")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = parser.parse_args(argv)

    from jaxllm import LLM, SamplingParams
    from jaxllm.engine import runner as runner_lib
    from jaxllm.engine import step_trace

    engine_args = dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_seq_len=4224)
    if args.kv_cache_dtype:
        engine_args["kv_cache_config"] = {"dtype": args.kv_cache_dtype}
    model = str(CONFIGS / args.model)
    if args.smoke:
        model, args.requests, args.isl, args.osl = str(CONFIGS / "host-bound-llama"), 64, 16, 24
        engine_args.update(dtype="float32", max_batch_size=64, max_num_tokens=256, max_seq_len=64)
        engine_args.pop("kv_cache_config", None)
    started = time.perf_counter()
    llm = LLM(model=model, **engine_args)
    ready_s = time.perf_counter() - started
    engine, vocab = llm._engine, llm.config.vocab_size
    print(f"{device_name()}: {args.model}, LLM() ready in {ready_s:.0f} s", flush=True)
    params = SamplingParams(max_tokens=args.osl, ignore_eos=True)
    passes = []
    for i in range(args.passes):
        apart = i % 2 == 1
        runner_lib.LAUNCH_APART[0] = apart
        prompts = synthetic(args.requests, args.isl, vocab, seed=100 + i)
        engine.trace_steps(True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        figures = step_trace.breakdown(engine.trace_steps(False))
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        row = {"pass": i + 1, "launch_apart": apart, "output_tok_s": tokens / wall, "wall_s": wall}
        for kind in ("multi-step", "mixed"):
            k = figures["kinds"].get(kind)
            if k:
                row[kind] = {"steps": k["steps"], "ms": k["mean_step_ms"], "host_ms": k["mean_host_ms"],
                             "dispatch_ms": k["mean_dispatch_ms"]}  # fmt: skip
        passes.append(row)
        print(json.dumps(row), flush=True)
    runner_lib.LAUNCH_APART[0] = False
    llm.shutdown()
    print(f"\n{'pass':>4} {'apart':>6} {'tok/s':>8} {'multi-step ms / host / dispatch':>32} "
          f"{'mixed ms / host / dispatch':>28}")
    for row in passes:
        cells = []
        for kind in ("multi-step", "mixed"):
            k = row.get(kind)
            cells.append(f"{k['ms']:.1f} / {k['host_ms']:.1f} / {k['dispatch_ms']:.1f}" if k else "-")
        print(f"{row['pass']:>4} {str(row['launch_apart']):>6} {row['output_tok_s']:>8.0f} {cells[0]:>32} "
              f"{cells[1]:>28}")
    result = {"device": device_name(), "model": args.model, "kv_cache_dtype": args.kv_cache_dtype,
              "requests": args.requests, "isl": args.isl, "osl": args.osl, "ready_s": ready_s, "passes": passes}
    out = Path(args.out or Path(default_out()) / f"launch_apart_{time.strftime('%Y-%m-%d')}.json")
    write_json(out, result)


if __name__ == "__main__":
    main()
