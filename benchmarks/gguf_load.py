"""A GGUF file on the CPU: its blocks kept (int4 / int8 groups) against dequantized to float32.

    python benchmarks/gguf_load.py [--models smollm2,gemma3-270m] [--trees .,/path/to/old/tree]
                                   [--out benchmarks/results]

Each (tree, model, mode) runs in two processes of its own, with JAXLLM_PRECOMPILE=0 (programs
compile on first use, as on the first request) and an empty program cache: the weights' load alone
(`load_engine_params`: seconds, the process's peak RSS before and after it, the bytes the params
take), then `LLM()` on the same file and 32 greedy tokens at batch 1, three times (ms a token of the
first request, its programs compiled in it, and of the third, warm; the process's peak RSS at the
end). Modes: `float32` (the default: every tensor dequantized), `w4a16`
(`QuantConfig(quant_algo='W4A16', group_size=32, has_zero_point=True)`: every projection int4),
`gguf` (the CLI's `--quantization gguf`: a file mostly of 4-bit blocks as w4a16 with its projections
of other types excluded, float; any other file's blocks as int8 groups, W8A16_GPTQ). `--trees` runs the same in other checkouts (their package on PYTHONPATH),
for a change measured beside its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_machine, default_out, write_json

PROMPT = "What is the capital of France?"
MODES = {"float32": None, "w4a16": {"quant_algo": "W4A16", "group_size": 32, "has_zero_point": True}, "gguf": "file"}


def _quant(mode: str, path) -> dict | None:
    """QuantConfig's fields of a mode ('gguf': the file's, checkpoints/gguf.py: blocks_quant_config)."""
    if MODES[mode] != "file":
        return MODES[mode]
    from jaxllm.checkpoints.gguf import blocks_quant_config

    return blocks_quant_config(path)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def load_child(model: str, mode: str) -> dict:
    """The weights' load alone (`load_engine_params`)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxllm.checkpoints import loader
    from jaxllm.checkpoints.builtin import fetch

    from jaxllm.checkpoints.names import excluded_projections

    resolved = loader.resolve(str(fetch(model)))
    cfg = loader.read_config(resolved)
    quant = _quant(mode, resolved.path)
    if quant is not None:
        cfg = dataclasses.replace(cfg, quant_algo="W4A16", quant_group_size=32, quant_zero_point=True,
                                  quant_exclude=excluded_projections(cfg, quant.get("exclude_modules")))  # fmt: skip
    before = _peak_mb()
    t0 = time.perf_counter()
    params = jax.block_until_ready(loader.load_engine_params(resolved, cfg, "float32", progress=False))
    load_s = time.perf_counter() - t0
    # the weights' own bytes: int4 at half a byte (jax counts a byte an element)
    param_mb = sum(x.size * (0.5 if x.dtype == jnp.int4 else x.dtype.itemsize) for x in jax.tree.leaves(params)) / 1e6
    return {"load_s": load_s, "rss_before_load_mb": before, "rss_after_load_mb": _peak_mb(), "param_mb": param_mb}


def llm_child(model: str, mode: str) -> dict:
    """LLM() and three requests of 32 greedy tokens at batch 1."""
    from jaxllm import LLM, QuantConfig, SamplingParams
    from jaxllm.checkpoints.builtin import fetch

    path = fetch(model)
    quant = _quant(mode, path)
    t0 = time.perf_counter()
    kwargs = {} if quant is None else {"quant_config": QuantConfig(**quant)}
    with LLM(model=str(path), dtype="float32", max_batch_size=1, max_num_tokens=256, **kwargs) as llm:
        ready_s = time.perf_counter() - t0
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        ttft = time.perf_counter() - t0
        timed = []
        for _ in range(3):  # the first request of 32 tokens (its programs compiled in it), ..., warm (the
            # second one hits the prefix cache, a step of another shape: one more program)
            t0 = time.perf_counter()
            out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
            timed.append(1000 * (time.perf_counter() - t0) / len(out.token_ids))
    return {"llm_ready_s": ready_s, "first_token_s": ttft, "first_ms_per_token": timed[0], "ms_per_token": timed[-1],
            "text": out.text, "peak_rss_mb": _peak_mb()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--modes", default="float32,w4a16,gguf")
    parser.add_argument("--trees", default=".", help="checkouts whose jaxllm runs, comma-separated")
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--child", nargs=3, metavar=("PART", "MODEL", "MODE"))
    args = parser.parse_args()
    if args.child:
        part, model, mode = args.child
        print(json.dumps((load_child if part == "load" else llm_child)(model, mode)))
        return
    rows = []
    here = Path(__file__).resolve().parent
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for tree in args.trees.split(","):
                row = {"model": model, "mode": mode, "tree": tree}
                for part in ("load", "llm"):
                    with tempfile.TemporaryDirectory() as cache:  # every run compiles its programs
                        env = dict(os.environ, JAXLLM_PRECOMPILE="0", JAX_PLATFORMS="cpu", JAXLLM_COMPILE_CACHE=cache,
                                   PYTHONPATH=f"{Path(tree).resolve()}{os.pathsep}{here}")  # fmt: skip
                        run = subprocess.run([sys.executable, __file__, "--child", part, model, mode], env=env,
                                             capture_output=True, text=True, check=False)  # fmt: skip
                    if run.returncode != 0:
                        print(run.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{tree} {model} {mode} {part}: exit {run.returncode}")
                    row.update(json.loads(run.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(f"{tree:>12} {model:>12} {mode:>8}: load {row['load_s']:5.1f} s, RSS after load "
                      f"{row['rss_after_load_mb']:6.0f} MB (before {row['rss_before_load_mb']:4.0f}), params "
                      f"{row['param_mb']:5.0f} MB | LLM() {row['llm_ready_s']:5.1f} s, first token "
                      f"{row['first_token_s']:5.1f} s, 32 tokens {row['first_ms_per_token']:6.1f} ms/token first, "
                      f"{row['ms_per_token']:6.1f} warm, peak RSS "
                      f"{row['peak_rss_mb']:6.0f} MB | {row['text'][:40]!r}", flush=True)  # fmt: skip
    write_json(Path(args.out) / "gguf_load.json", {"machine": cpu_machine(), "rows": rows})


if __name__ == "__main__":
    main()
