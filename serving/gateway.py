"""The gateway's core, free of HTTP: resolve a model to a decision, then serve it with retries and fallbacks.

The dispatch rule: try the decided expert, retrying failures worth retrying (down, timed out, 5xx before
the first token) `retry.attempts` times, then walk its `fallback` chain; skip backends whose circuit
breaker is open. A backend's 4xx is the client's problem and is returned as is, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request

from router.base import Decision, RoutingRequest
from serving.backends.base import Backend, BackendUnavailable, Endpoint, JSONResult, StreamResult
from serving.config import OpenAIExpert, ServeConfig, VllmExpert
from serving.errors import OpenAIError
from serving.health import CircuitBreaker
from serving.metrics import Metrics
from serving.routing import MicroBatcher, direct_decision, load_router

log = logging.getLogger("moerge.serving")


@dataclass
class Served:
    expert: str
    result: JSONResult | StreamResult
    attempts: int
    failed: list[str] = field(default_factory=list)  # experts that failed before `expert` answered


def build_backend(name: str, cfg: VllmExpert | OpenAIExpert, client: httpx.AsyncClient) -> Backend:
    if isinstance(cfg, VllmExpert):
        from serving.backends.inprocess import InProcessBackend

        return InProcessBackend(name, cfg.model, cfg.engine_args)
    from serving.backends.remote import RemoteBackend

    return RemoteBackend(name, str(cfg.url), cfg.model or name, client, cfg.key())


class Gateway:
    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        from serving.backends.remote import make_client

        self.config = config
        self.metrics = metrics or Metrics()
        t = config.timeouts
        self.client = make_client(t.connect_s, t.idle_s)
        self.backends: dict[str, Backend] = {
            name: build_backend(name, cfg, self.client) for name, cfg in config.experts.items()
        }
        cb = config.circuit_breaker
        self.breakers = {
            name: CircuitBreaker(cb.failure_threshold, cb.reset_after_s) for name in self.backends
        }
        self.batchers: dict[str, MicroBatcher] = {}
        self.created = int(time.time())
        self._health_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load routers, start backends (engines one after the other: each load uses every core)."""
        experts = list(self.backends)
        for name, rcfg in self.config.routers.items():
            router = await asyncio.to_thread(load_router, name, rcfg, experts)
            fallback = rcfg.fallback or router.experts[0]
            self.batchers[name] = MicroBatcher(
                name,
                router,
                fallback,
                self.config.batching.max_batch,
                self.config.batching.max_wait_ms,
                observe=self._observe_batch(name),
            )
        for backend in self.backends.values():
            log.info("starting expert %s (%s)", backend.name, backend.kind)
            await backend.start()
        await self.probe()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:
                log.exception("closing expert %s", backend.name)
        for batcher in self.batchers.values():
            batcher.close()
        await self.client.aclose()

    def _observe_batch(self, name: str) -> Any:
        size, seconds = self.metrics.router_batch.labels(name), self.metrics.router_seconds.labels(name)

        def observe(n: int, s: float) -> None:
            size.observe(n)
            seconds.observe(s)

        return observe

    # -- health --------------------------------------------------------------------------------------
    async def probe(self) -> None:
        names = list(self.backends)
        results = await asyncio.gather(*(self.backends[n].health() for n in names), return_exceptions=True)
        for name, ok in zip(names, results, strict=True):
            self.breakers[name].record_probe(ok is True)
        self.update_gauges()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.circuit_breaker.health_interval_s)
            try:
                await self.probe()
            except Exception:
                log.exception("health probe failed")

    def update_gauges(self) -> None:
        for name, breaker in self.breakers.items():
            self.metrics.backend_up.labels(name).set(1 if breaker.up else 0)
            self.metrics.breaker_open.labels(name).set(1 if breaker.state.value == "open" else 0)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        backends = {}
        for name, breaker in self.breakers.items():
            backends[name] = {
                "backend": self.backends[name].kind,
                "up": breaker.up,
                "breaker": breaker.state.value,
                "last_error": breaker.last_error,
            }
        return all(b["up"] for b in backends.values()), backends

    # -- routing -------------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        out = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "moerge",
                "moerge": {"type": "expert", "backend": b.kind},
            }
            for name, b in self.backends.items()
        ]
        for model, router_name in self.config.routing_models.items():
            router = self.batchers[router_name].router if router_name in self.batchers else None
            out.append(
                {
                    "id": model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "moerge",
                    "moerge": {
                        "type": "routing",
                        "router": router_name,
                        "kind": getattr(router, "name", None),
                        "experts": getattr(router, "experts", None),
                    },
                }
            )
        return out

    async def decide(self, model: str, messages: list[dict[str, Any]], previous: str | None) -> Decision:
        if model in self.backends:
            decision = direct_decision(model)
        else:
            router_name = self.config.routing_models.get(model)
            if router_name is None:
                raise OpenAIError(
                    404,
                    f"The model `{model}` does not exist. Known models: "
                    + ", ".join([*self.backends, *self.config.routing_models]),
                    param="model",
                    code="model_not_found",
                )
            batcher = self.batchers[router_name]
            decision = await batcher.decide(RoutingRequest(messages, previous))
            if decision.expert not in self.backends:  # defensive: load_router checks the expert set
                decision = batcher._fallback_decision(ValueError(f"unknown expert {decision.expert!r}"))
        self.metrics.decisions.labels(decision.router, decision.expert, decision.reason).inc()
        return decision

    def fallback_chain(self, expert: str) -> list[str]:
        chain = [expert]
        while (nxt := self.config.experts[chain[-1]].fallback) is not None and nxt not in chain:
            chain.append(nxt)
        return chain

    # -- dispatch ------------------------------------------------------------------------------------
    async def dispatch(
        self, endpoint: Endpoint, payload: dict[str, Any], raw: Request | None, expert: str
    ) -> Served:
        t, retry = self.config.timeouts, self.config.retry
        errors: list[str] = []
        failed: list[str] = []
        attempts = 0
        for name in self.fallback_chain(expert):
            breaker, backend = self.breakers[name], self.backends[name]
            for attempt in range(retry.attempts + 1):
                if not breaker.allow():
                    errors.append(f"{name}: circuit open ({breaker.last_error})")
                    self.metrics.attempts.labels(name, "skipped").inc()
                    break
                attempts += 1
                try:
                    result = await backend.request(
                        endpoint, dict(payload), raw, first_token_s=t.first_token_s, total_s=t.total_s
                    )
                except BackendUnavailable as err:
                    breaker.record_failure(str(err))
                    self.metrics.attempts.labels(name, "failed").inc()
                    errors.append(str(err))
                    log.warning("expert %s attempt %d failed: %s", name, attempt + 1, err)
                    if attempt < retry.attempts and retry.backoff_s:
                        await asyncio.sleep(retry.backoff_s * 2**attempt)
                    continue
                except BaseException:
                    breaker.trial_in_flight = False  # cancelled (client left): no verdict on the backend
                    raise
                breaker.record_success()
                self.metrics.attempts.labels(name, "ok").inc()
                if name != expert:
                    self.metrics.fallbacks.labels(expert, name).inc()
                return Served(name, result, attempts, failed)
            failed.append(name)
        self.update_gauges()
        raise OpenAIError(
            503,
            f"No backend could serve expert `{expert}`: " + "; ".join(errors[-4:]),
            type="server_error",
            code="backend_unavailable",
        )

    def record_stream_failure(self, expert: str, error: str) -> None:
        self.breakers[expert].record_failure(error)
        self.metrics.stream_errors.labels(expert).inc()
