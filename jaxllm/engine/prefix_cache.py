"""Prefix caching: which full KV pages hold which tokens, and which cached page to evict next (plain Python).

A full page is identified by a chained hash: SHA-256 of its parent page's hash and its token ids,
where the first page's parent is a root digest of the request's *namespace* (`cache_namespace`:
the cache salt and the adapter ids, everything besides the tokens that changes the K/V). Two pages
with equal hashes hold equal K/V, so a request whose leading pages hash alike can use the cached
pages instead of computing them. The hash is cryptographic on purpose: matching trusts digest
equality alone, and the salt's isolation must not be breakable by crafted collisions.

`PrefixCache` maps hashes to pages and keeps the cached pages no sequence holds (evictable) in
eviction order: lowest retention priority first, least recently released first among equals. A
page's priority comes from the request that released it last (`page_retention`, TensorRT-LLM's
KvCacheRetentionConfig); a priority given for a duration falls back to the default that long
after the release. Reference counts and the plain free list stay in the BlockManager.
"""

from __future__ import annotations

import array
import datetime
import hashlib
import heapq
import json
import math
import time
from typing import Any, Callable, Optional

DEFAULT_RETENTION_PRIORITY = 35  # TensorRT-LLM's default; llm_args.RETENTION_PRIORITY_DEFAULT


def cache_namespace(request: Any) -> bytes:
    """What besides the tokens decides a request's K/V: its cache salt, LoRA adapter and prompt adapter.

    Pages are shared only between requests with equal namespaces. Adapters are read getattr-safe,
    so a request type without them (or with None) has no adapter in its namespace.
    """
    lora = getattr(request, "lora_request", None)
    prompt_adapter = getattr(request, "prompt_adapter_request", None)
    key = {
        "salt": getattr(request, "cache_salt", None),
        "lora": getattr(lora, "lora_int_id", None) if lora is not None else None,
        "prompt_adapter": getattr(prompt_adapter, "prompt_adapter_id", None) if prompt_adapter is not None else None,
    }
    return json.dumps(key, sort_keys=True).encode()


def root_hash(namespace: bytes) -> bytes:
    """The parent hash of a sequence's first page."""
    return hashlib.sha256(b"jaxllm-kv-root\0" + namespace).digest()


def page_hash(parent: bytes, token_ids) -> bytes:
    """Hash of a full page: its parent page's hash and its tokens."""
    return hashlib.sha256(parent + array.array("q", token_ids).tobytes()).digest()


def _seconds(duration) -> Optional[float]:
    """A retention duration (timedelta, milliseconds or None = forever) in seconds."""
    if duration is None:
        return None
    if isinstance(duration, datetime.timedelta):
        return duration.total_seconds()
    return float(duration) / 1e3


def page_retention(retention: Any, num_prompt_tokens: int, start: int, end: int) -> tuple[int, Optional[float]]:
    """(priority, seconds it lasts or None) of the page holding tokens [start, end) of a sequence.

    Each token has a priority: a prompt token that of the token range covering it (the default 35
    outside every range), a generated token `decode_retention_priority`. The page takes the highest
    of its tokens' priorities, with that rule's duration (the longest, if several rules tie).
    Token ranges apply to the prompt only: the part of a range past the prompt's end, or a range
    that starts past it, has no effect, so one config can serve prompts of any length.

    Args:
      retention: a KvCacheRetentionConfig, or None (every page gets the default, for ever).
      num_prompt_tokens: the sequence's prompt length.
      start, end: the page's token positions.
    """
    if retention is None:
        return DEFAULT_RETENTION_PRIORITY, None
    rules: list[tuple[int, Optional[float]]] = []
    prompt_end = min(end, num_prompt_tokens)
    if start < prompt_end:
        covered = 0
        for r in retention.token_range_retention_configs:
            lo = max(start, r.token_start)
            hi = min(prompt_end, num_prompt_tokens if r.token_end is None else r.token_end)
            if lo < hi:
                covered += hi - lo  # ranges are disjoint (KvCacheRetentionConfig checks)
                rules.append((r.priority, _seconds(r.duration_ms)))
        if covered < prompt_end - start:
            rules.append((DEFAULT_RETENTION_PRIORITY, None))
    if end > num_prompt_tokens:
        rules.append((retention.decode_retention_priority, _seconds(retention.decode_duration_ms)))
    return max(rules, key=lambda rule: (rule[0], math.inf if rule[1] is None else rule[1]))


class PrefixCache:
    """Cached full pages by hash, and the evictable ones (no holder) in eviction order.

    Eviction order is a heap of (priority, release tick, page); an entry is live while it matches
    `_evictable[page]`, so taking a page back or re-keying it leaves a stale entry that `evict`
    skips (and `_compact` drops once they pile up). Pages whose priority lapses sit in a second
    heap by expiry time and are re-keyed to the default priority, keeping their release tick, when
    their time has come.

    Args:
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._evictable: dict[int, tuple[int, int]] = {}  # page -> live key (priority, release tick)
        self._heap: list[tuple[int, int, int]] = []  # (priority, release tick, page)
        self._expiries: list[tuple[float, int, int]] = []  # (time the priority lapses, release tick, page)
        self._tick = 0

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Pages with a registered hash, held or evictable."""
        return len(self._hash_of)

    def lookup(self, block_hash: bytes) -> Optional[int]:
        return self._page_of.get(block_hash)

    def is_cached(self, page: int) -> bool:
        return page in self._hash_of

    def is_evictable(self, page: int) -> bool:
        return page in self._evictable

    def register(self, page: int, block_hash: bytes) -> bool:
        """Record that `page` (fully computed, held) holds `block_hash`. Returns False, and records
        nothing, when another page already holds that hash: the first copy stays the cached one."""
        if block_hash in self._page_of:
            return self._page_of[block_hash] == page
        if page in self._hash_of:
            raise RuntimeError(f"page {page} is already cached under another hash")
        self._page_of[block_hash] = page
        self._hash_of[page] = block_hash
        return True

    def release(self, page: int, priority: int, duration_s: Optional[float]) -> None:
        """The last holder let go of cached `page`: it becomes evictable at `priority`, which falls
        back to the default `duration_s` seconds from now (None: never)."""
        self._tick += 1
        self._evictable[page] = (priority, self._tick)
        heapq.heappush(self._heap, (priority, self._tick, page))
        if duration_s is not None and priority != DEFAULT_RETENTION_PRIORITY:
            heapq.heappush(self._expiries, (self.clock() + duration_s, self._tick, page))
        self._compact()

    def acquire(self, page: int) -> None:
        """An evictable page is taken back into use (a prefix hit): it can no longer be evicted."""
        del self._evictable[page]

    def evict(self) -> int:
        """Drop the next page in eviction order from the cache and return it (now a plain free page)."""
        return self.evict_entry()[0]

    def evict_entry(self, keep: frozenset[int] | set[int] = frozenset()) -> tuple[int, bytes, int]:
        """Drop the next page in eviction order, other than those in `keep`, from the cache:
        (page, its hash, its priority)."""
        self._apply_expiries()
        kept = []
        try:
            while self._heap:
                priority, tick, page = heapq.heappop(self._heap)
                if self._evictable.get(page) != (priority, tick):
                    continue  # stale
                if page in keep:
                    kept.append((priority, tick, page))
                    continue
                del self._evictable[page]
                block_hash = self._hash_of.pop(page)
                del self._page_of[block_hash]
                return page, block_hash, priority
        finally:
            for entry in kept:
                heapq.heappush(self._heap, entry)
        raise RuntimeError("no evictable page")

    def hashes(self) -> list[bytes]:
        """Every cached page's hash."""
        return list(self._page_of)

    def hash_of(self, page: int) -> Optional[bytes]:
        return self._hash_of.get(page)

    def priority_of(self, page: int) -> Optional[int]:
        """The current eviction priority of an evictable page (None when it is not evictable)."""
        self._apply_expiries()
        key = self._evictable.get(page)
        return None if key is None else key[0]

    def clear(self) -> list[int]:
        """Forget every hash; returns the pages that were evictable (now plain free pages)."""
        pages = list(self._evictable)
        self._page_of.clear()
        self._hash_of.clear()
        self._evictable.clear()
        self._heap.clear()
        self._expiries.clear()
        return pages

    def _apply_expiries(self) -> None:
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, tick, page = heapq.heappop(self._expiries)
            key = self._evictable.get(page)
            if key is not None and key[1] == tick:  # still the same release
                self._evictable[page] = (DEFAULT_RETENTION_PRIORITY, tick)
                heapq.heappush(self._heap, (DEFAULT_RETENTION_PRIORITY, tick, page))

    def _compact(self) -> None:
        """Rebuild the heaps without stale entries once these outnumber the live ones."""
        if len(self._heap) > 2 * len(self._evictable) + 64:
            self._heap = [(p, t, page) for page, (p, t) in self._evictable.items()]
            heapq.heapify(self._heap)
        if len(self._expiries) > 2 * len(self._evictable) + 64:
            live = self._evictable
            self._expiries = [e for e in self._expiries if live.get(e[2], (None, None))[1] == e[1]]
            heapq.heapify(self._expiries)
