"""How fast aborts land and how smooth the asyncio path is, on the CPU: abort latency (from
`RequestOutput.abort()` to the stream's last item) over streaming requests aborted at random points,
from threads and from asyncio, and the asyncio loop's lag (a ticker task asks for a wake-up every
1 ms and records how late it comes).

    PYTHONPATH=. python benchmarks/faults.py                 # this tree, SmolLM2-135M (GGUF)
    PYTHONPATH=/path/to/old/tree python benchmarks/faults.py --label old
    PYTHONPATH=. python benchmarks/faults.py --model tiny    # a tiny random Llama (tests/tiny.py)

Prints a table and one JSON line (RESULT ...).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import print_result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def make_llm(model: str, batch: int):
    from jaxllm import LLM

    if model == "tiny":  # tests/ from the checkout on PYTHONPATH
        from tests import tiny

        path = tiny.save_tiny("llama", Path(tempfile.mkdtemp(prefix="faults-tiny-")) / "llama")
        return LLM(model=str(path), dtype="float32", skip_tokenizer_init=True, max_batch_size=batch, max_num_tokens=256)
    if model == "smollm2":
        from jaxllm.checkpoints.builtin import fetch

        model = str(fetch("smollm2"))
    return LLM(model=model, dtype="float32", max_batch_size=batch, max_num_tokens=512)


def prompts_for(llm, count: int, rng: random.Random) -> list[list[int]]:
    vocab = llm.config.vocab_size
    return [[rng.randrange(10, min(vocab, 30000)) for _ in range(rng.randrange(4, 48))] for _ in range(count)]


def aborts_from_threads(llm, SamplingParams, prompts, concurrency: int, rng: random.Random) -> list[float]:
    """Each of `concurrency` threads streams requests one after another and aborts each after a
    random number of tokens; seconds from abort() to the stream's end."""
    latencies: list[float] = []
    lock = threading.Lock()
    cuts = [rng.randrange(1, 64) for _ in prompts]

    def worker(indices):
        for i in indices:
            stream = llm.generate_async(prompts[i], SamplingParams(max_tokens=900, ignore_eos=True), streaming=True)
            aborted_at = None
            for out in stream:
                if aborted_at is None and len(out.outputs[0].token_ids) >= cuts[i]:
                    aborted_at = time.perf_counter()
                    stream.abort()
            ended = time.perf_counter()
            assert stream.outputs[0].finish_reason == "cancelled", stream.outputs[0].finish_reason
            with lock:
                latencies.append(ended - aborted_at)

    threads = [threading.Thread(target=worker, args=(range(k, len(prompts), concurrency),)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


async def aborts_from_asyncio(llm, SamplingParams, prompts, concurrency: int, rng: random.Random):
    """The same from asyncio tasks (`async for`), with a ticker task measuring the loop's lag; also
    awaits a non-streaming request per task between the streams. Returns (abort latencies, lags)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            lags.append(loop.time() - due)

    latencies: list[float] = []
    cuts = [rng.randrange(1, 64) for _ in prompts]

    async def worker(indices):
        for i in indices:
            stream = llm.generate_async(prompts[i], SamplingParams(max_tokens=900, ignore_eos=True), streaming=True)
            aborted_at = None
            async for out in stream:
                if aborted_at is None and len(out.outputs[0].token_ids) >= cuts[i]:
                    aborted_at = time.perf_counter()
                    stream.abort()
            latencies.append(time.perf_counter() - aborted_at)
            await llm.generate_async(prompts[i], SamplingParams(max_tokens=8, ignore_eos=True))

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(worker(range(k, len(prompts), concurrency)) for k in range(concurrency)))
    stop.set()
    await tick
    return latencies, lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="new")
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', or a checkpoint path")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from jaxllm import SamplingParams

    rng = random.Random(args.seed)
    started = time.perf_counter()
    llm = make_llm(args.model, max(16, args.concurrency * 2))
    load_s = time.perf_counter() - started
    prompts = prompts_for(llm, args.requests, rng)
    # Warm-up: the shapes the runs visit (a decode of every batch size up to the concurrency).
    aborts_from_threads(llm, SamplingParams, prompts[: args.concurrency * 2], args.concurrency, rng)
    asyncio.run(aborts_from_asyncio(llm, SamplingParams, prompts[: args.concurrency * 2], args.concurrency, rng))

    thread_latencies = aborts_from_threads(llm, SamplingParams, prompts, args.concurrency, rng)
    async_latencies, lags = asyncio.run(aborts_from_asyncio(llm, SamplingParams, prompts, args.concurrency, rng))
    llm.shutdown()

    def ms(x: float) -> str:
        return f"{x * 1e3:8.1f}"

    rows = [("abort, threads", thread_latencies), ("abort, asyncio", async_latencies), ("asyncio loop lag", lags)]
    print(f"\n{args.label}: {args.model}, {args.requests} streaming requests, {args.concurrency} at a time "
          f"(LLM() {load_s:.1f} s)")  # fmt: skip
    print(f"{'':18} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    result = {"label": args.label, "model": args.model, "jaxllm": sys.modules["jaxllm"].__file__}
    for name, values in rows:
        print(f"{name:18} {len(values):6d} {ms(statistics.median(values))} {ms(percentile(values, 95))} "
              f"{ms(percentile(values, 99))} {ms(max(values))}")  # fmt: skip
        result[name] = {"p50_ms": statistics.median(values) * 1e3, "p95_ms": percentile(values, 95) * 1e3,
                        "p99_ms": percentile(values, 99) * 1e3, "max_ms": max(values) * 1e3}  # fmt: skip
    print_result(result)


if __name__ == "__main__":
    main()
