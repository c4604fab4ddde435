"""The host tier of the prefix cache (KvCacheConfig.host_cache_size): full pages evicted from the
device cache are copied to host memory, and copied back into a device page when a later request's
prefix needs them ("onboarding"; TensorRT-LLM's secondary offload).

A page leaves the device only when the block manager evicts it to hand its memory out. Its K/V
(every layer) is gathered right then, as a device copy enqueued before any later dispatch can
write the page, and fetched to numpy once the copy is done (`_settle`, at the next offload or
onboarding), so eviction never waits for the devices. Entries are kept by page digest, least
recently offloaded dropped first beyond `capacity_bytes`; `secondary_offload_min_priority` keeps
pages of low retention priority out (TensorRT-LLM: only priority > the minimum is offloaded).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass(eq=False)
class HostPage:
    values: list  # [k0, v0, k1, v1, ...], each [num_kv_heads, 1, page_size, head_dim]: device copies, then numpy
    token_ids: tuple[int, ...]
    parent: bytes  # its parent page's digest (the namespace root for a sequence's first page)
    priority: int  # its retention priority when it left the device


class HostPageCache:
    """Evicted pages in host memory, by digest.

    Args:
      capacity_bytes: host_cache_size.
      page_bytes: the host bytes of one page (K and V of every layer).
      gather: pages -> their [k0, v0, ...] device copies (ModelRunner.gather_pages).
      scatter: (pages, values, token ids) -> writes them into device pages (ModelRunner.scatter_pages).
      min_priority: only pages of a retention priority above it are kept (None: all).
    """

    def __init__(self, capacity_bytes: int, page_bytes: int, gather: Callable, scatter: Callable,
                 min_priority: Optional[int] = None):  # fmt: skip
        if capacity_bytes < page_bytes:
            raise ValueError(f"kv_cache_config.host_cache_size={capacity_bytes} is invalid; allowed: 0, None or at "
                             f"least one page ({page_bytes} bytes with this model and tokens_per_block)")  # fmt: skip
        self.capacity = capacity_bytes // page_bytes  # pages
        self.page_bytes = page_bytes
        self._gather, self._scatter = gather, scatter
        self.min_priority = min_priority
        self._pages: collections.OrderedDict[bytes, HostPage] = collections.OrderedDict()
        self._unsettled: list[HostPage] = []
        self.num_offloaded = 0
        self.num_onboarded = 0

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._pages

    def offload(self, page: int, digest: bytes, parent: bytes, token_ids: Sequence[int], priority: int) -> list[bytes]:
        """Copy device `page` (holding `digest`) to the host, unless its priority is too low.
        Returns the digests dropped from the host to make room (and `digest` itself when it was
        not kept)."""
        if self.min_priority is not None and priority <= self.min_priority:
            return [digest]
        self._settle()
        entry = HostPage(self._gather([page]), tuple(token_ids), parent, priority)
        for value in entry.values:
            value.copy_to_host_async()
        self._unsettled.append(entry)
        self._pages[digest] = entry
        self._pages.move_to_end(digest)
        self.num_offloaded += 1
        dropped = []
        while len(self._pages) > self.capacity:
            old, _ = self._pages.popitem(last=False)
            dropped.append(old)
        return dropped

    def onboard(self, digest: bytes, page: int) -> HostPage:
        """Write the host copy of `digest` into device `page` (enqueued before any later dispatch)
        and drop it from the host."""
        entry = self._pages.pop(digest)
        if entry in self._unsettled:
            self._unsettled.remove(entry)
        self._scatter([page], entry.values, list(entry.token_ids))
        self.num_onboarded += 1
        return entry

    def _settle(self) -> None:
        """Fetch finished device copies to numpy (their device memory is then freed)."""
        pending = []
        for entry in self._unsettled:
            if all(v.is_ready() for v in entry.values):
                entry.values = [np.asarray(v) for v in entry.values]
            else:
                pending.append(entry)
        self._unsettled = pending

    def clear(self) -> list[bytes]:
        digests = list(self._pages)
        self._pages.clear()
        self._unsettled.clear()
        return digests
