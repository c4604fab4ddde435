"""`jaxllm bench`: throughput, latency and serving benchmarks, as trtllm-bench and vllm bench users know them.

  jaxllm bench throughput MODEL [--dataset random|sharegpt-like|FILE.jsonl] [--num-requests N]
                                [--input-len I --output-len O] [engine arguments] [--output-json F]
  jaxllm bench latency MODEL [...]           batch 1, streamed: TTFT and time per output token
  jaxllm bench serve --base-url URL --model NAME [--request-rate R | inf] [--max-concurrency C]

Split by concern: `datasets` (the requests), `offline` (throughput and latency through an LLM in
this process), `client` (an OpenAI-compatible server under load), `report` (figures, table, JSON).
This module only builds the argument parser; the rest is imported when a command runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(kind: type, what: str, ok):
    """An argparse type: `kind(text)` when `ok(value)`, else an error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0 and not math.isnan(v))


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _dataset(text: str) -> str:
    if text in ("random", "sharegpt-like"):
        return text
    if text.endswith(".jsonl") or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"expected random, sharegpt-like or a .jsonl file, got {text!r}")


def _add_dataset_args(p: argparse.ArgumentParser, num_requests_default: int | None) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", type=_dataset, default="random",
                   help="random (fixed lengths, the default) | sharegpt-like (lognormal lengths) | FILE.jsonl (lines "
                        '{"prompt": TEXT or "prompt_token_ids": [...], "output_len": N})')  # fmt: skip
    g.add_argument("--num-requests", type=_positive_int, default=num_requests_default,
                   help=f"requests (default {num_requests_default or '100; a JSONL file: all its lines'})")
    g.add_argument("--input-len", type=_positive_int, default=128, help="random: prompt tokens (default 128)")
    g.add_argument("--output-len", type=_positive_int, default=128,
                   help="random: tokens to generate; JSONL: for lines without output_len (default 128)")
    g.add_argument("--seed", type=int, default=0, help="the synthetic datasets' seed (default 0)")
    g.add_argument("--sharegpt-input-mean", type=_positive_float, default=280.0, help="mean prompt tokens (280)")
    g.add_argument("--sharegpt-output-mean", type=_positive_float, default=220.0, help="mean output tokens (220)")
    g.add_argument("--sharegpt-sigma", type=_positive_float, default=0.9, help="log-sd of both lengths (0.9)")
    g.add_argument("--sharegpt-max-input", type=_positive_int, default=2048, help="longest prompt (2048)")
    g.add_argument("--sharegpt-max-output", type=_positive_int, default=1024, help="longest output (1024)")
    g.add_argument("--output-json", default=None, help="write the results to this JSON file")


def add_engine_args(p: argparse.ArgumentParser, add_model_engine_args) -> None:
    """MODEL and the engine group (LLM() arguments under their names): bench throughput / latency, batch."""
    p.add_argument("model", help="built-in name, local directory, .gguf file or hub id")
    g = p.add_argument_group("engine (LLM() arguments)")
    add_model_engine_args(g)
    g.add_argument("--tensor-parallel-size", "--tp", type=_positive_int, default=1)
    g.add_argument("--max-batch-size", type=_positive_int, default=None,
                   help="default: sized to the job (throughput and batch: the requests, at most 2048 / the "
                        "platform default; latency: 1)")
    g.add_argument("--max-num-tokens", type=_positive_int, default=None)
    g.add_argument("--max-seq-len", type=_positive_int, default=None)
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto", help="dummy: random weights")
    g.add_argument("--skip-tokenizer-init", action="store_true", help="no tokenizer (token-id prompts only)")
    g.add_argument("--num-scheduler-steps", type=_positive_int, default=None, help="decodes per dispatch (8)")
    g.add_argument("--disable-overlap-scheduler", action="store_true")
    g.add_argument("--kv-cache-free-gpu-memory-fraction", type=_fraction, default=None)


def _throughput(args) -> int:
    from jaxllm.bench.offline import run_throughput

    return run_throughput(args)


def _latency(args) -> int:
    from jaxllm.bench.offline import run_latency

    if args.max_batch_size not in (None, 1):
        raise ValueError(f"bench latency runs batch 1; --max-batch-size {args.max_batch_size} does not apply")
    return run_latency(args)


def _serve(args) -> int:
    from jaxllm.bench.client import run_serve

    return run_serve(args)


def _request_rate(text: str) -> float:
    return float("inf") if text.lower() in ("inf", "infinity") else _positive_float(text)


def add_parser(sub, add_model_engine_args) -> None:
    """Add `bench` and its three commands to the `jaxllm` command's subparsers `sub`;
    `add_model_engine_args(group)` adds the engine arguments the other commands share (--dtype, --backend)."""
    bench = sub.add_parser("bench", help="benchmark throughput, latency, or a running server",
                           description=__doc__.split("\n\n")[0])  # fmt: skip
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="{throughput,latency,serve}")
    tp = kinds.add_parser("throughput", help="every request queued at once through LLM.generate (offline)")
    add_engine_args(tp, add_model_engine_args)
    _add_dataset_args(tp, None)
    tp.add_argument("--no-warmup", action="store_true", help="no warm-up pass (the measured pass is the first)")
    tp.set_defaults(func=_throughput)

    lat = kinds.add_parser("latency", help="batch-1 requests, streamed: TTFT and time per output token")
    add_engine_args(lat, add_model_engine_args)
    _add_dataset_args(lat, 5)
    lat.add_argument("--warmup", type=_non_negative_int, default=1, help="warm-up requests, reported apart (1)")
    lat.set_defaults(func=_latency)

    srv = kinds.add_parser("serve", help="a running OpenAI-compatible server under load (/v1/completions, streamed)")
    srv.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    srv.add_argument("--endpoint", default="/v1/completions")
    srv.add_argument("--model", required=True, help="the model name the server serves")
    srv.add_argument("--request-rate", type=_request_rate, default=float("inf"),
                     help="requests per second, Poisson arrivals; inf (default): all at once")
    srv.add_argument("--max-concurrency", type=_positive_int, default=None, help="most requests in flight")
    srv.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM's extension): exact output lengths")
    srv.add_argument("--vocab-size", type=_positive_int, default=None,
                     help="the model's vocabulary size (synthetic datasets' token ids stay below it)")
    srv.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds a request may take (600)")
    _add_dataset_args(srv, None)
    srv.set_defaults(func=_serve)
