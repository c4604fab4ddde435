"""The warm engine through the public API only, so that two commits can be timed side by side in one
call: batch-1 decode (ms per token after the first, streaming) and offline 128/128 throughput, each
after a warm-up pass of the same shape; and greedy tokens of 'pallas' against 'xla' on small shapes.

    python benchmarks/steady_state.py --label new                  # this tree
    PYTHONPATH=/path/to/old/tree python benchmarks/steady_state.py --label old

Llama-3.1-8B shape in bf16, random weights (load_format="dummy"); on the CPU `--model smollm2` (the
built-in SmolLM2-135M, float32) with a smaller load, e.g. `--requests 32 --tokens 64 --skip-correctness`.
Prints one JSON line (RESULT ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import CARDS, CONFIGS, print_result


def batch1_ms(llm, SamplingParams, vocab: int, tokens: int = 256, prompt_len: int = 128) -> float:
    prompt = [int(10 + (i * 7919) % (vocab - 20)) for i in range(prompt_len)]
    times = []
    for out in llm.generate_async(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), streaming=True):
        times.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    (t0, n0), (t1, n1) = times[0], times[-1]
    return (t1 - t0) / (n1 - n0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="new")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128, help="prompt and output length of the batch")
    parser.add_argument("--model", default="llama-3.1-8b", help="'llama-3.1-8b' (random bf16) or 'smollm2'")
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    import jax
    import numpy as np

    from jaxllm import LLM, SamplingParams

    result = {"label": args.label, "jaxllm": sys.modules["jaxllm"].__file__, "device": jax.devices()[0].device_kind}
    started = time.perf_counter()
    if args.model == "smollm2":
        llm = LLM(model="smollm2", dtype="float32", skip_tokenizer_init=True, max_batch_size=64,
                  max_num_tokens=2048, max_seq_len=1024)  # fmt: skip
    else:
        llm = LLM(model=str(CONFIGS / args.model), **CARDS["h200"]["llm"])
    result["llm_s"] = time.perf_counter() - started
    vocab = llm.config.vocab_size
    batch1_ms(llm, SamplingParams, vocab, 32)
    result["batch1_ms"] = statistics.median(batch1_ms(llm, SamplingParams, vocab, 2 * args.tokens, args.tokens)
                                            for _ in range(3))  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(10, vocab - 10, size=args.tokens)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    result[f"tok_s_{args.tokens}_{args.tokens}"] = runs
    llm.shutdown()
    if not args.skip_correctness:
        rows = []
        prompts = [[int(t) for t in rng.integers(10, 900, size=n)] for n in (7, 40, 130, 600)]
        for name in ("smollm2-135m", "gemma3-270m"):
            got = {}
            for backend in ("xla", "pallas"):
                small_args = dict(load_format="dummy", dtype="float32", skip_tokenizer_init=True, backend=backend,
                                  max_batch_size=8, max_num_tokens=1024, max_seq_len=1024)
                with LLM(model=str(CONFIGS / name), **small_args) as small:
                    outs = small.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
                    got[backend] = [o.outputs[0].token_ids for o in outs]
            rows.append({"model": name, "same_tokens": got["xla"] == got["pallas"]})
        result["pallas_vs_xla"] = rows
    print_result(result)


if __name__ == "__main__":
    main()
