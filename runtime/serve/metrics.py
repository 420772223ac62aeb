"""Stage 0's Prometheus metrics: requests, tokens, latency, speculation, queue and stages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily


@dataclass(frozen=True)
class StageGauge:
    """What `/metrics` shows of one stage, read at scrape time."""

    stage: str
    endpoint: str
    up: bool
    sessions: int = 0
    kv_cache_bytes: int = 0


class Metrics:
    """The frontend's Prometheus metrics, in a registry of the app's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # status: ok, error (failed after it started), aborted (the client left), or the HTTP
        # code of a refusal (400, 404, 413, 429, 503).
        self.requests = Counter("layerline_requests", "HTTP generation requests",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("layerline_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.completion_tokens = Counter("layerline_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.latency = Histogram("layerline_request_seconds", "Request wall time",
                                 ["endpoint"], registry=self.registry)
        self.first_token = Histogram("layerline_time_to_first_token_seconds", "Time to first token",
                                     ["endpoint"], registry=self.registry)
        self.speculation = SpeculationMetrics(self.registry)

    def watch_admission(self, active: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Gauges of requests decoding and waiting for a slot, read at scrape time."""
        Gauge("layerline_active_requests", "Requests decoding now",
              registry=self.registry).set_function(active)
        Gauge("layerline_queue_depth", "Requests waiting for a decoding slot",
              registry=self.registry).set_function(waiting)


class SpeculationMetrics:
    """Cumulative speculation counters, and the accept rate and tokens per pass they give."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("layerline_speculative_requests", "Requests by decoding mode",
                                ["mode"], registry=registry)
        self.drafted = Counter("layerline_speculative_drafted_tokens", "Draft tokens sent for verification",
                               registry=registry)
        self.accepted = Counter("layerline_speculative_accepted_tokens", "Draft tokens accepted",
                                registry=registry)
        self.tokens = Counter("layerline_speculative_tokens", "Tokens emitted by speculating requests",
                              registry=registry)
        self.passes = Counter("layerline_speculative_target_passes",
                              "Target passes (verification steps) of speculating requests", registry=registry)
        self.draft_seconds = Counter("layerline_speculative_draft_seconds",
                                     "Time the drafter spent proposing", registry=registry)
        self.verify_seconds = Counter("layerline_speculative_verify_seconds",
                                      "Time spent in target passes verifying drafts", registry=registry)
        self._totals = {"drafted": 0.0, "accepted": 0.0, "tokens": 0.0, "passes": 0.0}
        Gauge("layerline_speculative_accept_rate", "Accepted / drafted tokens, since start",
              registry=registry).set_function(lambda: self._ratio("accepted", "drafted"))
        Gauge("layerline_speculative_tokens_per_pass", "Tokens emitted per target pass, since start",
              registry=registry).set_function(lambda: self._ratio("tokens", "passes"))

    def _ratio(self, top: str, bottom: str) -> float:
        return self._totals[top] / self._totals[bottom] if self._totals[bottom] else 0.0

    def record(self, usage: dict[str, Any]) -> None:
        """Count one finished request's `usage.speculative`."""
        if not usage.get("enabled"):
            self.requests.labels("plain").inc()
            return
        self.requests.labels("speculative").inc()
        for key, counter, value in (("drafted", self.drafted, usage["drafted"]),
                                    ("accepted", self.accepted, usage["accepted"]),
                                    ("tokens", self.tokens, usage["tokens"]),
                                    ("passes", self.passes, usage["target_passes"])):
            counter.inc(value)
            self._totals[key] += value
        self.draft_seconds.inc(usage["draft_seconds"])
        self.verify_seconds.inc(usage["verify_seconds"])


class StageCollector:
    """Per stage: `layerline_stage_up` (1 while ready), its sessions and KV-cache bytes."""

    def __init__(self, states: Callable[[], list[StageGauge]]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("layerline_stage_up", "1 if the stage is ready, else 0",
                               labels=["stage", "endpoint"])
        sessions = GaugeMetricFamily("layerline_stage_sessions", "KV-cache sessions the stage holds",
                                     labels=["stage", "endpoint"])
        kv_bytes = GaugeMetricFamily("layerline_stage_kv_cache_bytes", "Bytes the stage's KV caches hold",
                                     labels=["stage", "endpoint"])
        for state in self.states():
            labels = [state.stage, state.endpoint]
            up.add_metric(labels, 1.0 if state.up else 0.0)
            sessions.add_metric(labels, float(state.sessions))
            kv_bytes.add_metric(labels, float(state.kv_cache_bytes))
        yield from (up, sessions, kv_bytes)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class BatchCollector:
    """The scheduler's passes: `layerline_batch_sessions` (a histogram of sessions per pass),
    `layerline_batch_queued` (submissions waiting for a pass), `layerline_sessions_speculating`
    (requests whose last step drafted), read at scrape time from `batching()` (None: not up yet)."""

    def __init__(self, batching: Callable[[], dict[str, Any] | None]) -> None:
        self.batching = batching

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        state = self.batching() or {}
        sizes = {int(k): v for k, v in state.get("batch_sizes", {}).items()}
        buckets, below = [], 0
        for bound in BATCH_BUCKETS:
            below = sum(n for size, n in sizes.items() if size <= bound)
            buckets.append((str(bound), float(below)))
        passes = float(sum(sizes.values()))
        buckets.append(("+Inf", passes))
        histogram = HistogramMetricFamily("layerline_batch_sessions", "Sessions per batch pass")
        histogram.add_metric([], buckets, sum_value=float(sum(size * n for size, n in sizes.items())))
        yield histogram
        yield GaugeMetricFamily("layerline_batch_queued", "Submissions waiting for a batch pass",
                                value=float(state.get("queued", 0)))
        yield GaugeMetricFamily("layerline_sessions_speculating", "Requests whose last step drafted",
                                value=float(state.get("speculating", 0)))
