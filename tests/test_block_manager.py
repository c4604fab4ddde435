"""The page allocator and the prefix cache as plain Python: hashing, matching, eviction, retention, stats."""

import datetime
import types

import pytest

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.prefix_cache import PrefixCache, cache_namespace, page_retention
from jaxllm.engine.sequence import Request, Sequence
from jaxllm.llm_args import KvCacheRetentionConfig, TokenRangeRetentionConfig
from jaxllm.sampling_params import SamplingParams

PAGE = 4


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_seq(tokens, seq_id=0, **request_fields) -> Sequence:
    request = Request(request_id=seq_id, prompt=None, prompt_token_ids=list(tokens), params=SamplingParams(),
                      output=None, **request_fields)  # fmt: skip
    seq = Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens), seed=0)
    request.sequences.append(seq)
    return seq


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does: reuse the cached prefix, allocate the rest, then 'compute' it all."""
    cached = bm.match_prefix(seq)
    n = seq.num_uncomputed - len(cached) * PAGE
    assert bm.can_allocate(bm.blocks_needed(seq, n, cached))
    bm.allocate(seq, n, cached)
    seq.num_computed += n
    bm.register_computed(seq)
    return cached


def run(bm: BlockManager, tokens, seq_id=0, **request_fields) -> list[int]:
    """Admit, compute and free a sequence; returns the pages it reused."""
    seq = make_seq(tokens, seq_id, **request_fields)
    cached = admit(bm, seq)
    bm.free(seq)
    return cached


def test_same_prefix_reuses_full_pages_and_always_computes_the_last_token():
    bm = BlockManager(16, PAGE)
    first = make_seq(range(10))
    admit(bm, first)
    pages = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == bm.num_usable_blocks  # cached pages count as free
    assert bm.cache.num_evictable == 2 and len(bm.free_blocks) == 13  # 2 full pages cached, the partial one freed
    second = make_seq(list(range(8)) + [50, 51, 52])
    assert admit(bm, second) == pages[:2]
    assert second.num_computed == 11 and second.block_table[:2] == pages[:2]
    # A prompt of exactly two pages reuses only the first: its last token must be computed.
    exact = make_seq(range(8), seq_id=1)
    assert bm.match_prefix(exact) == pages[:1]
    assert bm.blocks_needed(exact, 4, pages[:1]) == 1  # page 0 is held by `second`, so only the new page
    # Shared pages are reference-counted: freeing one holder keeps them in use.
    admit(bm, exact)
    bm.free(second)
    assert bm.ref_counts[pages[0]] == 1 and not bm.cache.is_evictable(pages[0])
    bm.free(exact)
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_the_hash_chains_pages_so_a_page_matches_only_after_its_whole_prefix():
    bm = BlockManager(16, PAGE)
    run(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert run(bm, [0, 2, 3, 4, 5, 6, 7, 8, 9], seq_id=1) == []  # second page equal, first differs
    assert len(run(bm, [1, 2, 3, 4, 5, 6, 7, 8, 1], seq_id=2)) == 2


def test_namespace_isolates_salts_and_adapters():
    bm = BlockManager(32, PAGE)
    prompt = list(range(9))
    run(bm, prompt, cache_salt="alice")
    assert run(bm, prompt, seq_id=1, cache_salt="bob") == []
    assert len(run(bm, prompt, seq_id=2, cache_salt="alice")) == 2
    assert run(bm, prompt, seq_id=3) == []  # no salt is its own namespace
    lora = types.SimpleNamespace(lora_int_id=7)
    run(bm, prompt, seq_id=4, lora_request=lora)
    assert run(bm, prompt, seq_id=5, lora_request=types.SimpleNamespace(lora_int_id=8)) == []
    assert len(run(bm, prompt, seq_id=6, lora_request=types.SimpleNamespace(lora_int_id=7))) == 2
    adapter = types.SimpleNamespace(prompt_adapter_id=3)
    assert run(bm, prompt, seq_id=7, lora_request=lora, prompt_adapter_request=adapter) == []
    plain = make_seq(prompt).request
    assert cache_namespace(plain) != cache_namespace(make_seq(prompt, cache_salt="x").request)
    assert cache_namespace(object()) == cache_namespace(plain)  # getattr-safe: no salt, no adapters


def test_eviction_is_lru_and_takes_plain_free_pages_first():
    bm = BlockManager(7, PAGE)  # 6 usable pages
    run(bm, range(0, 9), seq_id=0)  # caches 2 pages (released tail first)
    run(bm, range(100, 109), seq_id=1)  # caches 2 more, released later
    assert bm.cache.num_evictable == 4 and len(bm.free_blocks) == 2
    filler = make_seq(range(200, 212), seq_id=2)  # 3 pages: 2 plain free + 1 evicted
    admit(bm, filler)
    assert bm.num_new == 3 + 3 + 3
    # The least recently released page went: the tail of the first prompt; its head is still cached.
    assert len(bm.match_prefix(make_seq(range(0, 9)))) == 1
    assert len(bm.match_prefix(make_seq(range(100, 109)))) == 2
    bm.free(filler)
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_a_held_cached_page_is_never_evicted():
    bm = BlockManager(5, PAGE)  # 4 usable
    run(bm, range(9))
    holder = make_seq(range(9), seq_id=1)
    assert len(admit(bm, holder)) == 2  # takes both cached pages back, allocates one
    other = make_seq(range(50, 54), seq_id=2)
    assert bm.blocks_needed(other, 4) == 1 and bm.can_allocate(1)
    admit(bm, other)
    assert not bm.can_allocate(1)
    assert set(holder.block_table).isdisjoint(other.block_table)


def test_retention_priority_outlives_lru_and_durations_lapse():
    clock = Clock()
    bm = BlockManager(7, PAGE, clock=clock)  # 6 usable
    keep = KvCacheRetentionConfig([TokenRangeRetentionConfig(0, None, priority=90, duration_ms=5000)])
    run(bm, range(0, 9), seq_id=0, retention=keep)  # released first, but priority 90 for 5 s
    run(bm, range(100, 109), seq_id=1)  # default priority 35
    filler = make_seq(range(200, 211), seq_id=2)
    admit(bm, filler)  # 3 pages: 2 plain free, 1 evicted: the default-priority tail
    bm.free(filler)
    assert len(run(bm, range(0, 9), seq_id=3, retention=keep)) == 2
    assert len(run(bm, range(100, 109), seq_id=4)) == 1
    # Released again just now at 90; let 5 s pass: back to 35, and the oldest release goes first.
    clock.now += 6.0
    run(bm, range(100, 109), seq_id=5)
    assert bm.cache.priority_of(bm.match_prefix(make_seq(range(0, 9)))[0]) == 35
    for seq_id in range(6, 10):  # four pages, taken from the 2 plain free pages and 2 evictions
        admit(bm, make_seq(range(300 + 10 * seq_id, 304 + 10 * seq_id), seq_id=seq_id))
    assert bm.match_prefix(make_seq(range(0, 9))) == []
    assert len(bm.match_prefix(make_seq(range(100, 109)))) == 2


def test_low_priority_pages_go_before_default_ones_even_when_newer():
    bm = BlockManager(6, PAGE)
    run(bm, range(0, 9), seq_id=0)
    low = KvCacheRetentionConfig([TokenRangeRetentionConfig(0, None, priority=5)])
    run(bm, range(100, 109), seq_id=1, retention=low)
    admit(bm, make_seq(range(200, 212), seq_id=2))  # 1 plain free + 2 evictions
    assert bm.match_prefix(make_seq(range(100, 109))) == []
    assert len(bm.match_prefix(make_seq(range(0, 9)))) == 2


def test_page_retention_rules():
    ranges = [TokenRangeRetentionConfig(0, 6, priority=80, duration_ms=datetime.timedelta(seconds=2)),
              TokenRangeRetentionConfig(6, 8, priority=20), TokenRangeRetentionConfig(12, None, priority=60)]  # fmt: skip
    config = KvCacheRetentionConfig(ranges, decode_retention_priority=50, decode_duration_ms=1500)
    prompt = 14
    assert page_retention(None, prompt, 0, 4) == (35, None)
    assert page_retention(config, prompt, 0, 4) == (80, 2.0)
    assert page_retention(config, prompt, 4, 8) == (80, 2.0)  # the highest of its tokens' priorities
    assert page_retention(config, prompt, 6, 8) == (20, None)  # wholly inside the low range
    assert page_retention(config, prompt, 8, 12) == (35, None)  # no range: the default
    assert page_retention(config, prompt, 12, 16) == (60, None)  # open range to the prompt end, then decode 50
    assert page_retention(config, prompt, 16, 20) == (50, 1.5)  # generated tokens only
    only_low = KvCacheRetentionConfig([TokenRangeRetentionConfig(0, 100, priority=10)], decode_retention_priority=10)
    assert page_retention(only_low, 6, 0, 4) == (10, None)
    assert page_retention(only_low, 6, 4, 8) == (10, None)  # the range's part past the prompt is ignored
    beyond = KvCacheRetentionConfig([TokenRangeRetentionConfig(50, None, priority=99)])
    assert page_retention(beyond, 6, 0, 4) == (35, None)  # a range starting past the prompt has no effect
    ties = KvCacheRetentionConfig([TokenRangeRetentionConfig(0, 2, priority=70, duration_ms=10),
                                   TokenRangeRetentionConfig(2, 4, priority=70)])  # fmt: skip
    assert page_retention(ties, 8, 0, 4) == (70, None)  # equal priorities: the longer duration


def test_reuse_off_frees_pages_plainly():
    bm = BlockManager(8, PAGE, enable_reuse=False)
    run(bm, range(9))
    assert bm.match_prefix(make_seq(range(9))) == [] and len(bm.free_blocks) == bm.num_usable_blocks
    assert bm.num_reused == 0 and bm.num_missed == 3 and bm.hit_rate == 0.0


def test_duplicate_computations_keep_the_first_copy_cached():
    bm = BlockManager(16, PAGE)
    c, d = make_seq(range(50, 59), seq_id=0), make_seq(range(50, 59), seq_id=1)
    for seq in (c, d):  # admitted in the same step: neither found the other's pages
        bm.allocate(seq, 9)
    for seq in (c, d):
        seq.num_computed = 9
        bm.register_computed(seq)
    first_copy = c.block_table[:2]
    free_before = len(bm.free_blocks)
    bm.free(d)
    assert len(bm.free_blocks) == free_before + 3  # d's copies were never cached
    bm.free(c)
    assert bm.match_prefix(make_seq(range(50, 59))) == first_copy


def test_stats_counters_add_up():
    bm = BlockManager(16, PAGE)
    run(bm, range(10))  # 3 pages, all missed
    run(bm, range(10), seq_id=1)  # 2 reused, 1 missed
    assert (bm.num_new, bm.num_reused, bm.num_missed) == (4, 2, 4)
    assert bm.hit_rate == pytest.approx(2 / 6)
    source = make_seq(range(10), seq_id=2)
    admit(bm, source)
    sibling = make_seq(range(10), seq_id=3)
    assert bm.share_prefix(source, sibling, 9) == 8
    assert bm.num_reused == 6 and sibling.num_registered_pages == 2


def test_clear_cache_forgets_every_page():
    bm = BlockManager(16, PAGE)
    run(bm, range(9))
    held = make_seq(range(100, 109), seq_id=1)
    admit(bm, held)
    bm.clear_cache()
    assert bm.cache.num_cached == 0 and bm.cache.num_evictable == 0
    assert bm.match_prefix(make_seq(range(9))) == []
    bm.free(held)  # its pages were forgotten while held: they free plainly
    assert len(bm.free_blocks) == bm.num_usable_blocks


def test_prefix_cache_heaps_stay_bounded():
    cache = PrefixCache(clock=Clock())
    cache.register(1, b"x")
    for _ in range(1000):
        cache.release(1, 90, 1.0)
        cache.acquire(1)
    assert len(cache._heap) < 200 and len(cache._expiries) < 200
    cache.release(1, 90, 1.0)
    assert cache.evict() == 1 and cache.num_cached == 0
