"""Adapters read from disk once and kept in host memory (plain Python, thread-safe).

`generate` resolves each request's adapter here, in the caller's thread, so that a bad adapter
raises there and the engine only ever sees adapters that loaded. The cache keeps the `capacity`
most recently used adapters; a request holds its own reference to its adapter until it finishes,
so eviction never takes weights from under a queued or running request.

An adapter's integer id names one directory for the LLM's lifetime (the device slots and KV-cache
reuse key on the id): a second directory under a used id is refused.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Generic, TypeVar

Adapter = TypeVar("Adapter")


class AdapterCache(Generic[Adapter]):
    """LRU cache of loaded adapters keyed by their integer id.

    Args:
      kind: what the adapters are, for messages ('LoRA', 'prompt adapter').
      capacity: adapters kept once no request needs them (max_cpu_loras).
      load: (path, adapter id) -> the loaded adapter; raises ValueError for a bad one.
    """

    def __init__(self, kind: str, capacity: int, load: Callable[[str, int], Adapter]):
        self.kind = kind
        self.capacity = capacity
        self._load = load
        self._entries: collections.OrderedDict[int, Adapter] = collections.OrderedDict()
        self._paths: dict[int, str] = {}  # every id ever loaded -> its directory
        self._lock = threading.Lock()
        self.num_loads = 0  # reads from disk

    def get(self, adapter_id: int, path: str, name: str = "") -> Adapter:
        """The adapter with this id, loaded from `path` unless cached."""
        real = os.path.realpath(path)
        with self._lock:
            known = self._paths.get(adapter_id)
            if known is not None and known != real:
                raise ValueError(
                    f"{self.kind} id {adapter_id} ({name!r}) names {path}, but this LLM already serves {known} under "
                    f"id {adapter_id}; allowed: one directory per id (use a new id for a different adapter)"
                )
            adapter = self._entries.get(adapter_id)
            if adapter is not None:
                self._entries.move_to_end(adapter_id)
                return adapter
            adapter = self._load(path, adapter_id)
            self.num_loads += 1
            self._paths[adapter_id] = real
            self._entries[adapter_id] = adapter
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return adapter

    def __contains__(self, adapter_id: int) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
