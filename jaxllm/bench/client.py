"""`jaxllm bench serve`: load on a running OpenAI-compatible server (vllm bench serve).

Requests go to /v1/completions, streamed (server-sent events), from an asyncio client (httpx, the
`serve` extra). They are sent at `--request-rate` per second, Poisson (exponential gaps, seeded) or
all at once (inf), with at most `--max-concurrency` in flight. Token-id prompts (the synthetic
datasets) are sent as lists of ints, which the completions API accepts.

Token counts come from the final chunk's `usage` (asked for with stream_options.include_usage);
a server that sends none has its output tokens counted one per streamed chunk with text. Tokens
arrive with a chunk that has text or token ids (`return_token_ids`, vLLM's extension, asked for: a
server without a tokenizer streams token ids and no text). A request
that gets an HTTP error, an error event, a broken stream or no tokens at all is a failure: counted,
its reason kept, and left out of every figure but the failure count.
"""

from __future__ import annotations

import asyncio
import json
import time

from jaxllm.bench.datasets import BenchRequest
from jaxllm.bench.report import RequestRecord, summarize, table, write_json


def _httpx():
    try:
        import httpx
    except ImportError:
        raise ImportError("`jaxllm bench serve` needs httpx: pip install 'jaxllm[serve]' (or pip install httpx)") from None
    return httpx


def completions_url(base_url: str, endpoint: str) -> str:
    """base URL + endpoint, without doubling a /v1 the base URL already ends with."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + endpoint


async def send(client, url: str, model: str, request: BenchRequest, ignore_eos: bool) -> RequestRecord:
    """One streamed completion; its record (with `error` set when it failed)."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}  # fmt: skip
    if ignore_eos:
        body["ignore_eos"] = True
    record = RequestRecord(prompt_tokens=request.prompt_len)
    started = time.monotonic()
    arrivals, chunks, usage = [], 0, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")[:200]
                record.error = f"HTTP {response.status_code}: {text}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = f"error event: {json.dumps(event['error'])[:200]}"
                    return record
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    arrivals.append(time.monotonic())
                    chunks += 1
    except Exception as e:  # a refused connection, a broken stream, bad JSON: the request failed
        record.error = f"{type(e).__name__}: {e}"[:200]
        return record
    record.output_tokens = usage.get("completion_tokens", chunks) if usage else chunks
    if usage and usage.get("prompt_tokens") is not None:
        record.prompt_tokens = usage["prompt_tokens"]
    if not arrivals or record.output_tokens == 0:
        record.error = "no tokens streamed"
        return record
    record.ttft, record.latency = arrivals[0] - started, arrivals[-1] - started
    record.itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return record


async def run_load(url: str, model: str, requests: list[BenchRequest], request_rate: float,
                   max_concurrency: int | None, ignore_eos: bool, seed: int, timeout_s: float) -> tuple[list, float]:  # fmt: skip
    """Send `requests` at `request_rate` (Poisson; inf: all at once), at most `max_concurrency` in
    flight. Returns (records in request order, seconds from the first send to the last answer)."""
    import numpy as np

    httpx = _httpx()
    rng = np.random.default_rng(seed)
    gaps = [0.0] * len(requests) if request_rate == float("inf") else rng.exponential(1 / request_rate, len(requests))
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connections = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=connections) as client:

        async def one(request):
            if limit is None:
                return await send(client, url, model, request, ignore_eos)
            async with limit:
                return await send(client, url, model, request, ignore_eos)

        started = time.monotonic()
        tasks = []
        for gap, request in zip(gaps, requests):
            if gap:
                await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
        return list(records), time.monotonic() - started


def run_serve(args) -> int:
    from jaxllm.bench.offline import describe_dataset, load_requests

    _httpx()
    requests = load_requests(args, args.vocab_size)
    url = completions_url(args.base_url, args.endpoint)
    records, duration = asyncio.run(run_load(url, args.model, requests, args.request_rate, args.max_concurrency,
                                             args.ignore_eos, args.seed, args.timeout))  # fmt: skip
    measured = summarize(records, duration)
    result = {"command": "serve", "base_url": args.base_url, "endpoint": args.endpoint, "model": args.model,
              "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
              "max_concurrency": args.max_concurrency, "dataset": describe_dataset(args, requests),
              "measured": measured}  # fmt: skip
    if args.output_json:  # first: a closed terminal pipe must not lose the results
        write_json(args.output_json, result)
    rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}/s"
    print(table(f"serve: {args.model} at {url}, {len(requests)} requests, rate {rate}, "
                f"concurrency {args.max_concurrency or 'unbounded'}", {"measured": measured}))  # fmt: skip
    return 0 if measured["completed"] else 1
