"""Iteration and request statistics: what `LLM.get_stats` returns (TensorRT-LLM's keys) and a
request's timing metrics (`return_perf_metrics`)."""

from __future__ import annotations

import collections
import resource
import threading
import time

import jax

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.scheduler import ScheduledStep, Scheduler
from jaxllm.engine.sequence import Request

STATS_HISTORY = 1000  # iteration stats kept for get_stats


class IterationStats:
    """One entry per engine iteration, kept (up to STATS_HISTORY) until a caller takes them; the
    engine thread records, any thread takes."""

    def __init__(self):
        self._items: collections.deque[dict] = collections.deque(maxlen=STATS_HISTORY)
        self._lock = threading.Lock()
        self.iteration = 0
        self.max_active = 0  # the most sequences running after any iteration

    def take(self) -> list[dict]:
        """The stats recorded since the last call."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def record(self, scheduler: Scheduler, scheduled: ScheduledStep, ctx: list, started: float, decoded: float) -> None:
        """One iteration's stats; `ctx`: the (sequence, tokens) items that were prefill chunks;
        `started`: its perf_counter at the start; `decoded`: tokens each generation request took on
        average (more than 1 in a multi-step decode)."""
        self.iteration += 1
        self.max_active = max(self.max_active, len(scheduler.running))
        try:
            mem = jax.local_devices()[0].memory_stats() or {}
        except Exception:
            mem = {}
        stats = {
            "iter": self.iteration,
            "iterLatencyMS": (time.perf_counter() - started) * 1e3,
            "gpuMemUsage": int(mem.get("bytes_in_use", 0)),
            "cpuMemUsage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "numActiveRequests": len({s.request.request_id for s in scheduler.running}),
            "numQueuedRequests": len({s.request.request_id for s in scheduler.waiting}),
            "maxNumActiveRequests": scheduler.config.max_batch_size,
            "numCompletedRequests": 0,
            "kvCacheStats": kv_cache_stats(scheduler.block_manager),
            "inflightBatchingStats": {
                "numScheduledRequests": len(scheduled.items),
                "numContextRequests": len(ctx),
                "numGenRequests": len(scheduled.items) - len(ctx),
                "numCtxTokens": sum(n for _, n in ctx),
                "numPausedRequests": len(scheduled.preempted),
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": decoded,
            },
        }
        with self._lock:
            self._items.append(stats)


def kv_cache_stats(bm: BlockManager) -> dict:
    """The block manager's page counts and cumulative counters (get_stats kvCacheStats)."""
    return {
        "maxNumBlocks": bm.num_usable_blocks,
        "freeNumBlocks": bm.num_free_blocks,
        "usedNumBlocks": bm.num_used_blocks,
        "tokensPerBlock": bm.block_size,
        "allocTotalBlocks": bm.num_new + bm.num_reused,
        "allocNewBlocks": bm.num_new,
        "reusedBlocks": bm.num_reused,
        "missedBlocks": bm.num_missed,
        "cacheHitRate": bm.hit_rate,
    }


def perf_metrics(request: Request) -> dict:
    """A finished request's timing metrics (RequestOutput's perf_metrics)."""
    return {"timing_metrics": {"arrival_time": request.arrival_time,
                               "first_scheduled_time": request.first_scheduled_time,
                               "first_token_time": request.first_token_time,
                               "last_token_time": request.last_token_time}}  # fmt: skip
