"""A `jaxllm batch` job as a user runs it: a JSONL file of OpenAI Batch API completion requests with
ShareGPT-like lengths (token-id prompts, `ignore_eos`, the card's mix), the command run as a new
process, and the wall time from the command to the last line written, start-up and compilation
included; then the output checked (every custom_id exactly once, each a 200 with its max_tokens).

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/batch_job.py --card h200 --requests 10000
    PYTHONPATH=$PWD python benchmarks/batch_job.py --card cpu --requests 32

The job's own summary (ready, compile, generation seconds) comes back beside the wall time. Compare
its throughput with the warm offline figure of the same mix (benchmarks/realistic_load.py's second
pass, run on the same card). Prints a table and one JSON line (RESULT ...), also written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import CARDS, default_out, print_result, sharegpt_like, write_json

from serve_load import engine_flags

REPO = Path(__file__).resolve().parents[1]


def write_requests(path: Path, mix: dict, n: int, vocab: int, seed: int) -> list[int]:
    """n completion requests of the mix's lengths; returns their max_tokens."""
    prompts, outputs = sharegpt_like(n, mix["prompt_mean"], mix["output_mean"], mix["sigma"], mix["max_prompt"],
                                     mix["max_output"], vocab, seed)  # fmt: skip
    with path.open("w", encoding="utf-8") as f:
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            body = {"model": "bench", "prompt": prompt, "max_tokens": out, "temperature": 0.0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return outputs


def check_output(path: Path, expected: list[int]) -> dict:
    """Every custom_id once, a 200 with exactly its max_tokens."""
    seen, bad = {}, []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        seen[row["custom_id"]] = seen.get(row["custom_id"], 0) + 1
        response = row["response"]
        i = int(row["custom_id"].split("-")[1])
        if response["status_code"] != 200 or response["body"]["usage"]["completion_tokens"] != expected[i]:
            bad.append(row["custom_id"])
    missing = [f"req-{i}" for i in range(len(expected)) if f"req-{i}" not in seen]
    duplicated = [k for k, v in seen.items() if v > 1]
    return {"lines": sum(seen.values()), "missing": len(missing), "duplicated": len(duplicated), "wrong": len(bad),
            "examples": (missing + duplicated + bad)[:5]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", choices=sorted(CARDS), default="h200")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    card, out_dir = CARDS[args.card], Path(default_out())
    out_dir.mkdir(parents=True, exist_ok=True)
    model = card["model"]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"] if Path(model).is_dir() else 49152
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxllm-batch-job-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    requests, results, summary = work / "requests.jsonl", work / "results.jsonl", work / "summary.json"
    expected = write_requests(requests, card["mix"], args.requests, vocab, args.seed)
    # The job sizes its engine to the file (max_seq_len, batch, tokens); the card's sizes are caps.
    flags = engine_flags({k: v for k, v in card["llm"].items() if k not in ("max_seq_len",)})
    cmd = [sys.executable, "-m", "jaxllm.cli", "batch", model, "-i", str(requests), "-o", str(results),
           "--summary", str(summary), "--no-progress", "--served-model-name", "bench", *flags]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)  # `-m` imports from the cwd first
    wall = time.perf_counter() - started
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
    if done.returncode != 0:
        print(f"the job exited {done.returncode}", flush=True)
        return 1
    job = json.loads(summary.read_text())
    check = check_output(results, expected)
    result = {"card": args.card, "model": model, "mix": card["mix"], "requests": args.requests,
              "date": time.strftime("%Y-%m-%d"), "command_to_last_line_s": wall, "job": job, "check": check,
              "output_tokens": sum(expected), "output_tok_s_wall": sum(expected) / wall,
              "output_tok_s_generation": job["output_tokens_per_s"]}  # fmt: skip
    print(f"\n{'measure':<44} {'value':>12}")
    for name, value in (("requests", args.requests), ("output tokens", sum(expected)),
                        ("command to last line, s", wall), ("job: engine ready, s", job["startup_s"]),
                        ("job: programs compiled before generation, s", job["compile_s"]),
                        ("job: generation, s", job["generate_s"]), ("output tok/s, wall", result["output_tok_s_wall"]),
                        ("output tok/s, generation", job["output_tokens_per_s"]),
                        ("missing / duplicated / wrong lines", f"{check['missing']}/{check['duplicated']}/{check['wrong']}")):  # fmt: skip
        print(f"{name:<44} {value:>12,.1f}" if isinstance(value, float) else f"{name:<44} {value:>12}")
    write_json(args.out or out_dir / f"batch_job_{args.card}_{result['date']}.json", result)
    print_result(result)
    return 0 if not (check["missing"] or check["duplicated"] or check["wrong"]) else 1


if __name__ == "__main__":
    sys.exit(main())
