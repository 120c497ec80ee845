"""Prometheus metrics of the gateway, in a registry of its own (several apps can live in one process).

`moerge_requests_total` counts every answered request, failures included (status label); `moerge_ab_*`
break requests down by experiment and arm, which is what an A/B dashboard compares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _BeforeCollect(Collector):
    """Runs hooks (gauges read from live state) whenever the registry is collected, on any thread."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def collect(self) -> Iterable[Metric]:
        for hook in self.hooks:
            hook()
        return []


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._before_collect = _BeforeCollect()
        r.register(self._before_collect)  # first: the gauges it updates are collected after it
        self._add_request_metrics(r)
        self._add_ab_metrics(r)
        self._add_decision_log_metrics(r)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Requests, routing, backends: what an operator's dashboard shows."""
        self.requests = Counter(
            "moerge_requests", "Requests answered", ["endpoint", "model", "expert", "status"], registry=r
        )
        self.in_flight = Gauge("moerge_requests_in_flight", "Requests being served", ["endpoint"], registry=r)
        self.latency = Histogram(
            "moerge_request_seconds",
            "Request latency until the full answer (non-streaming) or the end of the stream",
            ["endpoint", "expert", "stream"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "moerge_time_to_first_event_seconds",
            "Request received → first streamed event sent",
            ["expert"],
            buckets=_LATENCY,
            registry=r,
        )
        self.decisions = Counter(
            "moerge_routing_decisions", "Routing decisions", ["router", "expert", "reason"], registry=r
        )
        self.router_batch = Histogram(
            "moerge_router_batch_size",
            "Requests decided per decide_batch call",
            ["router"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.router_seconds = Histogram(
            "moerge_router_batch_seconds",
            "Time of one decide_batch call",
            ["router"],
            buckets=_FAST,
            registry=r,
        )
        self.router_shed = Counter(
            "moerge_router_shed",
            "Routing requests refused at a full router queue (kind: shadow, not decided; serving, "
            "given the router's fallback expert)",
            ["router", "kind"],
            registry=r,
        )
        self.attempts = Counter(
            "moerge_backend_attempts", "Backend attempts by outcome", ["expert", "outcome"], registry=r
        )
        self.fallbacks = Counter(
            "moerge_fallbacks",
            "Requests served by a fallback expert",
            ["from_expert", "to_expert"],
            registry=r,
        )
        self.stream_errors = Counter(
            "moerge_stream_errors",
            "Streams ended with an error event after the first token",
            ["expert"],
            registry=r,
        )
        self.backend_up = Gauge(
            "moerge_backend_up", "1 if the backend is up (probe and breaker)", ["expert"], registry=r
        )
        self.breaker_open = Gauge(
            "moerge_backend_breaker_open", "1 if the circuit breaker is open", ["expert"], registry=r
        )
        self.rejected = Counter(
            "moerge_rejected",
            "Requests refused before routing (auth, rate limit, concurrency cap, draining)",
            ["reason"],
            registry=r,
        )

    def _add_ab_metrics(self, r: CollectorRegistry) -> None:
        """Per experiment and arm: what an A/B dashboard compares."""
        arm = ["experiment", "arm"]
        self.ab_requests = Counter(
            "moerge_ab_requests", "Requests per experiment arm", [*arm, "status"], registry=r
        )
        self.ab_errors = Counter(
            "moerge_ab_errors", "Failed requests (status >= 400 or a stream error) per arm", arm, registry=r
        )
        self.ab_latency = Histogram(
            "moerge_ab_request_seconds", "Latency per arm", arm, buckets=_LATENCY, registry=r
        )
        self.ab_ttft = Histogram(
            "moerge_ab_time_to_first_event_seconds",
            "Time to first streamed event per arm",
            arm,
            buckets=_LATENCY,
            registry=r,
        )
        self.ab_tokens = Counter(
            "moerge_ab_tokens", "Tokens per arm (direction: in | out)", [*arm, "direction"], registry=r
        )
        self.ab_expert = Counter(
            "moerge_ab_expert_requests",
            "Requests per arm and serving expert (expert share)",
            [*arm, "expert"],
            registry=r,
        )
        self.ab_feedback = Counter(
            "moerge_ab_feedback",
            "Feedback received per arm (label: the label, or `score`)",
            [*arm, "label"],
            registry=r,
        )
        self.ab_feedback_score = Histogram(
            "moerge_ab_feedback_score",
            "Feedback scores per arm",
            arm,
            buckets=(-1, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 5, 10),
            registry=r,
        )
        self.shadow_decisions = Counter(
            "moerge_shadow_decisions",
            "Shadow router decisions (logged, never served)",
            ["router", "expert", "agrees"],
            registry=r,
        )

    def _add_decision_log_metrics(self, r: CollectorRegistry) -> None:
        self.log_written = Counter(
            "moerge_decision_log_written", "Rows written to the decision log", registry=r
        )
        self.log_dropped = Counter(
            "moerge_decision_log_dropped",
            "Rows dropped (reason: queue_full while the database is slow or down, shutdown, rejected by it)",
            ["reason"],
            registry=r,
        )
        self.log_errors = Counter(
            "moerge_decision_log_write_errors", "Failed batch writes (retried)", registry=r
        )
        self.log_queue = Gauge("moerge_decision_log_queue", "Rows waiting to be written", registry=r)

    def before_collect(self, hook: Callable[[], None]) -> None:
        """Call `hook` before every scrape (the /metrics route or a separate metrics port)."""
        self._before_collect.hooks.append(hook)
