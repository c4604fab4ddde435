"""The KV page allocator (plain Python, no JAX).

Pages are the blocks of the paged KV cache; page 0 is the null page that padding writes into and
is never handed out. Pages are reference-counted: parallel samples of one prompt (n > 1) share the
prompt's full pages (`share_prefix`), and with block reuse on, requests share cached pages of a
common prefix (`match_prefix`, then `allocate(..., cached=...)`).

With reuse on, a page whose tokens are all computed is registered in the `PrefixCache` under its
chained hash (`register_computed`). When its last holder frees it, a registered page stays cached
and becomes *evictable* rather than free; `num_free_blocks` counts both kinds, and `allocate`
takes plain free pages first, then evicts (lowest retention priority, least recently released).
A sequence reuses at most floor((num_tokens - 1) / page_size) pages, so at least its last token
is computed (the step needs its logits) and no shared page is ever written.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Sequence as Seq

from jaxllm.engine.prefix_cache import PrefixCache, cache_namespace, page_hash, page_retention, root_hash
from jaxllm.engine.sequence import Sequence


class BlockManager:
    """Pages of the KV cache: reference counts, the free list and (reuse on) the prefix cache.

    Args:
      num_blocks: pages in the cache, the null page 0 included.
      block_size: tokens per page.
      enable_reuse: keep full pages cached for requests with the same prefix (KvCacheConfig.enable_block_reuse).
      clock: seconds, monotonic; times retention durations (injectable for tests).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = True,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: collections.deque[int] = collections.deque(range(1, num_blocks))
        self.cache = PrefixCache(clock) if enable_reuse else None
        # Cumulative counters (get_stats kvCacheStats).
        self.num_new = 0  # pages taken from the free list or evicted (allocNewBlocks)
        self.num_reused = 0  # page references taken from the cache or a sibling sample (reusedBlocks)
        self.num_missed = 0  # pages of admitted sequences the cache did not have (missedBlocks)
        self.num_evicted = 0  # cached pages evicted to make room

    @property
    def enable_reuse(self) -> bool:
        return self.cache is not None

    @property
    def num_free_blocks(self) -> int:
        """Pages an allocation may take: plain free pages plus evictable cached ones."""
        return len(self.free_blocks) + (self.cache.num_evictable if self.cache is not None else 0)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        """reused / (reused + missed) since start (cacheHitRate); 0 before any admission."""
        total = self.num_reused + self.num_missed
        return self.num_reused / total if total else 0.0

    # ---- prefix matching --------------------------------------------------------------------
    def page_hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """Hashes of `seq`'s first `num_pages` full pages (extends `seq.page_hashes` as needed)."""
        hashes, size = seq.page_hashes, self.block_size
        num_pages = min(num_pages, seq.num_tokens // size)
        if len(hashes) < num_pages:
            parent = hashes[-1] if hashes else root_hash(cache_namespace(seq.request))
            for i in range(len(hashes), num_pages):
                parent = page_hash(parent, seq.token_ids[i * size : (i + 1) * size])
                hashes.append(parent)
        return hashes[:num_pages]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding `seq`'s leading full pages, at most floor((num_tokens - 1) / page_size)
        of them; [] when reuse is off, `seq` already holds pages, or its request needs every prompt
        token's logits. Changes nothing: pass the result to `blocks_needed` and `allocate`."""
        if self.cache is None or seq.block_table or seq.request.needs_prompt_logits:
            return []
        pages = []
        for block_hash in self.page_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            page = self.cache.lookup(block_hash)
            if page is None:
                break
            pages.append(page)
        return pages

    # ---- allocation -------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] = ()) -> int:
        """Free pages `seq` takes to hold its computed tokens plus `num_new_tokens` more: new pages,
        plus the pages of `cached` (from match_prefix, reused first) that are evictable now."""
        held = len(seq.block_table) + len(cached)
        total = -(-(seq.num_computed + len(cached) * self.block_size + num_new_tokens) // self.block_size)
        taken = sum(1 for page in cached if self.cache.is_evictable(page)) if cached else 0
        return max(0, total - held) + taken

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] = ()) -> None:
        """Grow `seq`'s block table to cover `num_new_tokens` more tokens, first with the `cached`
        pages of its prefix (from match_prefix, when it holds none: they count as computed)."""
        needed = self.blocks_needed(seq, num_new_tokens, cached)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV pages: need {needed}, {self.num_free_blocks} free")
        if not seq.block_table:  # an admission: count the prefix pages found and missed
            self.num_missed += -(-seq.num_tokens // self.block_size) - len(cached)
        for page in cached:
            if self.ref_counts[page] == 0:
                self.cache.acquire(page)
            self.ref_counts[page] += 1
            seq.block_table.append(page)
        if cached:
            seq.num_computed = len(cached) * self.block_size
            seq.num_registered_pages = len(cached)
            self.num_reused += len(cached)
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        for _ in range(total - len(seq.block_table)):
            if self.free_blocks:
                page = self.free_blocks.popleft()
            else:
                page = self.cache.evict()
                self.num_evicted += 1
            self.ref_counts[page] = 1
            seq.block_table.append(page)
            self.num_new += 1

    def share_prefix(self, source: Sequence, target: Sequence, num_tokens: int) -> int:
        """Give `target` (which holds no pages) the full pages of `source` covering up to `num_tokens`
        tokens; returns how many tokens `target` now has computed."""
        if target.block_table:
            raise RuntimeError("share_prefix needs a target without pages")
        num_full = min(num_tokens, source.num_computed) // self.block_size
        blocks = source.block_table[:num_full]
        for block in blocks:
            self.ref_counts[block] += 1
        target.block_table = list(blocks)
        target.num_registered_pages = len(blocks)
        self.num_reused += len(blocks)
        return len(blocks) * self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Register `seq`'s pages whose tokens are now all computed in the prefix cache (a page that
        duplicates one already cached stays unregistered and frees as a plain page)."""
        full = seq.num_computed // self.block_size
        if self.cache is None or full <= seq.num_registered_pages:
            return
        hashes = self.page_hashes(seq, full)
        for i in range(seq.num_registered_pages, full):
            self.cache.register(seq.block_table[i], hashes[i])
        seq.num_registered_pages = full

    def free(self, seq: Sequence) -> None:
        """Release every page of `seq` (shared pages stay until their last holder frees them). A
        cached page becomes evictable with the retention `seq`'s request gives it; the last page
        goes first, so a prefix's tail is evicted before its head."""
        request = seq.request
        for index in range(len(seq.block_table) - 1, -1, -1):
            block = seq.block_table[index]
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"page {block} freed more often than it was held")
            if self.ref_counts[block] > 0:
                continue
            if self.cache is not None and self.cache.is_cached(block):
                start, end = index * self.block_size, (index + 1) * self.block_size
                priority, seconds = page_retention(request.retention, seq.num_prompt_tokens, start, end)
                self.cache.release(block, priority, seconds)
            else:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered_pages = 0

    def clear_cache(self) -> None:
        """Forget every cached hash (after the KV cache was rebuilt): evictable pages become plain free
        pages, and pages still held free as plain pages."""
        if self.cache is not None:
            self.free_blocks.extend(self.cache.clear())
