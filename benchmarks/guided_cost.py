"""What guided decoding costs per output token: the same prompts and lengths unguided and under a
regex, a JSON schema and a choice-free grammar, on one engine (`ignore_eos`, so every request runs
to max_tokens unless its grammar completes first), with the host's time filling token bitmasks
timed apart.

    PYTHONPATH=$PWD python benchmarks/guided_cost.py                 # the CPU: built-in SmolLM2
    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/guided_cost.py --model benchmarks/configs/smollm2-135m \
        --load-format dummy --tokenizer DIR --batch 64    # a GPU: SmolLM2's shape, random weights

Prints a table and one JSON line (RESULT ...), also written to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import default_out, print_result, write_json

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                     "minItems": 12, "maxItems": 50}},
          "required": ["notes"], "additionalProperties": False}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (with --load-format dummy)")
    parser.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax

    from jaxllm import LLM, GuidedDecodingParams, SamplingParams
    from jaxllm import guided as guided_lib

    spent = {"s": 0.0, "rows": 0}
    fill = guided_lib.GuidedDecoder.bitmask

    def timed(self, matcher):
        start = time.perf_counter()
        try:
            return fill(self, matcher)
        finally:
            spent["s"] += time.perf_counter() - start
            spent["rows"] += 1

    fill_many = getattr(guided_lib.GuidedDecoder, "bitmasks", None)  # (older trees have none)

    def timed_many(self, matchers):  # (a step dispatched ahead: its rows at once, engine.py)
        start = time.perf_counter()
        try:
            return fill_many(self, matchers)
        finally:
            spent["s"] += time.perf_counter() - start
            spent["rows"] += len(matchers)

    guided_lib.GuidedDecoder.bitmask = timed
    if fill_many is not None:
        guided_lib.GuidedDecoder.bitmasks = timed_many
    prompts = [f"Write note number {i} about the weather, in lower case:" for i in range(args.batch)]
    cases = {"unguided": None, "regex [a-z ]+": GuidedDecodingParams(regex="[a-z ]+"),
             "json schema": GuidedDecodingParams(json=SCHEMA)}  # fmt: skip
    rows = []
    with LLM(args.model, guided_decoding_backend="llguidance", max_batch_size=max(args.batch, 8),
             tokenizer=args.tokenizer, load_format=args.load_format) as llm:  # fmt: skip
        for name, guided in cases.items():
            params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, guided_decoding=guided)
            llm.generate(prompts, params, use_tqdm=False)  # warm: the first pass of each case
            best = None
            for _ in range(args.repeats):
                spent.update(s=0.0, rows=0)
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                run = {"case": name, "tokens": tokens, "wall_s": wall, "ms_per_token": 1e3 * wall / tokens,
                       "bitmask_ms_per_row": 1e3 * spent["s"] / spent["rows"] if spent["rows"] else 0.0,
                       "bitmask_share": spent["s"] / wall}  # fmt: skip
                best = run if best is None or run["ms_per_token"] < best["ms_per_token"] else best
            rows.append(best)
    base = rows[0]["ms_per_token"]
    print(f"\n{'case':<16} {'tokens':>7} {'ms/token':>9} {'vs unguided':>12} {'mask ms/row':>12} {'mask share':>11}")
    for r in rows:
        r["over_unguided"] = r["ms_per_token"] / base
        print(f"{r['case']:<16} {r['tokens']:>7} {r['ms_per_token']:>9.2f} {r['over_unguided']:>11.2f}x "
              f"{r['bitmask_ms_per_row']:>12.3f} {100 * r['bitmask_share']:>10.1f}%")
    result = {"device": jax.devices()[0].device_kind, "model": args.model, "batch": args.batch, "tokens": args.tokens,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}  # fmt: skip
    write_json(args.out or Path(default_out()) / f"guided_cost_{jax.devices()[0].platform}_{result['date']}.json", result)
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
