"""Iteration and request statistics: what `LLM.get_stats` returns (TensorRT-LLM's keys, with
`requestStats` under `enable_iter_req_stats`) and a request's perf metrics (`return_perf_metrics`).

An *iteration* is one token step of the running sequences, as in TensorRT-LLM. A multi-step
decode computes up to `num_scheduler_steps` of them in one
dispatch; its entry is expanded into one per iteration that produced a token: iteration k of a
dispatch holds the sequences that took their k-th token of it, and a request completes in the
iteration of its last token. The dispatch's time is split evenly over its iterations, and each
entry names its dispatch (`dispatch`: id, numSteps = decodes per row it ran, latencyMS), jaxllm's
own key.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import resource
import threading
import time

import jax

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.scheduler import ScheduledStep, Scheduler
from jaxllm.engine.sequence import Request, Sequence
from jaxllm.outputs import KvCacheMetrics, RequestPerfMetrics, TimingMetrics

STATS_HISTORY = 1000  # iteration stats kept for get_stats (iter_stats_max_iterations=None)

# RequestStats.stage (TensorRT-LLM's RequestStage names).
QUEUED, CONTEXT, GENERATION, COMPLETE = "QUEUED", "CONTEXT_IN_PROGRESS", "GENERATION_IN_PROGRESS", "GENERATION_COMPLETE"


class IterationStats:
    """One entry per engine iteration, kept (up to `max_iterations`) until a caller takes them; the
    engine thread records, any thread takes.

    Args:
      max_iterations: the most iteration entries kept (iter_stats_max_iterations; None: 1000).
      request_stats: add each iteration's per-request statistics (enable_iter_req_stats).
      request_stats_max_iterations: the most recent iterations that keep their per-request
        statistics (None: as many as their entries).
    """

    def __init__(self, max_iterations: int | None = None, request_stats: bool = False,
                 request_stats_max_iterations: int | None = None):  # fmt: skip
        kept = STATS_HISTORY if max_iterations is None else max_iterations
        self._items: collections.deque[dict] = collections.deque(maxlen=kept)
        self.request_stats = request_stats
        # (entry, its requestStats list): older entries give theirs up once this is full.
        with_requests = kept if request_stats_max_iterations is None else min(kept, request_stats_max_iterations)
        self._with_requests: collections.deque[tuple[dict, list]] = collections.deque(maxlen=with_requests)
        self._lock = threading.Lock()
        self.iteration = 0
        self.num_dispatches = 0
        self.max_active = 0  # the most sequences running after any iteration

    def take(self) -> list[dict]:
        """The stats recorded since the last call."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._with_requests.clear()
        return items

    def record(self, scheduler: Scheduler, scheduled: ScheduledStep, context: list[tuple[Sequence, int]], steps: int,
               before: list[int], unfinished: set[Request], started: float,
               queue: tuple[list[Sequence], list[Sequence]] | None = None, spec: dict | None = None) -> None:  # fmt: skip
        """The iterations of one dispatch, after its tokens were appended.

        Args:
          scheduled: what ran; `context`: its prefill chunks, (sequence, tokens); `steps`: decodes
            per row (more than 1: a multi-step decode, which has no prefill chunk).
          before: each scheduled sequence's token count before the dispatch.
          unfinished: the scheduled sequences' requests that had not finished before it.
          started: its perf_counter at the start.
          queue: the scheduler's (running, waiting) sequences right after it was scheduled (None:
            as they are now), so that a step the overlap scheduler scheduled since does not count.
          spec: the step's specDecodingStats (speculative decoding on), or None.
        """
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.num_dispatches += 1
        self.max_active = max(self.max_active, len(scheduler.running))
        items = scheduled.items
        taken = [len(seq.token_ids) - n for (seq, _), n in zip(items, before)]  # tokens each took
        multi = steps > 1
        num_iters = max(1, max(taken, default=0)) if multi else 1
        # The iteration (of this dispatch) each request completed in: that of its last token.
        completed: dict[Request, int] = {}
        for (seq, _), n in zip(items, taken):
            if seq.request in unfinished and seq.request.finished:
                at = max(0, n - 1) if multi else 0
                completed[seq.request] = max(completed.get(seq.request, 0), at)
        running_seqs, waiting_seqs = queue if queue is not None else (scheduler.running, scheduler.waiting)
        running = {s.request for s in running_seqs if not s.finished}
        queued = {s.request for s in waiting_seqs if not s.finished} - running
        try:
            mem = jax.local_devices()[0].memory_stats() or {}
        except Exception:
            mem = {}
        common = {
            "gpuMemUsage": int(mem.get("bytes_in_use", 0)),
            "cpuMemUsage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "numQueuedRequests": len(queued),
            "maxNumActiveRequests": scheduler.config.max_batch_size,
            "kvCacheStats": kv_cache_stats(scheduler.block_manager),
        }
        in_context = {seq for seq, _ in context}
        # Iteration k's rows are those that took more than k tokens of a multi-step dispatch (each
        # one token in it), or every row of a one-step one (each what it took). Counted once, not
        # row by row for each of a multi-step dispatch's iterations: `span`, the iterations each
        # scheduled request is in; `took`, the tokens of each row (generation rows apart).
        span: dict[Request, int] = {}
        for (seq, _), t in zip(items, taken):
            span[seq.request] = max(span.get(seq.request, 0), t if multi else 1)
        took = sorted(taken)
        took_gen = sorted(t for (seq, _), t in zip(items, taken) if seq not in in_context)
        first = self.iteration + 1
        new_requests = 0
        for request, its in span.items():
            if its:
                if request.first_iter is None:  # (a request in any iteration is in the first)
                    request.first_iter = first
                    new_requests += 1
                request.last_iter = first + its - 1
        completed_at = sorted(completed.values())
        later_completed = sorted(at for request, at in completed.items() if request not in running)
        entries = []
        for k in range(num_iters):
            self.iteration += 1
            if multi:
                num_rows = len(took) - bisect.bisect_right(took, k)
                num_gen = len(took_gen) - bisect.bisect_right(took_gen, k)
                sum_gen = num_gen
            else:
                num_rows, num_gen, sum_gen = len(items), len(took_gen), sum(took_gen)
            active = len(running) + len(later_completed) - bisect.bisect_left(later_completed, k)
            completed_here = bisect.bisect_right(completed_at, k) - bisect.bisect_left(completed_at, k)
            entry = {
                "timestamp": datetime.datetime.now().strftime("%m-%d-%Y %H:%M:%S.%f"),
                "iter": self.iteration,
                "iterLatencyMS": elapsed_ms / num_iters,
                **common,
                "numNewActiveRequests": new_requests if k == 0 else 0,
                "numActiveRequests": active,
                "numCompletedRequests": completed_here,
                "inflightBatchingStats": {
                    "numScheduledRequests": num_rows,
                    "numContextRequests": len(context),
                    "numGenRequests": num_gen,
                    "numCtxTokens": sum(n for _, n in context),
                    "numPausedRequests": len(scheduled.preempted) if k == 0 else 0,
                    "microBatchId": 0,
                    "avgNumDecodedTokensPerIter": sum_gen / num_gen if num_gen else 0.0,
                },
                "dispatch": {"id": self.num_dispatches, "numSteps": steps, "latencyMS": elapsed_ms},
            }
            if spec is not None:
                entry["specDecodingStats"] = {**spec, "iterLatencyMS": elapsed_ms / num_iters} if k == 0 else {
                    "numDraftTokens": 0, "numAcceptedTokens": 0, "numRequestsWithDraftTokens": 0,
                    "acceptanceLength": 0.0, "iterLatencyMS": elapsed_ms / num_iters}  # fmt: skip
            requests = None
            if self.request_stats:
                scheduled_requests = {request for request, its in span.items() if its > k}
                requests = _request_stats(k, multi, items, taken, scheduled, scheduled_requests, running, queued,
                                          completed)  # fmt: skip
            entries.append((entry, requests))
        with self._lock:
            keep = self._with_requests
            for entry, requests in entries:
                if requests is not None and keep.maxlen:
                    if len(keep) == keep.maxlen:
                        keep[0][0].pop("requestStats", None)  # the oldest gives its list up
                    entry["requestStats"] = requests
                    keep.append((entry, requests))
                self._items.append(entry)


def _request_stats(k: int, multi: bool, items, taken: list[int], scheduled: ScheduledStep, scheduled_requests: set,
                   running: set, queued: set, completed: dict) -> list[dict]:  # fmt: skip
    """TensorRT-LLM's RequestStats of iteration k of a dispatch: the requests active in it (one that
    completed in it at stage GENERATION_COMPLETE), then the queued ones."""
    later = {}  # tokens a scheduled sequence took after iteration k of the dispatch
    for (seq, _), n in zip(items, taken):
        later[seq] = max(0, n - (k + 1)) if multi else 0
    paused = {seq.request for seq in scheduled.preempted} if k == 0 else set()
    active = running | {r for r, at in completed.items() if at >= k}
    out = []
    for request in sorted(active, key=lambda r: r.request_id):
        generated = max((s.num_output_tokens - later.get(s, 0) for s in request.sequences), default=0)
        lead = request.sequences[0]
        prompt = lead.num_prompt_tokens
        position = prompt if lead.finished else min(lead.num_computed, prompt)
        if completed.get(request) == k:
            stage = COMPLETE
        else:
            stage = CONTEXT if position < prompt else GENERATION
        out.append(_one_request_stats(request, stage, position, generated, request in scheduled_requests,
                                      request in paused))  # fmt: skip
    for request in sorted(queued, key=lambda r: r.request_id):
        out.append(_one_request_stats(request, QUEUED, 0, 0, False, request in paused))
    return out


def _one_request_stats(request: Request, stage: str, position: int, generated: int, scheduled: bool,
                       paused: bool) -> dict:  # fmt: skip
    """One request's entry; avgNumDecodedTokensPerIter is 1 once it decodes (drafts accepted are counted
    per iteration only, in specDecodingStats)."""
    kv = kv_cache_metrics(request)
    decoded = 1.0 if generated else 0.0
    return {
        "id": request.request_id,
        "stage": stage,
        "contextPrefillPosition": position,
        "numGeneratedTokens": generated,
        "avgNumDecodedTokensPerIter": decoded,
        "scheduled": scheduled,
        "paused": paused,
        "allocTotalBlocksPerRequest": kv.num_total_allocated_blocks,
        "allocNewBlocksPerRequest": kv.num_new_allocated_blocks,
        "reusedBlocksPerRequest": kv.num_reused_blocks,
        "missedBlocksPerRequest": kv.num_missed_blocks,
        "kvCacheHitRatePerRequest": kv.kv_cache_hit_rate,
    }


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


def kv_cache_metrics(request: Request) -> KvCacheMetrics:
    """A request's page counts so far."""
    reused, missed = request.num_reused_blocks, request.num_missed_blocks
    return KvCacheMetrics(
        num_total_allocated_blocks=request.num_new_blocks + reused,
        num_new_allocated_blocks=request.num_new_blocks,
        num_reused_blocks=reused,
        num_missed_blocks=missed,
        kv_cache_hit_rate=reused / (reused + missed) if reused + missed else 0.0,
    )


def perf_metrics(request: Request) -> RequestPerfMetrics:
    """A finished request's perf metrics (CompletionOutput.request_perf_metrics)."""
    timing = TimingMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time,
                           first_token_time=request.first_token_time, last_token_time=request.last_token_time)
    return RequestPerfMetrics(timing_metrics=timing, kv_cache_metrics=kv_cache_metrics(request),
                              first_iter=request.first_iter, last_iter=request.last_iter, iter=request.last_iter)
