"""Prometheus metrics of a serving Engine (names follow vLLM's, with the kiln_ prefix).

Gauges are read from `Engine.stats()` at scrape time; token counters and latency histograms are fed
one finished request at a time (`observe`, called from the engine thread: prometheus_client is
thread-safe). Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine
from .request import RequestOutput

disable_created_metrics()  # no *_created series: they double the output and nobody reads them
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """The engine's own snapshot, read once per scrape so the gauges agree with each other."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
                ("kiln_num_requests_running", "Requests with a sequence in the running batch.", s.running),
                ("kiln_num_requests_waiting", "Requests waiting for their first step.", s.waiting),
                ("kiln_kv_pages_used", "KV cache pages held by unfinished sequences.", s.kv_pages_used),
                ("kiln_kv_pages_cached", "KV cache pages held only by the prefix cache (reclaimable).",
                 s.kv_pages_cached),
                ("kiln_kv_pages_free", "Free KV cache pages.", s.kv_pages_free),
                ("kiln_kv_pages_total", "KV cache pages in all.", s.kv_pages_total)):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("kiln_num_preemptions", "Sequences preempted (recomputed later).",
                                  value=s.preemptions)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("kiln_generation_tokens", "Generated tokens of finished requests.",
                                         registry=self.registry)
        self.finished = Counter("kiln_request_success", "Finished requests by finish reason of completion 0.",
                                ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def observe(self, out: RequestOutput) -> None:
        """Count one finished (or aborted) request."""
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_output_tokens)
        self.finished.labels(out.finish_reason or "none").inc()
        self.e2e.observe(out.elapsed)
        if out.time_to_first_token is not None:
            self.ttft.observe(out.time_to_first_token)
            decoded = max(len(c.token_ids) for c in out.outputs) - 1
            if decoded > 0 and out.finish_time is not None:
                self.tpot.observe((out.finish_time - out.first_token_time) / decoded)

    def render(self) -> bytes:
        return generate_latest(self.registry)
