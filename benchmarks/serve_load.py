"""`jaxllm serve` under load beside the offline engine, on one card: the ShareGPT-like mix sent by
`jaxllm bench serve` at several fixed concurrencies (TTFT, TPOT p50/p99, output tok/s), then the
same mix offline through `jaxllm bench throughput` (its first pass, compilation included, and its
second), so that the server's throughput at the highest concurrency reads as a share of offline's.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/serve_load.py --card h200   # JSON to $OUT
    PYTHONPATH=$PWD python benchmarks/serve_load.py --card cpu --concurrency 1 4 --requests 8 8

The server is a subprocess (`python -m jaxllm.cli serve`, logs to a file); each concurrency sends
its own seeded draw of the mix (--requests, one count per concurrency; the highest concurrency's
mix is the one run offline). Prints a table and one JSON line (RESULT ...), also written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import CARDS, default_out, print_result, write_json

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(llm_kwargs: dict) -> list[str]:
    """`jaxllm serve` / `bench throughput` flags of a card's LLM() arguments."""
    flags = []
    for key, value in llm_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (None, False):
            flags += [flag, str(value)]
    return flags


def wait_healthy(base: str, server: subprocess.Popen, log: Path, timeout_s: float) -> float:
    import httpx

    started = time.monotonic()
    while True:
        if server.poll() is not None:
            raise RuntimeError("the server exited:\n" + log.read_text(errors="replace")[-3000:])
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def mix_flags(mix: dict, n: int, seed: int) -> list[str]:
    return ["--dataset", "sharegpt-like", "--num-requests", str(n), "--seed", str(seed),
            "--sharegpt-input-mean", str(mix["prompt_mean"]), "--sharegpt-output-mean", str(mix["output_mean"]),
            "--sharegpt-sigma", str(mix["sigma"]), "--sharegpt-max-input", str(mix["max_prompt"]),
            "--sharegpt-max-output", str(mix["max_output"])]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", choices=sorted(CARDS), default="h200")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--requests", type=int, nargs="+", default=[32, 256, 512, 1000],
                        help="requests per concurrency (one count each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if len(args.requests) != len(args.concurrency):
        parser.error("give one --requests count per --concurrency")
    card, out_dir = CARDS[args.card], Path(default_out())
    mix = card["mix"]
    llm_kwargs = dict(card["llm"])
    vocab = json.loads((Path(card["model"]) / "config.json").read_text())["vocab_size"] if Path(card["model"]).is_dir() \
        else None  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), JAXLLM_LOG="WARNING")
    result = {"card": args.card, "model": card["model"], "mix": mix, "date": time.strftime("%Y-%m-%d"), "serve": []}
    port, log = _free_port(), out_dir / "serve_load_server.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "serve", card["model"], "--port", str(port),
                                   *engine_flags(llm_kwargs)], env=env, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        result["server_ready_s"] = wait_healthy(base, server, log, 900)
        print(f"server ready in {result['server_ready_s']:.1f} s", flush=True)
        import httpx

        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        if vocab is None:
            vocab = 49152  # SmolLM2's vocabulary (the CPU card's built-in model)
        for concurrency, n in zip(args.concurrency, args.requests):
            path = out_dir / f"serve_load_c{concurrency}.json"
            cmd = [sys.executable, "-m", "jaxllm.cli", "bench", "serve", "--base-url", base, "--model", model,
                   "--max-concurrency", str(concurrency), "--ignore-eos", "--vocab-size", str(vocab),
                   *mix_flags(mix, n, args.seed), "--output-json", str(path)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
            s = json.loads(path.read_text())["measured"]
            row = {"concurrency": concurrency, "requests": n, "completed": s["completed"], "failed": s["failed"],
                   "output_tok_s": s["total_output_throughput_tok_s"], "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"]}  # fmt: skip
            result["serve"].append(row)
            print(f"concurrency {concurrency:>4}: {row['output_tok_s']:>9,.0f} tok/s, TTFT p50/p99 "
                  f"{s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, TPOT p50/p99 "
                  f"{s['tpot_ms']['p50']:.2f}/{s['tpot_ms']['p99']:.2f} ms, failed {s['failed']}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    if not args.skip_offline:
        path = out_dir / "serve_load_offline.json"
        cmd = [sys.executable, "-m", "jaxllm.cli", "bench", "throughput", card["model"], *engine_flags(llm_kwargs),
               *mix_flags(mix, args.requests[-1], args.seed), "--output-json", str(path)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        offline = json.loads(path.read_text())
        result["offline"] = {name: offline[name]["total_output_throughput_tok_s"] for name in ("first_pass", "measured")}
        top = result["serve"][-1]["output_tok_s"]
        result["serve_over_offline"] = top / result["offline"]["measured"]
        print(f"offline: first pass {result['offline']['first_pass']:,.0f}, second {result['offline']['measured']:,.0f} "
              f"tok/s; serve at concurrency {args.concurrency[-1]}: {100 * result['serve_over_offline']:.1f}% of it")  # fmt: skip
    write_json(args.out or out_dir / f"serve_load_{args.card}_{result['date']}.json", result)
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
