"""KvCacheConfig's TensorRT-LLM fields: the host tier (pages evicted from the device come back for
a later request with the same prefix), KV cache events, partial reuse, attention windows and the
accepted-only fields, each validated."""

import asyncio
import logging

import pytest

from jaxllm import KvCacheConfig, LLM, SamplingParams

PAGE = 8
MAX_SEQ_LEN = 64
PREFIX = list(range(10, 43))  # 33 tokens: four full pages and one token
OTHER = list(range(100, 160))  # 60 tokens: with its 4 outputs, every one of the 8 pages
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True, return_perf_metrics=True)


def _make(tiny_dir, name="llama", **kv) -> LLM:
    config = KvCacheConfig(tokens_per_block=PAGE, max_tokens=MAX_SEQ_LEN, **kv)
    return LLM(model=str(tiny_dir(name)), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
               max_num_tokens=64, max_seq_len=MAX_SEQ_LEN, kv_cache_config=config)  # fmt: skip


@pytest.fixture(scope="module")
def tiered(tiny_dir):
    """Eight device pages, a host tier of 1 MiB, events on; windows given as the default."""
    with _make(tiny_dir, host_cache_size=1 << 20, event_buffer_max_size=1000,
               max_attention_window=[MAX_SEQ_LEN], sink_token_length=0) as llm:  # fmt: skip
        yield llm


def _run(llm, prompt, cache_salt=None):
    """(tokens, kv_cache_metrics, prompt tokens computed) of one greedy request."""
    llm.get_stats()
    out = llm.generate(prompt, GREEDY, use_tqdm=False, cache_salt=cache_salt).outputs[0]
    computed = sum(s["inflightBatchingStats"]["numCtxTokens"] for s in llm.get_stats())
    return out.token_ids, out.request_perf_metrics.kv_cache_metrics, computed


def test_a_prefix_evicted_from_the_device_is_reused_from_the_host_tier(tiered):
    bm = tiered._engine.block_manager
    assert bm.num_usable_blocks == 8 and bm.host.capacity > 8
    first, kv, computed = _run(tiered, PREFIX)
    assert kv.num_reused_blocks == 0 and computed == len(PREFIX)
    _run(tiered, OTHER)  # needs all eight pages: the prefix's four cached pages leave the device
    assert all(bm.cache.lookup(h) is None for h in bm.page_hashes(_seq_like(tiered, PREFIX), 4))
    assert bm.host.num_pages == 4
    again, kv, computed = _run(tiered, PREFIX)
    assert again == first  # the same greedy tokens from the pages copied back
    assert kv.num_reused_blocks == 4 and computed == 1  # only the last prompt token is computed
    assert bm.host.num_onboarded == 4
    assert bm.num_free_blocks == bm.num_usable_blocks


def _seq_like(llm, prompt):
    """A fresh Sequence of `prompt` (for its page hashes)."""
    from jaxllm.engine.sequence import Request, Sequence

    request = Request(request_id=-1, prompt=None, prompt_token_ids=list(prompt), params=SamplingParams(), output=None)
    return Sequence(seq_id=-1, request=request, index=0, token_ids=list(prompt), num_prompt_tokens=len(prompt), seed=0)


def test_kv_cache_events_follow_the_pages(tiered):
    events = tiered.get_kv_cache_events()  # everything since start-up (the test above included)
    assert [e["event_id"] for e in events] == list(range(len(events)))
    assert events[0]["data"] == {"type": "created", "num_blocks_per_cache_level": [8, tiered._engine.block_manager
                                                                                   .host.capacity]}  # fmt: skip
    assert all(e["window_size"] == MAX_SEQ_LEN for e in events)
    stored = [e["data"] for e in events if e["data"]["type"] == "stored"]
    first = stored[0]
    assert first["parent_hash"] is None and len(first["blocks"]) == 4
    assert [t["token_id"] for t in first["blocks"][1]["tokens"]] == PREFIX[PAGE : 2 * PAGE]
    assert all(b["cache_level"] == 0 and b["priority"] == 35 and b["type"] == "stored_block" for b in first["blocks"])
    prefix_hashes = [b["block_hash"] for b in first["blocks"]]
    moves = [(e["data"]["block_hash"], e["data"]["cache_level"]["old_value"], e["data"]["cache_level"]["new_value"])
             for e in events if e["data"]["type"] == "updated"]  # fmt: skip
    assert {h for h, old, new in moves if (old, new) == (0, 1)} >= set(prefix_hashes)  # offloaded
    assert {h for h, old, new in moves if (old, new) == (1, 0)} == set(prefix_hashes)  # onboarded
    assert tiered.get_kv_cache_events(timeout=0) == []

    async def collect():
        tiered.generate([7] * 20, GREEDY, use_tqdm=False)
        return [e async for e in tiered.get_kv_cache_events_async(timeout=1)]

    fresh = asyncio.run(collect())
    assert fresh and fresh[0]["event_id"] == len(events)
    assert any(e["data"]["type"] == "stored" and len(e["data"]["blocks"]) == 2 for e in fresh)


BASE = list(range(200, 220))  # two full pages and four tokens
BRANCH = BASE[:12] + [77, 78, 79, 80, 81]  # the first page, half of the second, then its own


def test_partial_reuse_copies_the_matching_part_of_a_page(tiered):
    bm = tiered._engine.block_manager
    _run(tiered, BASE)
    reference, _, computed = _run(tiered, BRANCH, cache_salt="alone")  # a salt shares nothing
    assert computed == len(BRANCH)
    copies = bm.num_partial_reused
    tokens, kv, computed = _run(tiered, BRANCH)
    assert tokens == reference
    assert kv.num_reused_blocks == 1 and bm.num_partial_reused == copies + 1
    assert computed == len(BRANCH) - PAGE - 4  # the first page reused, four tokens of the second copied
    # The page it copied from is intact: the base prompt still reuses both of its pages.
    again, kv, computed = _run(tiered, BASE)
    assert kv.num_reused_blocks == 2 and computed == 4
    assert bm.num_free_blocks == bm.num_usable_blocks



def test_page_copies_are_batched_and_read_every_source_first(tiered):
    """Partial reuse's copies wait in the runner and go to the devices COPY_BATCH pairs a program,
    before the next dispatch, gather or scatter; a batch reads every source before writing."""
    import numpy as np

    from jaxllm.engine.runner import COPY_BATCH

    runner = tiered._engine.runner
    pages = list(range(1, 8))
    saved = [np.asarray(a) for a in runner.gather_pages(pages)]  # put back at the end (cached prefixes)
    rows_before = np.asarray(runner.token_pages)[pages].copy()
    try:
        for page in (1, 2, 3):
            runner.copy_page(page, page)  # more pairs than one batch: the flush loops
        runner.copy_page(1, 2)
        runner.copy_page(2, 1)  # a swap within one batch
        for _ in range(COPY_BATCH):
            runner.copy_page(3, 4)
        assert len(runner._copies) == COPY_BATCH + 5
        got = [np.asarray(a) for a in runner.gather_pages([1, 2, 4])]  # flushes first
        assert not runner._copies
        for layer, before in zip(got, saved):
            np.testing.assert_array_equal(layer[:, 0], before[:, 1])
            np.testing.assert_array_equal(layer[:, 1], before[:, 0])
            np.testing.assert_array_equal(layer[:, 2], before[:, 2])
        rows = np.asarray(runner.token_pages)
        np.testing.assert_array_equal(rows[[1, 2, 4]], rows_before[[1, 0, 2]])
    finally:
        runner.scatter_pages(pages, saved, [int(t) for t in rows_before.reshape(-1)])

def test_small_event_buffer_keeps_the_newest_and_low_priorities_stay_off_the_host(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxllm"):
        llm = _make(tiny_dir, host_cache_size=1 << 20, secondary_offload_min_priority=35, onboard_blocks=False,
                    event_buffer_max_size=3, enable_partial_reuse=False)  # fmt: skip
    assert "onboard_blocks=False" in caplog.text
    with llm:
        bm = llm._engine.block_manager
        first, _, _ = _run(llm, PREFIX)
        _run(llm, OTHER)
        assert bm.host.num_pages == 0  # priority 35 is not above the minimum: nothing offloaded
        events = llm.get_kv_cache_events()
        assert len(events) == 3 and events[-1]["event_id"] > 3
        assert [e["event_id"] for e in events] == list(range(events[0]["event_id"], events[0]["event_id"] + 3))
        again, kv, computed = _run(llm, PREFIX)
        assert again == first and kv.num_reused_blocks == 0 and computed == len(PREFIX)
        removed = [h for e in llm.get_kv_cache_events() if e["data"]["type"] == "removed"
                   for h in e["data"]["block_hashes"]]  # fmt: skip
        assert removed  # the other prompt's pages made room for the prefix again
        _run(llm, BASE)
        _, kv, computed = _run(llm, BRANCH)  # partial reuse off: the second page is computed
        assert kv.num_reused_blocks == 1 and computed == len(BRANCH) - PAGE and bm.num_partial_reused == 0


def test_model_dependent_fields_are_refused_clearly(tiny_dir):
    with pytest.raises(ValueError, match=r"max_attention_window=\[32\] is invalid for this model \(every layer "
                                         r"attends to all positions.*allowed: None, a window >= max_seq_len=64"):
        _make(tiny_dir, max_attention_window=[32])
    with pytest.raises(ValueError, match=r"max_attention_window=\[6\] is invalid for this model \(its sliding "
                                         r"layers attend to 7 positions"):
        _make(tiny_dir, "mistral", max_attention_window=[6])


@pytest.mark.parametrize("field, value, allowed", [
    ("max_attention_window", [0], "None or a non-empty list of positive ints"),
    ("max_attention_window", 64, "None or a non-empty list of positive ints"),
    ("sink_token_length", 4, "None, 0"),
    ("host_cache_size", -1, "None or an int >= 0"),
    ("onboard_blocks", "yes", "True, False"),
    ("secondary_offload_min_priority", 101, r"None or an int in \[0, 100\]"),
    ("event_buffer_max_size", -5, "an int >= 0"),
    ("enable_partial_reuse", None, "True, False"),
    ("copy_on_partial_reuse", 1, "True, False"),
])  # fmt: skip
def test_bad_values_name_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid; allowed: {allowed}".replace("[0]", r"\[0\]")):
        KvCacheConfig(**{field: value})


def test_defaults_match_trt_llm():
    config = KvCacheConfig()
    assert (config.max_attention_window, config.sink_token_length, config.host_cache_size) == (None, None, None)
    assert config.onboard_blocks and config.enable_partial_reuse and config.copy_on_partial_reuse
    assert config.event_buffer_max_size == 0 and config.secondary_offload_min_priority is None
