"""SmolLM2-135M-Instruct greedy decode throughput on the CPU: jaxllm vs HF transformers, same run.

    python benchmarks/cpu_decode.py [--new-tokens 128] [--out benchmarks/results/cpu_decode.json]

Both run float32 from the same GGUF file. Decode tokens/s counts generated tokens over the time
after the first token (the prefill is timed separately and subtracted), at batch 1 and batch 8;
jaxllm with its default 8 decodes per dispatch and with 1 (num_scheduler_steps), and with 8 but
the overlap scheduler off (disable_overlap_scheduler=True).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import cpu_machine, decode_ms_per_token, default_out, write_json

PROMPT = "Write a short story about a robot who learns to paint."


def jaxllm_decode(path: Path, batch: int, new_tokens: int, steps: int, overlap: bool = True) -> dict:
    from jaxllm import LLM, SamplingParams

    with LLM(model=str(path), dtype="float32", max_batch_size=max(batch, 1), max_num_tokens=512,
             num_scheduler_steps=steps, disable_overlap_scheduler=not overlap) as llm:  # fmt: skip
        prompts = [PROMPT] * batch
        warm = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, warm, use_tqdm=False)  # compiles every shape this run needs
        llm.get_stats()
        first = SamplingParams(max_tokens=1, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, warm, use_tqdm=False)
        total = time.perf_counter() - t0
        stats = llm.get_stats()
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        step_ms = decode_ms_per_token(stats)
        return {
            "decode_tok_s": (generated - batch) / (total - prefill),
            "median_ms_per_token": step_ms,
            "prefill_s": prefill,
            "total_s": total,
            "compilations": llm._engine.runner.num_compilations,
        }


def hf_decode(path: Path, batch: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok([PROMPT] * batch, return_tensors="pt", padding=True)

    def run(n):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            return time.perf_counter() - t0, out

    run(4)
    prefill, _ = run(1)
    total, out = run(new_tokens)
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return {"decode_tok_s": (generated - batch) / (total - prefill), "prefill_s": prefill, "total_s": total,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=os.path.join(default_out(), "cpu_decode.json"))
    args = parser.parse_args()
    from jaxllm.checkpoints.builtin import fetch

    path = fetch("smollm2")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append({"batch": batch, "jaxllm": jaxllm_decode(path, batch, args.new_tokens, 8),
                     "jaxllm_1_decode_per_dispatch": jaxllm_decode(path, batch, args.new_tokens, 1),
                     "jaxllm_no_overlap": jaxllm_decode(path, batch, args.new_tokens, 8, overlap=False),
                     "transformers": hf_decode(path, batch, args.new_tokens)})  # fmt: skip
    result = {
        "machine": cpu_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, float32",
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"\nSmolLM2-135M float32 greedy decode on {result['machine']} ({args.new_tokens} new tokens)")
    print("jaxllm with 8 decodes per dispatch (the default), with 1, and with 8 without the overlap scheduler")
    print(f"{'batch':>5} | {'jaxllm tok/s':>12} | {'ms/token':>8} | {'1/dispatch tok/s':>16} | "
          f"{'no overlap tok/s':>16} | {'transformers tok/s':>18} | {'ratio':>6}")  # fmt: skip
    for r in rows:
        j, one, h = r["jaxllm"], r["jaxllm_1_decode_per_dispatch"], r["transformers"]
        print(f"{r['batch']:>5} | {j['decode_tok_s']:>12.1f} | {j['median_ms_per_token']:>8.1f} | "
              f"{one['decode_tok_s']:>16.1f} | {r['jaxllm_no_overlap']['decode_tok_s']:>16.1f} | "
              f"{h['decode_tok_s']:>18.1f} | {j['decode_tok_s'] / h['decode_tok_s']:>5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
