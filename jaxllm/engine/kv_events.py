"""KV cache events: what `LLM.get_kv_cache_events` returns (TensorRT-LLM's KVCacheEvent, as its
serializer writes them), recorded in a bounded buffer when KvCacheConfig.event_buffer_max_size > 0.

Each event is {"event_id", "data", "window_size"}; `data` is one of

    {"type": "created", "num_blocks_per_cache_level": [device pages, host pages]}
    {"type": "stored", "parent_hash": int | None, "blocks": [{"type": "stored_block", "block_hash",
        "tokens": [{"type": "unique_token", "token_id", "token_extra_id"}], "lora_id", "cache_level",
        "priority"}]}
    {"type": "removed", "block_hashes": [int]}
    {"type": "updated", "block_hash": int, "cache_level": {"type": "event_diff", "new_value",
        "old_value"} | None, "priority": {...} | None}

A block hash is the first 8 bytes of the page's chained SHA-256 digest (prefix_cache.py) as an
unsigned int; a chain's first page has parent_hash None. Cache level 0 is the device, 1 the host
tier (KvCacheConfig.host_cache_size). The engine thread records; any thread drains. When the
buffer is full the oldest events are dropped (event ids stay consecutive in what remains).
"""

from __future__ import annotations

import collections
import threading
from typing import Optional, Sequence


def event_hash(digest: bytes) -> int:
    """The block hash an event carries for a page's digest."""
    return int.from_bytes(digest[:8], "little")


class KVCacheEvents:
    """The bounded event buffer.

    Args:
      max_size: the most events kept until drained (KvCacheConfig.event_buffer_max_size).
      window_size: the attention window the pages serve (jaxllm keeps one pool: max_seq_len).
    """

    def __init__(self, max_size: int, window_size: int):
        self._events: collections.deque[dict] = collections.deque(maxlen=max_size)
        self._lock = threading.Lock()
        self._next_id = 0
        self.window_size = window_size

    def _add(self, data: dict) -> None:
        with self._lock:
            self._events.append({"event_id": self._next_id, "data": data, "window_size": self.window_size})
            self._next_id += 1

    def take(self) -> list[dict]:
        """Every event recorded since the last call, oldest first."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def created(self, num_blocks_per_cache_level: list[int]) -> None:
        self._add({"type": "created", "num_blocks_per_cache_level": list(num_blocks_per_cache_level)})

    def stored(self, parent: Optional[bytes], blocks: Sequence[tuple[bytes, Sequence[int], int]],
               lora_id: Optional[int], cache_level: int = 0) -> None:  # fmt: skip
        """Pages joined the cache: `blocks` are (digest, token ids, retention priority), a chain
        under `parent` (None: they start a sequence)."""
        self._add({
            "type": "stored",
            "parent_hash": None if parent is None else event_hash(parent),
            "blocks": [{"type": "stored_block", "block_hash": event_hash(digest),
                        "tokens": [{"type": "unique_token", "token_id": int(t), "token_extra_id": 0} for t in tokens],
                        "lora_id": lora_id, "cache_level": cache_level, "priority": priority}
                       for digest, tokens, priority in blocks],
        })  # fmt: skip

    def removed(self, digests: Sequence[bytes]) -> None:
        if digests:
            self._add({"type": "removed", "block_hashes": [event_hash(d) for d in digests]})

    def updated(self, digest: bytes, cache_level: Optional[tuple[int, int]] = None,
                priority: Optional[tuple[int, int]] = None) -> None:  # fmt: skip
        """A cached page moved between levels, or its priority changed: (old, new) values."""

        def diff(change):
            return None if change is None else {"type": "event_diff", "new_value": change[1], "old_value": change[0]}

        self._add({"type": "updated", "block_hash": event_hash(digest), "cache_level": diff(cache_level),
                   "priority": diff(priority)})  # fmt: skip
