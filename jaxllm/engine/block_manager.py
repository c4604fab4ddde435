"""The KV page allocator (plain Python, no JAX).

Pages are the blocks of the paged KV cache; page 0 is the null page that padding writes into and
is never handed out. Pages are reference-counted: parallel samples of one prompt (n > 1) share the
prompt's full pages (`share_prefix`), and with block reuse on, requests share cached pages of a
common prefix (`match_prefix`, then `allocate(..., cached=...)`).

With reuse on, a page whose tokens are all computed is registered in the `PrefixCache` under its
chained hash (`register_computed`). Three KvCacheConfig extras hang off that: partial reuse
(`match_partial`: the leading tokens of a partly matching cached page, copied), the host tier
(an evicted page goes to `HostPageCache`, and `onboard` brings a waiting prompt's pages back) and
the KV cache events (`KVCacheEvents`: stored, removed, moved between levels). When its last holder frees it, a registered page stays cached
and becomes *evictable* rather than free; `num_free_blocks` counts both kinds, and `allocate`
takes plain free pages first, then evicts (lowest retention priority, least recently released).
A sequence reuses at most floor((num_tokens - 1) / page_size) pages, so at least its last token
is computed (the step needs its logits) and no shared page is ever written.
"""

from __future__ import annotations

import array
import collections
import time
from typing import Callable, Optional, Sequence as Seq

from jaxllm.engine.host_cache import HostPageCache
from jaxllm.engine.kv_events import KVCacheEvents
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
                 clock: Callable[[], float] = time.monotonic, host: Optional[HostPageCache] = None,
                 events: Optional[KVCacheEvents] = None,
                 copy_page: Optional[Callable[[int, int], None]] = None):  # fmt: skip
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: collections.deque[int] = collections.deque(range(1, num_blocks))
        self.cache = PrefixCache(clock) if enable_reuse else None
        self.host = host if enable_reuse else None  # the host tier (host_cache.py), or None
        self.events = events if enable_reuse else None  # KV cache events (kv_events.py), or None
        # Partial reuse (KvCacheConfig.enable_partial_reuse): copy_page(source, target)
        # copies a device page; None: whole pages only.
        self.copy_page = copy_page if enable_reuse else None
        self._track = self.host is not None or self.events is not None or self.copy_page is not None
        # A cached page's (parent hash, token ids), and the cached pages under each (parent hash,
        # first token), kept for the host tier, the events and partial reuse (a page that shares no
        # leading token gives nothing: every prompt's first page has the same parent).
        self._page_info: dict[int, tuple[bytes, array.array]] = {}
        self._children: dict[tuple[bytes, int], set[int]] = collections.defaultdict(set)
        self.num_partial_reused = 0  # pages admissions took a leading part of (copied)
        if self.events is not None:
            self.events.created([self.num_usable_blocks, self.host.capacity if self.host is not None else 0])
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

    def match_partial(self, seq: Sequence, cached: Seq[int]) -> Optional[tuple[int, int]]:
        """Partial reuse: after `seq`'s cached full pages (`cached`, from match_prefix), the cached
        page under the same parent whose leading tokens match the most of `seq`'s next ones, as
        (page, tokens it gives); None when none matches, partial reuse is off, or `seq` may take no
        more (its last token is always computed). Changes nothing: pass it to `blocks_needed` and
        `allocate`, which copy that page's leading tokens' K/V into a page of `seq`'s own."""
        if self.copy_page is None or seq.block_table or seq.request.needs_prompt_logits:
            return None
        size, index = self.block_size, len(cached)
        limit = min(size, seq.num_tokens - 1 - index * size)
        if limit <= 0:
            return None
        parent = self.page_hashes(seq, index)[-1] if index else root_hash(cache_namespace(seq.request))
        wanted = seq.token_ids[index * size : index * size + limit]
        best, best_len = None, 0
        for page in self._children.get((parent, wanted[0]), ()):
            tokens = self._page_info[page][1]
            n = 0
            while n < limit and tokens[n] == wanted[n]:
                n += 1
            if n > best_len:
                best, best_len = page, n
        return (best, best_len) if best is not None else None

    # ---- allocation -------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] = (),
                      partial: Optional[tuple[int, int]] = None) -> int:  # fmt: skip
        """Free pages `seq` takes to hold its computed tokens plus `num_new_tokens` more: new pages,
        plus the pages of `cached` (from match_prefix, reused first) that are evictable now, plus a
        `partial` source page (match_partial) that is evictable (it may not be evicted for the copy)."""
        held = len(seq.block_table) + len(cached)
        reused = len(cached) * self.block_size + (partial[1] if partial else 0)
        total = -(-(seq.num_computed + reused + num_new_tokens) // self.block_size)
        taken = sum(1 for page in cached if self.cache.is_evictable(page)) if cached else 0
        if partial is not None and self.cache.is_evictable(partial[0]):
            taken += 1
        return max(0, total - held) + taken

    def holds(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `seq`'s pages already hold its computed tokens and `num_new_tokens` more (then
        `blocks_needed` is 0 and `allocate` adds nothing)."""
        return seq.num_computed + num_new_tokens <= len(seq.block_table) * self.block_size

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] = (),
                 partial: Optional[tuple[int, int]] = None) -> None:  # fmt: skip
        """Grow `seq`'s block table to cover `num_new_tokens` more tokens, first with the `cached`
        pages of its prefix (from match_prefix, when it holds none: they count as computed), then
        a copy of the `partial` page (match_partial) whose leading tokens count as computed."""
        needed = self.blocks_needed(seq, num_new_tokens, cached, partial)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV pages: need {needed}, {self.num_free_blocks} free")
        request = seq.request
        if not seq.block_table:  # an admission: count the prefix pages found and missed
            missed = -(-seq.num_tokens // self.block_size) - len(cached)
            self.num_missed += missed
            request.num_missed_blocks += missed
        for page in cached:
            if self.ref_counts[page] == 0:
                self.cache.acquire(page)
            self.ref_counts[page] += 1
            seq.block_table.append(page)
        if cached:
            seq.num_computed = len(cached) * self.block_size
            seq.num_registered_pages = len(cached)
            self.num_reused += len(cached)
            request.num_reused_blocks += len(cached)
        if partial is not None:
            source, num_tokens = partial
            page = self.free_blocks.popleft() if self.free_blocks else self._evict(keep={source})
            self.copy_page(source, page)  # on the devices before the step that uses it
            self.ref_counts[page] = 1
            seq.block_table.append(page)
            seq.num_computed += num_tokens
            self.num_new += 1
            request.num_new_blocks += 1
            self.num_partial_reused += 1
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        for _ in range(total - len(seq.block_table)):
            page = self.free_blocks.popleft() if self.free_blocks else self._evict()
            self.ref_counts[page] = 1
            seq.block_table.append(page)
            self.num_new += 1
            request.num_new_blocks += 1

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
        target.request.num_reused_blocks += len(blocks)
        return len(blocks) * self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Register `seq`'s pages whose tokens are now all computed in the prefix cache (a page that
        duplicates one already cached stays unregistered and frees as a plain page)."""
        full = seq.num_computed // self.block_size
        if self.cache is None or full <= seq.num_registered_pages:
            return
        hashes = self.page_hashes(seq, full)
        stored = []
        for i in range(seq.num_registered_pages, full):
            page = seq.block_table[i]
            new = self.cache.hash_of(page) is None
            if self.cache.register(page, hashes[i]) and new and self._track:
                tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                parent = hashes[i - 1] if i else root_hash(cache_namespace(seq.request))
                self._remember(page, parent, tokens)
                stored.append((i, hashes[i], tokens))
        seq.num_registered_pages = full
        if self.events is not None and stored:
            self._store_events(seq, stored, hashes)

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
        pages, and pages still held free as plain pages. The host tier's copies stay valid."""
        if self.cache is not None:
            if self.events is not None:
                self.events.removed(self.cache.hashes())
            self._page_info.clear()
            self._children.clear()
            self.free_blocks.extend(self.cache.clear())

    # ---- the events, the host tier, partial reuse -----------------------------------------------
    def _remember(self, page: int, parent: bytes, tokens: Seq[int]) -> None:
        self._page_info[page] = (parent, array.array("q", tokens))  # 8 bytes a token, for big caches
        if tokens:
            self._children[(parent, tokens[0])].add(page)

    def _forget(self, page: int) -> Optional[tuple[bytes, array.array]]:
        info = self._page_info.pop(page, None)
        if info is not None and info[1]:
            key = (info[0], info[1][0])
            children = self._children[key]
            children.discard(page)
            if not children:
                del self._children[key]
        return info

    def _store_events(self, seq: Sequence, stored: list, hashes: list[bytes]) -> None:
        """`stored` event(s) for newly registered pages, (index, hash, tokens): one per run of
        consecutive pages, under the run's parent (None for a sequence's first page)."""
        request = seq.request
        lora = request.lora_request.lora_int_id if request.lora_request is not None else None
        run: list = []
        for n, (i, digest, tokens) in enumerate(stored):
            start = i * self.block_size
            priority, _ = page_retention(request.retention, seq.num_prompt_tokens, start, start + self.block_size)
            run.append((digest, tokens, priority))
            if n + 1 == len(stored) or stored[n + 1][0] != i + 1:
                first = i - len(run) + 1
                self.events.stored(hashes[first - 1] if first else None, run, lora)
                run = []

    def _evict(self, keep: frozenset[int] | set[int] = frozenset()) -> int:
        """Evict the next cached page (not one of `keep`) to hand it out: with a host tier its K/V
        is copied there first (the event says it moved to level 1), else it is gone."""
        page, digest, priority = self.cache.evict_entry(keep)
        self.num_evicted += 1
        info = self._forget(page)
        if self.host is not None and info is not None:
            dropped = self.host.offload(page, digest, info[0], info[1], priority)
            if self.events is not None:
                if digest not in dropped:
                    self.events.updated(digest, cache_level=(0, 1))
                self.events.removed(dropped)
        elif self.events is not None:
            self.events.removed([digest])
        return page

    def onboard(self, seq: Sequence) -> int:
        """Bring back from the host tier the pages of `seq`'s prefix that the device cache lacks
        right after its cached run (at most floor((num_tokens - 1) / page_size) pages in all): each
        into a free page (or an evicted one outside the run), cached and evictable again, so that
        `match_prefix` finds it. Called before admission; returns the pages brought back."""
        if (self.host is None or not self.host.num_pages or seq.block_table
                or seq.request.needs_prompt_logits):  # fmt: skip
            return 0
        hashes = self.page_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        run: list[int] = []
        for digest in hashes:
            page = self.cache.lookup(digest)
            if page is None:
                break
            run.append(page)
        keep = set(run)
        brought = 0
        for digest in hashes[len(run) :]:
            if digest not in self.host:
                break
            if self.free_blocks:
                page = self.free_blocks.popleft()
            elif self.cache.num_evictable > sum(1 for p in keep if self.cache.is_evictable(p)):
                page = self._evict(keep)
                if digest not in self.host:  # the host dropped it to make room for the page just evicted
                    self.free_blocks.appendleft(page)
                    break
            else:
                break
            entry = self.host.onboard(digest, page)
            self.cache.register(page, digest)
            self.cache.release(page, entry.priority, None)
            self._remember(page, entry.parent, entry.token_ids)
            if self.events is not None:
                self.events.updated(digest, cache_level=(1, 0))
            keep.add(page)
            brought += 1
        return brought
