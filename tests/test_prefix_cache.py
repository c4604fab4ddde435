"""KV-cache reuse through the LLM: same outputs with reuse on and off, stats, salts, retention, recovery, bad input."""

import time

import jax
import numpy as np
import pytest

from jaxllm import KvCacheConfig, KvCacheRetentionConfig, LLM, RequestError, SamplingParams
from jaxllm.engine import scheduler
from jaxllm.llm_args import TokenRangeRetentionConfig

PAGE = 16
rng = np.random.default_rng(7)
PREFIX = [int(t) for t in rng.integers(3, 300, size=70)]  # a long shared "system prompt"
PROMPTS = [
    PREFIX + [11, 12, 13],
    PREFIX[:64],  # exactly four pages: the last page is recomputed
    PREFIX[:64] + [5],
    PREFIX[:48],  # exactly three pages
    PREFIX[:20] + [9, 9, 9],
    [int(t) for t in rng.integers(3, 300, size=37)],
]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
SAMPLES = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=6, ignore_eos=True, logprobs=1)


def _make(tiny_dir, reuse: bool, **kv) -> LLM:
    kv_config = KvCacheConfig(tokens_per_block=PAGE, enable_block_reuse=reuse, **kv)
    args = dict(max_batch_size=8, max_num_tokens=64) if kv else dict(max_batch_size=8, max_num_tokens=128)
    if kv:
        args["max_seq_len"] = kv["max_tokens"]
    return LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, kv_cache_config=kv_config,
               **args)  # fmt: skip


@pytest.fixture(scope="module")
def reuse_on(tiny_dir):
    with _make(tiny_dir, True) as llm:
        yield llm


@pytest.fixture(scope="module")
def reuse_off(tiny_dir):
    with _make(tiny_dir, False) as llm:
        yield llm


def _kv_stats(llm) -> dict:
    """kvCacheStats after everything so far (its counters are cumulative)."""
    stats = llm.get_stats()
    assert stats, "no iterations since the last call"
    return stats[-1]["kvCacheStats"]


def _workload(llm) -> list:
    """Prefix first, then requests that reuse it, parallel samples, and everything again."""
    outs = [llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)]
    outs += llm.generate(PROMPTS[1:], GREEDY, use_tqdm=False)
    outs.append(llm.generate(PROMPTS[1], SAMPLES, use_tqdm=False))
    outs += llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return outs


def _assert_same(outs, reference):
    assert len(outs) == len(reference)
    for out, ref in zip(outs, reference):
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]
        for o, r in zip(out.outputs, ref.outputs):
            got = [{t: lp.logprob for t, lp in step.items()} for step in o.logprobs]
            want = [{t: lp.logprob for t, lp in step.items()} for step in r.logprobs]
            assert [sorted(g) for g in got] == [sorted(w) for w in want]
            np.testing.assert_allclose([g[t] for g in got for t in sorted(g)], [w[t] for w in want for t in sorted(w)],
                                       rtol=1e-5, atol=1e-5)  # fmt: skip


def test_reuse_gives_the_same_outputs_and_counts_its_hits(reuse_on, reuse_off):
    reuse_on.get_stats(), reuse_off.get_stats()
    reference = _workload(reuse_off)
    outs = _workload(reuse_on)
    _assert_same(outs, reference)
    on, off = _kv_stats(reuse_on), _kv_stats(reuse_off)
    assert on["reusedBlocks"] > 20 and 0 < on["cacheHitRate"] < 1
    assert on["allocTotalBlocks"] == on["allocNewBlocks"] + on["reusedBlocks"]
    assert on["allocNewBlocks"] < off["allocNewBlocks"]
    assert on["freeNumBlocks"] + on["usedNumBlocks"] == on["maxNumBlocks"] and on["tokensPerBlock"] == PAGE
    # Reuse off: only the parallel samples share the prompt's pages (2 samples x 3 full pages).
    assert off["reusedBlocks"] == 6 and off["missedBlocks"] > 0


def test_a_second_request_with_the_same_prefix_reuses_its_pages(reuse_on, reuse_off):
    prompt = PREFIX[::-1] + [7]  # 71 tokens: 4 full pages
    for llm, expected in ((reuse_on, 4), (reuse_off, 0)):
        llm.generate(prompt, GREEDY, use_tqdm=False)
        before = _kv_stats(llm)
        llm.generate(prompt[:-1] + [8, 8], GREEDY, use_tqdm=False)
        after = _kv_stats(llm)
        assert after["reusedBlocks"] - before["reusedBlocks"] == expected
        assert after["missedBlocks"] - before["missedBlocks"] == 5 - expected


def test_outputs_under_a_tiny_kv_budget_with_preemption_and_eviction(tiny_dir, reuse_off, monkeypatch):
    # Requests of known length (ignore_eos) that preempt: MAX_UTILIZATION's projection of their growth
    # (scheduler.SureGrowth) would hold them back instead, so it is off here.
    monkeypatch.setattr(scheduler, "PROJECT_SURE_GROWTH", False)
    prompts = [PREFIX[:40 + 3 * i] + [i + 1] * 3 for i in range(6)] + [PREFIX[:48]]
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=1)
    reference = [reuse_off.generate(prompts[0], params, use_tqdm=False)]
    reference += reuse_off.generate(prompts[1:], params, use_tqdm=False)
    reference += reuse_off.generate(prompts[::-1], params, use_tqdm=False)[::-1]
    with _make(tiny_dir, True, max_tokens=160) as small:  # 10 pages; each sequence needs up to 5
        outs = [small.generate(prompts[0], params, use_tqdm=False)]
        outs += small.generate(prompts[1:], params, use_tqdm=False)
        outs += small.generate(prompts[::-1], params, use_tqdm=False)[::-1]
        stats = small.get_stats()
        bm = small._engine.block_manager
        assert sum(s["inflightBatchingStats"]["numPausedRequests"] for s in stats) > 0, "nothing was preempted"
        assert bm.num_evicted > 0 and bm.num_reused > 0
        assert bm.num_free_blocks == bm.num_usable_blocks
    _assert_same(outs, reference)


def test_prompt_logprobs_and_context_logits_compute_the_whole_prompt(reuse_on, reuse_off):
    prompt = PREFIX[2:60]
    params = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2, return_context_logits=True)
    outs = []
    for llm in (reuse_on, reuse_off):
        llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)  # cache the prompt's pages
        outs.append(llm.generate(prompt, params, use_tqdm=False))
    on, off = outs
    assert len(on.outputs[0].prompt_logprobs) == len(prompt) and on.context_logits.shape[0] == len(prompt)
    np.testing.assert_allclose(on.context_logits, off.context_logits, rtol=1e-5, atol=1e-5)
    assert [sorted(p) for p in on.outputs[0].prompt_logprobs[1:]] == [sorted(p) for p in off.outputs[0].prompt_logprobs[1:]]


def test_salts_isolate_requests(reuse_on):
    prompt = PREFIX[5:60]  # 3 full pages
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    bm = reuse_on._engine.block_manager

    def reused(**kwargs):
        before = bm.num_reused
        out = reuse_on.generate(prompt, params, use_tqdm=False, **kwargs)
        return bm.num_reused - before, out.outputs[0].token_ids

    first, tokens = reused(cache_salt="tenant-a")
    assert first == 0
    assert reused(cache_salt="tenant-b") == (0, tokens)
    assert reused() == (0, tokens)  # no salt is a namespace of its own
    assert reused(cache_salt="tenant-a") == (3, tokens)
    outs = reuse_on.generate([prompt, prompt], params, use_tqdm=False, cache_salt=["tenant-b", "tenant-c"])
    assert [o.outputs[0].token_ids for o in outs] == [tokens, tokens]


def test_high_retention_pages_outlive_default_ones(tiny_dir):
    high = KvCacheRetentionConfig([TokenRangeRetentionConfig(0, None, priority=90)])
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    a, b = PREFIX[:24], PREFIX[30:54]  # 3 full pages each; the generated token is never computed
    filler = [int(t) for t in rng.integers(3, 300, size=100)]  # 13 pages
    kv = KvCacheConfig(max_tokens=128, tokens_per_block=8)  # 16 pages
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=64, max_seq_len=128, kv_cache_config=kv) as llm:  # fmt: skip
        llm.generate(a, one, use_tqdm=False, kv_cache_retention_config=high)
        llm.generate(b, one, use_tqdm=False)
        # 10 free pages and 6 cached: the filler evicts 3. Plain LRU would take a's (released first);
        # priority 90 keeps them, so b's go.
        llm.generate(filler, one, use_tqdm=False)
        bm = llm._engine.block_manager
        assert bm.num_evicted == 3
        before = bm.num_reused
        llm.generate(a, one, use_tqdm=False, kv_cache_retention_config=high)
        assert bm.num_reused - before == 2  # a's prefix is still cached
        llm.generate(b, one, use_tqdm=False)
        assert bm.num_reused - before == 2  # b's was evicted


def test_a_failed_step_forgets_every_cached_page(reuse_on):
    prompt = PREFIX[1:50]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    expected = reuse_on.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
    bm = reuse_on._engine.block_manager
    assert bm.cache.num_cached > 0

    # A real failure of the model step: the KV cache's device buffers are gone (as after a failed
    # step that consumed its donated buffers). (A raising logits processor fails only its request.)
    for array in jax.tree.leaves(reuse_on._engine.runner.kv_cache):
        array.delete()
    bad = reuse_on.generate_async(prompt, SamplingParams(max_tokens=3))
    with pytest.raises(RequestError, match="deleted"):
        bad.result(timeout=60)
    deadline = time.monotonic() + 10  # the engine thread forgets the cache just after failing the request
    while bm.cache.num_cached and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bm.cache.num_cached == 0 and bm.num_free_blocks == bm.num_usable_blocks
    assert reuse_on.generate(prompt, params, use_tqdm=False).outputs[0].token_ids == expected


def test_bad_cache_salts_and_retention_configs_are_rejected(reuse_on):
    ok = SamplingParams(max_tokens=1)
    cases = [
        (lambda: reuse_on.generate([1, 2], ok, cache_salt=""), ValueError, r"cache_salt='' is invalid; allowed: a non-empty str"),
        (lambda: reuse_on.generate([[1], [2]], ok, cache_salt=["a", ""]), ValueError, r"cache_salt\[1\]=''"),
        (lambda: reuse_on.generate_async([1, 2], ok, cache_salt=""), ValueError, "cache_salt=''"),
        (lambda: reuse_on.generate([1, 2], ok, cache_salt=b"a"), TypeError, "cache_salt must be a str"),
        (lambda: reuse_on.generate([1, 2], ok, kv_cache_retention_config={"priority": 90}), TypeError,
         "kv_cache_retention_config must be a KvCacheRetentionConfig"),
        (lambda: KvCacheRetentionConfig([TokenRangeRetentionConfig(0, 10), TokenRangeRetentionConfig(5, 20)]),
         ValueError, "overlap"),
        (lambda: KvCacheRetentionConfig([TokenRangeRetentionConfig(0, None), TokenRangeRetentionConfig(5, 20)]),
         ValueError, "overlap"),
        (lambda: KvCacheRetentionConfig([(0, 10, 90)]), TypeError, "TokenRangeRetentionConfig"),
        (lambda: TokenRangeRetentionConfig(0, 10, priority=101), ValueError, r"priority=101 is invalid; allowed: an int in \[0, 100\]"),
        (lambda: TokenRangeRetentionConfig(4, 4), ValueError, "token_end=4"),
        (lambda: TokenRangeRetentionConfig(0, 4, duration_ms=-5), ValueError, "duration_ms=-5"),
        (lambda: KvCacheRetentionConfig(decode_retention_priority=-1), ValueError, "decode_retention_priority=-1"),
        (lambda: KvCacheRetentionConfig(decode_duration_ms="1s"), TypeError, "decode_duration_ms"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # A range past the prompt's end is clipped away, not an error (one config serves prompts of any length).
    beyond = KvCacheRetentionConfig([TokenRangeRetentionConfig(500, None, priority=90)])
    assert reuse_on.generate([1, 2, 3], ok, use_tqdm=False, kv_cache_retention_config=beyond).outputs[0].token_ids
