"""The server's Prometheus metrics, under vLLM's names with the `jaxllm:` prefix.

Engine state (requests running and waiting, KV-cache use, prefix-cache counters) is read from the
engine when /metrics is scraped; request metrics (tokens, finish reasons, latencies) are recorded as
each request finishes, from its RequestOutput and the timing metrics the engine attaches
(return_perf_metrics: arrival, first scheduled, first and last token, monotonic seconds).
Each server has its own registry, so two apps in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm.engine.stats import kv_cache_stats
from jaxllm.serve.protocol import finish_reason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time (the engine thread owns these lists;
    copying a list or reading a length is atomic, which is all this does)."""

    def __init__(self, get_llm):
        self._get_llm = get_llm

    def collect(self):
        running = GaugeMetricFamily("jaxllm:num_requests_running", "Requests scheduled on the engine")
        waiting = GaugeMetricFamily("jaxllm:num_requests_waiting", "Requests queued for admission")
        usage = GaugeMetricFamily("jaxllm:kv_cache_usage_perc", "Share of KV-cache pages in use (1 = all)")
        queries = CounterMetricFamily("jaxllm:prefix_cache_queries", "KV-cache pages looked up at admission")
        hits = CounterMetricFamily("jaxllm:prefix_cache_hits", "KV-cache pages found cached at admission")
        llm = self._get_llm()
        engine = getattr(llm, "_engine", None)
        if engine is not None:
            scheduler = engine.scheduler
            running.add_metric([], len({s.request.request_id for s in list(scheduler.running)}))
            waiting.add_metric([], len({s.request.request_id for s in list(scheduler.waiting)}))
            kv = kv_cache_stats(scheduler.block_manager)
            usage.add_metric([], kv["usedNumBlocks"] / max(kv["maxNumBlocks"], 1))
            queries.add_metric([], kv["reusedBlocks"] + kv["missedBlocks"])
            hits.add_metric([], kv["reusedBlocks"])
        yield from (running, waiting, usage, queries, hits)


class ServerMetrics:
    """The server's registry; `record` a finished request, `render` for a scrape."""

    def __init__(self, get_llm):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter("jaxllm:request_success", "Requests finished, by their first sequence's finish reason",
                                       ["finished_reason"], registry=r)  # fmt: skip
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("jaxllm:inter_token_latency_seconds",
                             "Mean time between tokens of a sequence (one observation per sequence)",
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=REQUEST_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("jaxllm:request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=REQUEST_BUCKETS, registry=r)  # fmt: skip
        r.register(_EngineCollector(get_llm))

    def record(self, output) -> None:
        """A finished RequestOutput: its tokens, finish reasons and (from its first sequence's timing
        metrics) latencies."""
        self.prompt_tokens.inc(len(output.prompt_token_ids or ()))
        for seq in output.outputs:
            self.generation_tokens.inc(len(seq.token_ids))
            timing = (seq.request_perf_metrics or {}).get("timing_metrics") or {}
            first, last = timing.get("first_token_time"), timing.get("last_token_time")
            if first is not None and last is not None and len(seq.token_ids) > 1:
                self.itl.observe((last - first) / (len(seq.token_ids) - 1))
        if output.outputs:
            self.request_success.labels(finished_reason=finish_reason(output.outputs[0].finish_reason) or "unknown").inc()
        timing = ((output.outputs[0].request_perf_metrics or {}).get("timing_metrics") or {}) if output.outputs else {}
        arrival = timing.get("arrival_time")
        if arrival is None:
            return
        if timing.get("first_scheduled_time") is not None:
            self.queue_time.observe(timing["first_scheduled_time"] - arrival)
        if timing.get("first_token_time") is not None:
            self.ttft.observe(timing["first_token_time"] - arrival)
        if timing.get("last_token_time") is not None:
            self.e2e.observe(timing["last_token_time"] - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
