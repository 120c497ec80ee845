"""What happens when a request ends, however it ends: metrics, token charges, the decision-log row, the span.

Every request gets one `RequestRecord`, filled in as it goes (routing, serving, streaming) and finished
exactly once, so failures (4xx, 503, a stream cut short, a client that left) are counted like successes.
The log row waits for the request's shadow decisions in a background task, never on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from router.base import Decision
from serving.auth import RateLimiter
from serving.decision_log import DecisionLog, now, prompt_digest
from serving.metrics import Metrics
from serving.tracing import Span

log = logging.getLogger("moerge.serving")
SHADOW_WAIT_S = 10.0


@dataclass
class Routed:
    """A routing outcome: the decision, which configured policy made it, and the experiment arm if any."""

    decision: Decision
    router: str  # the router's name in the config, `direct`, or `expert:NAME` for a fixed-expert arm
    experiment: str | None = None
    arm: str | None = None
    shadow: Mapping[str, asyncio.Future[Decision]] = field(default_factory=dict)
    unit: str | None = None  # the experiment's unit of assignment (salted key hash); None: not sticky


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    ts: datetime = field(default_factory=now)
    model: str | None = None
    api_key: str | None = None
    stream: bool = False
    messages: list[dict[str, Any]] | None = None
    routed: Routed | None = None
    served_expert: str | None = None
    status: int = 500
    ttft_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    reserved_tokens: int = 0  # taken from the key's token budget at admission, settled at the end
    span: Span = field(default_factory=Span)
    finished: bool = False

    def usage(self, usage: Any) -> None:
        """Take token counts from a `usage` object: OpenAI's chat/completions (`prompt_tokens`,
        `completion_tokens`) or the Responses and Anthropic Messages APIs' (`input_tokens`, `output_tokens`)."""
        if isinstance(usage, dict):
            pin = usage.get("prompt_tokens", usage.get("input_tokens"))
            pout = usage.get("completion_tokens", usage.get("output_tokens"))
            self.tokens_in = pin if isinstance(pin, int) else self.tokens_in
            self.tokens_out = pout if isinstance(pout, int) else self.tokens_out


class Accountant:
    def __init__(
        self,
        metrics: Metrics,
        limiter: RateLimiter,
        decision_log: DecisionLog | None,
        known_models: set[str],
        store_prompts: bool = False,
    ) -> None:
        self.metrics = metrics
        self.limiter = limiter
        self.decision_log = decision_log
        self.known_models = known_models
        self.store_prompts = store_prompts
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self, request_id: str, endpoint: str) -> RequestRecord:
        """A new request's record, counted in flight until `finish` (the one place it is taken off)."""
        self.metrics.in_flight.labels(endpoint).inc()
        return RequestRecord(request_id, endpoint)

    def finish(self, rec: RequestRecord) -> None:
        """Account for a finished request (idempotent). Never raises: accounting must not fail a request."""
        if rec.finished:
            return
        rec.finished = True
        self.metrics.in_flight.labels(rec.endpoint).dec()
        try:
            self._finish(rec)
        except Exception:
            log.exception("accounting for request %s failed", rec.request_id)

    def _finish(self, rec: RequestRecord) -> None:
        m, latency = self.metrics, time.perf_counter() - rec.start
        model = "-" if rec.model is None else rec.model if rec.model in self.known_models else "unknown"
        routed = rec.routed
        expert = rec.served_expert or (routed.decision.expert if routed else "-")
        status = str(rec.status)
        m.requests.labels(rec.endpoint, model, expert, status).inc()
        if rec.served_expert is not None:
            m.latency.labels(rec.endpoint, rec.served_expert, str(rec.stream).lower()).observe(latency)
        tokens = (rec.tokens_in or 0) + (rec.tokens_out or 0)
        self.limiter.settle_tokens(rec.api_key, rec.reserved_tokens, tokens)
        if routed is not None and routed.experiment is not None:
            arm = (routed.experiment, routed.arm or "")
            m.ab_requests.labels(*arm, status).inc()
            if rec.status >= 400:
                m.ab_errors.labels(*arm).inc()
            m.ab_latency.labels(*arm).observe(latency)
            if rec.ttft_s is not None:
                m.ab_ttft.labels(*arm).observe(rec.ttft_s)
            if rec.tokens_in:
                m.ab_tokens.labels(*arm, "in").inc(rec.tokens_in)
            if rec.tokens_out:
                m.ab_tokens.labels(*arm, "out").inc(rec.tokens_out)
            m.ab_expert.labels(*arm, expert).inc()
        rec.span.set(
            expert=rec.served_expert,
            status=rec.status,
            tokens_in=rec.tokens_in,
            tokens_out=rec.tokens_out,
            latency_s=latency,
        )
        rec.span.end(rec.status)
        if routed is not None and (routed.shadow or self.decision_log is not None):
            task = asyncio.get_running_loop().create_task(self._log(rec, routed, latency))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _log(self, rec: RequestRecord, routed: Routed, latency: float) -> None:
        shadow: dict[str, Any] = {}
        if routed.shadow:
            done, _ = await asyncio.wait(routed.shadow.values(), timeout=SHADOW_WAIT_S)
            for name, fut in routed.shadow.items():
                if fut in done and fut.exception() is None:
                    d = fut.result()
                    shadow[name] = {"expert": d.expert, "confidence": d.confidence, "scores": d.scores}
                    agrees = str(d.expert == routed.decision.expert).lower()
                    self.metrics.shadow_decisions.labels(name, d.expert, agrees).inc()
                else:
                    fut.cancel()
                    shadow[name] = {"expert": None, "error": "no decision"}
        if self.decision_log is None:
            return
        digest, text = prompt_digest(rec.messages or [])
        d = routed.decision
        self.decision_log.record(
            {
                "request_id": rec.request_id,
                "ts": rec.ts,
                "endpoint": rec.endpoint,
                "model": (rec.model or "")[:256],
                "experiment": routed.experiment,
                "arm": routed.arm,
                "unit": routed.unit,
                "router": routed.router,
                "expert": d.expert,
                "served_expert": rec.served_expert,
                "reason": d.reason[:128],
                "confidence": d.confidence,
                "scores": d.scores,
                "shadow": shadow or None,
                "api_key": rec.api_key,
                "stream": rec.stream,
                "status": rec.status,
                "latency_s": latency,
                "ttft_s": rec.ttft_s,
                "tokens_in": rec.tokens_in,
                "tokens_out": rec.tokens_out,
                "prompt_sha256": digest,
                "prompt": text if self.store_prompts else None,
            }
        )
        self.metrics.log_queue.set(self.decision_log.pending())

    async def drain(self, timeout_s: float) -> None:
        """Wait for pending log rows (their shadow decisions) before the log closes."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
