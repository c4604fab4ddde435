"""Faults stay contained in the engine: a raising logits processor fails its own request only; aborts
land while a multi-step decode runs; the asyncio path never waits for the engine thread; and a
stress run of mixed requests, aborts and preemption loses nothing and gives back every page."""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time

import numpy as np
import pytest

from jaxllm import KvCacheConfig, LLM, RequestError, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11], [300, 12, 13, 14, 15, 16, 17, 18], [8, 9, 10, 60, 61, 62], [77] * 40,
           [1, 2, 3], list(range(100, 133)), [45, 46], [200, 201, 202, 203, 204], [9] * 3, [150, 151, 152],
           [31, 32, 33, 34], list(range(40, 70)), [19, 18, 17]]  # fmt: skip


def _all_pages_returned(llm: LLM, timeout: float = 10.0) -> bool:
    """Whether every KV page is back in the block manager (free or cached), waiting for the engine
    thread to finish what it is doing."""
    bm = llm._engine.block_manager
    deadline = time.monotonic() + timeout
    while bm.num_free_blocks != bm.num_usable_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    return bm.num_free_blocks == bm.num_usable_blocks


def test_a_raising_logits_processor_fails_only_its_request(tiny_llm):
    llm = tiny_llm("llama")

    def ban_seven(request_id, logits, token_ids, stream, client):
        logits[..., 7] = -np.inf

    def explodes_at_third_token(request_id, logits, token_ids, stream, client):
        if len(token_ids[0]) >= 3 + 3:  # its prompt is 3 tokens
            raise RuntimeError("processor exploded")

    def wrong_shape(request_id, logits, token_ids, stream, client):
        return np.zeros(5)

    def innocent(i):
        return SamplingParams(max_tokens=12, ignore_eos=True, logits_processor=ban_seven if i % 3 == 0 else None)

    reference = llm.generate(PROMPTS, [innocent(i) for i in range(len(PROMPTS))], use_tqdm=False)
    futures = [llm.generate_async(p, innocent(i)) for i, p in enumerate(PROMPTS[:7])]
    raising = llm.generate_async([4, 5, 6], SamplingParams(max_tokens=12, ignore_eos=True,
                                                           logits_processor=[ban_seven, explodes_at_third_token]))
    misshapen = llm.generate_async([4, 5, 6], SamplingParams(max_tokens=12, ignore_eos=True, logits_processor=wrong_shape))
    futures += [llm.generate_async(p, innocent(i + 7)) for i, p in enumerate(PROMPTS[7:])]

    with pytest.raises(RequestError, match="logits_processor .*explodes_at_third_token.* at output token 3") as error:
        raising.result(timeout=60)
    assert isinstance(error.value.__cause__, RuntimeError) and str(error.value.__cause__) == "processor exploded"
    with pytest.raises(RequestError, match=r"returned \(5,\) values for logits of shape \(1, 320\)"):
        misshapen.result(timeout=60)
    for ref, future in zip(reference, futures):
        out = future.result(timeout=60)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids and out.outputs[0].finish_reason == "length"
    assert _all_pages_returned(llm)


def test_an_abort_lands_while_a_multi_step_decode_runs(tiny_dir):
    """An abort resolves the stream at once, not when the multi-step decode in flight (32 decodes in
    one dispatch, beside 8 long sequences) ends; the sequences beside it go on."""
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=9,
             max_num_tokens=1024, max_seq_len=900, num_scheduler_steps=32) as llm:  # fmt: skip
        latencies = []
        for rep in range(6):
            companions = [llm.generate_async([3 + (i * 7 + j) % 300 for j in range(600)],
                                             SamplingParams(max_tokens=250, ignore_eos=True)) for i in range(8)]  # fmt: skip
            stream = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True), streaming=True)
            for out in stream:
                if len(out.outputs[0].token_ids) > 64:
                    time.sleep(0.01 * rep)  # at different points of the dispatch in flight
                    aborted_at = time.perf_counter()
                    stream.abort()
                    break
            result = stream.result(timeout=60)
            latencies.append(time.perf_counter() - aborted_at)
            assert result.outputs[0].finish_reason == "cancelled"
            for future in companions[:4]:
                future.abort()
            for future in companions[4:]:
                assert len(future.result(timeout=120).outputs[0].token_ids) == 250
        stats = llm.get_stats()
        dispatches = [s["iterLatencyMS"] / 1e3 for s in stats if s["inflightBatchingStats"]["avgNumDecodedTokensPerIter"] > 1]
        assert dispatches, "no multi-step decode ran"
        # Before, an abort waited for the dispatch in flight: half of one on average.
        assert statistics.median(latencies) < 0.2 * statistics.median(dispatches), (latencies, dispatches)
        assert _all_pages_returned(llm)


def test_the_event_loop_never_waits_for_the_engine_thread(tiny_llm):
    """While the engine thread is held up (a logits processor that waits), asyncio code submits,
    streams and aborts without blocking its loop; once it is released everything resolves."""
    llm = tiny_llm("llama")
    release = threading.Event()

    def hold(request_id, logits, token_ids, stream, client):
        release.wait(10)

    async def main():
        lags = []
        stop = asyncio.Event()

        async def ticker():
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                due = loop.time() + 0.001
                await asyncio.sleep(0.001)
                lags.append(loop.time() - due)

        tick = asyncio.create_task(ticker())
        held = llm.generate_async([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True, logits_processor=hold))
        await asyncio.sleep(0.2)  # the engine thread is inside `hold` now
        stream = llm.generate_async([4, 5, 6], SamplingParams(max_tokens=500, ignore_eos=True), streaming=True)
        early = llm.generate_async([7, 8, 9], SamplingParams(max_tokens=500, ignore_eos=True))
        early.abort()  # before the engine has seen it
        plain = llm.generate_async([7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True))
        await asyncio.sleep(1.0)
        asyncio.get_running_loop().call_later(0.5, release.set)
        seen = 0
        async for out in stream:
            seen = len(out.outputs[0].token_ids)
            if seen >= 3 and not stream.aborted():
                stream.abort()
        results = await asyncio.gather(held, early, plain)
        stop.set()
        await tick
        return lags, stream, results

    lags, stream, (held, early, plain) = asyncio.run(main())
    release.set()
    assert max(lags) < 1.0, max(lags)  # waiting for the engine would have taken 1.5 s or more
    assert stream.outputs[0].finish_reason == "cancelled" and early.outputs[0].finish_reason == "cancelled"
    assert len(held.outputs[0].token_ids) == 2 and len(plain.outputs[0].token_ids) == 4
    assert _all_pages_returned(llm)
