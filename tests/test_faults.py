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
    misshapen = llm.generate_async([4, 5, 6], SamplingParams(max_tokens=12, ignore_eos=True,
                                                             logits_processor=wrong_shape))
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


@pytest.mark.parametrize("fail_at", ["dispatch", "read"])
def test_a_failing_model_step_fails_its_requests_and_the_engine_goes_on(tiny_dir, fail_at):
    """A model step that raises, at its dispatch or when its outputs are read, with the overlap
    scheduler's next step dispatched ahead of that read: the requests of the failed step (and of
    the one in flight) fail with the error, the rest finish with the tokens they would have had
    (recomputed), every page comes back, and the engine serves what comes next."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=24, num_scheduler_steps=1) as llm:  # fmt: skip
        reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        runner = llm._engine.runner
        calls = {"n": 0}
        dispatch = runner.dispatch

        class Boom(RuntimeError):
            pass

        class Failing:
            def __init__(self, pending):
                self.pending = pending

            def __getattr__(self, name):
                return getattr(self.pending, name)

            def result(self):
                raise Boom("the device step failed")

        def flaky(requests, decode_steps=1, after=None):
            calls["n"] += 1
            if calls["n"] == 6 and fail_at == "dispatch":
                raise Boom("the device step failed")
            pending = dispatch(requests, decode_steps, after)
            return Failing(pending) if calls["n"] == 6 else pending

        runner.dispatch = flaky
        futures = [llm.generate_async(p, params) for p in PROMPTS]
        failed = 0
        for ref, future in zip(reference, futures):
            try:
                out = future.result(timeout=120)
            except RequestError as e:
                assert isinstance(e.__cause__, Boom), e
                failed += 1
                continue
            assert out.outputs[0].token_ids == ref
        runner.dispatch = dispatch
        assert 1 <= failed < len(PROMPTS)
        assert _all_pages_returned(llm)
        after = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in after] == reference[:3]


def test_an_abort_lands_while_a_multi_step_decode_runs(tiny_dir):
    """An abort resolves the stream at once, not when the multi-step decode in flight (32 decodes in
    one dispatch, beside 8 long sequences) ends; the sequences beside it go on."""
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=9,
             max_num_tokens=1024, max_seq_len=900, num_scheduler_steps=32) as llm:  # fmt: skip
        latencies = []
        for rep in range(3):
            long_prompts = [[3 + (i * 7 + j) % 300 for j in range(600)] for i in range(8)]
            companions = [llm.generate_async(p, SamplingParams(max_tokens=250, ignore_eos=True)) for p in long_prompts]
            stream = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True), streaming=True)
            for out in stream:
                if len(out.outputs[0].token_ids) > 64:
                    time.sleep(0.02 * rep)  # at different points of the dispatch in flight
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
        dispatches = [s["dispatch"]["latencyMS"] / 1e3 for s in stats
                      if s["dispatch"]["numSteps"] > 1]  # multi-step decodes (one entry per iteration of each)
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


def char_tokenizer(vocab_size: int = 320):
    """A real (transformers) tokenizer for the tiny checkpoints: one character per token, ids 0-2
    the pad, BOS and EOS tokens, then printable ASCII, then Latin characters up to `vocab_size`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = [chr(c) for c in range(0x20, 0x7F)]
    chars += [chr(0x100 + i) for i in range(vocab_size - len(specials) - len(chars))]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _stress_request(rng: random.Random) -> tuple:
    """(prompt, SamplingParams, streaming, abort_after_s or None) of one mixed request."""
    if rng.random() < 0.5:
        prompt = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz,.") for _ in range(rng.randrange(1, 40)))
    else:
        prompt = [rng.randrange(3, 320) for _ in range(rng.randrange(1, 40))]
    sampled = rng.random() < 0.5
    n = rng.choice([1, 2, 3]) if sampled else 1  # greedy decoding gives one sequence
    params = SamplingParams(max_tokens=rng.randrange(1, 48), n=n, ignore_eos=rng.random() < 0.7,
                            temperature=0.9 if sampled else 0.0, seed=rng.randrange(1 << 30) if sampled else None,
                            stop=rng.choice([None, None, None, ["e"], ["ab", "z"]]))  # fmt: skip
    streaming = rng.random() < 0.4
    abort_after = rng.uniform(0.0, 0.3) if rng.random() < 0.2 else None
    return prompt, params, streaming, abort_after


def test_stress_mixed_requests_from_threads_with_aborts_under_kv_pressure(tiny_dir):
    """160 mixed requests (prompt lengths, n up to 3, streaming, stop strings, sampled and greedy)
    from 4 threads, a fifth of them aborted at random times, on a KV cache that holds a fraction of
    them (preemption): every future resolves, each finished request has exactly the tokens it has
    alone (an aborted one a prefix of them), and every page goes back to the block manager."""
    rng = random.Random(19)
    specs = [_stress_request(rng) for _ in range(160)]
    with LLM(model=str(tiny_dir("llama")), tokenizer=char_tokenizer(), dtype="float32", max_batch_size=8,
             max_num_tokens=64, max_seq_len=96, kv_cache_config=KvCacheConfig(max_tokens=192, tokens_per_block=8),
             num_scheduler_steps=4) as llm:  # fmt: skip
        results: dict[int, object] = {}
        errors: list[BaseException] = []

        def client(indices):
            try:
                futures = {}
                for i in indices:
                    prompt, params, streaming, abort_after = specs[i]
                    futures[i] = llm.generate_async(prompt, params, streaming=streaming)
                    if abort_after is not None:
                        threading.Timer(abort_after, futures[i].abort).start()
                for i, future in futures.items():
                    if specs[i][2]:
                        for _ in future:  # a stream ends with the request, aborted or not
                            pass
                    results[i] = future.result(timeout=120)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(range(k, len(specs), 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        stats = llm.get_stats()
        assert not errors, errors
        assert sorted(results) == list(range(len(specs)))
        assert sum(s["inflightBatchingStats"]["numPausedRequests"] for s in stats) > 0, "nothing was preempted"
        assert _all_pages_returned(llm)

        # Each request alone (batch composition and preemption do not change a request's tokens).
        reference = llm.generate([s[0] for s in specs], [s[1] for s in specs], use_tqdm=False)
        num_aborted = 0
        for i, ref in enumerate(reference):
            out = results[i]
            assert out.finished and len(out.outputs) == specs[i][1].n, i
            for got, want in zip(out.outputs, ref.outputs):
                if got.finish_reason == "cancelled":
                    num_aborted += 1
                    # A prefix of the tokens alone, which leave out a stop string's tokens: an abort
                    # may have come after some of them.
                    common = min(len(got.token_ids), len(want.token_ids))
                    assert got.token_ids[:common] == want.token_ids[:common], i
                    assert len(got.token_ids) <= len(want.token_ids) or isinstance(want.stop_reason, str), i
                else:
                    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text,
                                                                            want.finish_reason), i  # fmt: skip
        assert num_aborted > 0, "no abort landed before its request finished"
        assert _all_pages_returned(llm)
