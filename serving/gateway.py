"""The gateway's core, free of HTTP: resolve a model to a decision, then serve it with retries and fallbacks.

The dispatch rule: try the decided expert, retrying failures worth retrying (down, timed out, 5xx before
the first token) `retry.attempts` times, then walk its `fallback` chain; skip backends whose circuit
breaker is open. A backend's 4xx is the client's problem and is returned as is, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request

from router.base import Decision, RoutingRequest
from serving.accounting import Accountant, Routed
from serving.auth import KeyRing, RateLimiter
from serving.backends.base import Backend, BackendUnavailable, Endpoint, JSONResult, StreamResult
from serving.config import ConfigError, LoraMember, OpenAIExpert, RouterConfig, ServeConfig, VllmExpert
from serving.decision_log import DecisionLog
from serving.errors import OpenAIError
from serving.experiments import Experiment, assignment_key
from serving.health import CircuitBreaker
from serving.metrics import Metrics
from serving.routing import MicroBatcher, decidable_experts, direct_decision, load_router
from serving.tracing import Tracer

if TYPE_CHECKING:
    from serving.backends.lora import LoraEngine
    from serving.perplexity import BackendScorer

log = logging.getLogger("moerge.serving")


@dataclass
class Served:
    expert: str
    result: JSONResult | StreamResult
    attempts: int


class ResponseIds:
    """The Responses API answers this gateway gave: id → (expert, API key), the most recent `capacity`.

    A Responses request with `previous_response_id` continues a conversation whose state lives on the
    backend that answered it, so it must go there (never routed, never to a fallback) and only for the
    key that created it. Beyond `capacity` the least recently used id is forgotten (`on_evict` lets an
    in-process engine drop the stored answer too: vLLM itself never evicts them).
    """

    def __init__(self, capacity: int, on_evict: Callable[[str, str], None]) -> None:
        self.capacity = capacity
        self.on_evict = on_evict
        self._ids: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def add(self, response_id: str, expert: str, api_key: str | None) -> None:
        if self.capacity <= 0:
            return
        self._ids[response_id] = (expert, api_key)
        self._ids.move_to_end(response_id)
        while len(self._ids) > self.capacity:
            old, (old_expert, _) = self._ids.popitem(last=False)
            try:
                self.on_evict(old, old_expert)
            except Exception:
                log.exception("forgetting response %s on expert %s", old, old_expert)

    def holder(self, response_id: str, api_key: str | None) -> str | None:
        """The expert that holds `response_id`, if this key created it and it is still kept."""
        entry = self._ids.get(response_id)
        if entry is None or entry[1] != api_key:
            return None
        self._ids.move_to_end(response_id)
        return entry[0]

    def __len__(self) -> int:
        return len(self._ids)


def build_backend(
    name: str,
    cfg: VllmExpert | OpenAIExpert | LoraMember,
    client: httpx.AsyncClient,
    engines: int = 1,
    lora_engines: dict[str, LoraEngine] | None = None,
) -> Backend:
    if isinstance(cfg, LoraMember):
        from serving.backends.lora import LoraMemberBackend

        assert lora_engines is not None
        return LoraMemberBackend(name, lora_engines[cfg.family], cfg.adapter)
    if isinstance(cfg, VllmExpert):
        from serving.backends.inprocess import InProcessBackend

        return InProcessBackend(name, cfg.model, cfg.engine_options(), engines)
    from serving.backends.remote import RemoteBackend

    return RemoteBackend(name, str(cfg.url), cfg.model or name, client, cfg.key())


def _lora_info(backend: Backend) -> dict[str, Any]:
    """What /v1/models says of a LoRA family's expert: its family, adapter (null: the base), engine kind."""
    info = backend.describe()
    if info.get("backend") != "lora":
        return {}
    return {"family": info["family"], "adapter": info["adapter"], "engine": info["engine"]}


class Gateway:
    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        from serving.backends.remote import make_client

        self.config = config
        self.metrics = metrics or Metrics()
        t = config.timeouts
        self.client = make_client(t.connect_s, t.idle_s)
        embedded = sum(isinstance(cfg, VllmExpert) for cfg in config.experts.values()) + sum(
            isinstance(fam.base, VllmExpert) for fam in config.lora.values()
        )
        self.lora_engines: dict[str, LoraEngine] = {}
        if config.lora:
            from serving.backends.lora import LoraEngine

            self.lora_engines = {
                family: LoraEngine(family, fam, self.client, embedded) for family, fam in config.lora.items()
            }
        self.backends: dict[str, Backend] = {
            name: build_backend(name, cfg, self.client, embedded, self.lora_engines)
            for name, cfg in config.experts.items()
        }
        cb = config.circuit_breaker
        self.breakers = {
            name: CircuitBreaker(cb.failure_threshold, cb.reset_after_s) for name in self.backends
        }
        self.batchers: dict[str, MicroBatcher] = {}
        self._key_experts: dict[str, frozenset[str]] = {}  # per restricted key: experts it may be served by
        self.created = int(time.time())
        self._health_task: asyncio.Task[None] | None = None
        self.experiments = {name: Experiment(name, cfg) for name, cfg in config.experiments.items()}
        self.keys = KeyRing(config.auth.keys)
        self.admin_keys = KeyRing(config.auth.admin_keys)
        self.lora_admin_lock = asyncio.Lock()  # one registration change at a time
        self.limiter = RateLimiter(config.auth.keys)
        self.tracer = Tracer(config.tracing)
        self.decision_log = self._make_decision_log() if config.decision_log.enabled else None
        self.metrics.before_collect(self._refresh_gauges)
        self._metrics_server: Any = None
        self.responses = ResponseIds(config.server.max_stored_responses, self._forget_response)
        self.accountant = Accountant(
            self.metrics,
            self.limiter,
            self.decision_log,
            {*self.backends, *config.routing_models},
            config.decision_log.store_prompts,
        )

    def _forget_response(self, response_id: str, expert: str) -> None:
        if (backend := self.backends.get(expert)) is not None:
            backend.forget_response(response_id)

    def _make_decision_log(self) -> DecisionLog:
        cfg, m = self.config.decision_log, self.metrics
        try:
            url = cfg.resolved_url()
        except ValueError as err:
            raise ConfigError(str(err) if "decision_log" in str(err) else f"decision_log.{err}") from None
        return DecisionLog(
            url,
            queue_size=cfg.queue_size,
            batch_size=cfg.batch_size,
            flush_interval_s=cfg.flush_interval_s,
            connect_timeout_s=cfg.connect_timeout_s,
            on_drop=lambda reason, n: m.log_dropped.labels(reason).inc(n),
            on_written=m.log_written.inc,
            on_error=m.log_errors.inc,
            recent=cfg.queue_size + cfg.batch_size,  # ids whose rows may not be written yet (feedback)
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load routers, start backends (engines one after the other: each load uses every core)."""
        experts = list(self.backends)
        for name, rcfg in self.config.routers.items():
            scorer = self._perplexity_scorer(rcfg) if rcfg.kind == "perplexity" else None
            router = await asyncio.to_thread(load_router, name, rcfg, experts, scorer)
            fallback = rcfg.fallback or router.experts[0]
            self.batchers[name] = MicroBatcher(
                name,
                router,
                fallback,
                self.config.batching.max_batch,
                self.config.batching.max_wait_ms,
                observe=self._observe_batch(name),
                max_queue=self.config.batching.max_queue,
                on_shed=self._count_shed(name),
            )
        self._key_experts = {
            name: self._experts_for_models(key.models)
            for name, key in self.config.auth.keys.items()
            if key.models is not None
        }
        for backend in self.backends.values():
            log.info("starting expert %s (%s)", backend.name, backend.kind)
            await backend.start()
        await self._sync_remote_lora()
        await self.probe()
        self._health_task = asyncio.create_task(self._health_loop())
        if (port := self.config.server.metrics_port) is not None:  # /metrics off the API port
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(port, self.config.server.host, self.metrics.registry)
        if self.decision_log is not None:
            self.decision_log.start()

    def _perplexity_scorer(self, rcfg: RouterConfig) -> BackendScorer:
        """A perplexity router's scorer: its candidates' own backends, skipping any that cannot serve now."""
        from serving.perplexity import BackendScorer

        p = rcfg.perplexity_params()
        return BackendScorer(self.backends, p.timeout_s, self._unscorable, p.max_prompt_tokens)

    def _unscorable(self, expert: str) -> str | None:
        """Why `expert` must not score a prompt now (None: it may)."""
        backend, breaker = self.backends.get(expert), self.breakers.get(expert)
        if backend is None or not backend.available():
            return "unregistered"
        if breaker is not None and not breaker.up:
            return f"circuit {breaker.state.value}" if breaker.healthy is not False else "health probe failed"
        return None

    async def _sync_remote_lora(self) -> None:
        """Remote LoRA families learn their engine's adapters at start (best effort: logged)."""
        from serving.lora_admin import sync_remote

        for family, engine in self.lora_engines.items():
            if engine.in_process or not engine.cfg.discover:
                continue
            try:
                await sync_remote(self, family)
            except Exception as err:
                log.warning("LoRA family %s: could not list the engine's adapters: %s", family, err)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.accountant.drain(5.0)
        if self.decision_log is not None:
            await asyncio.to_thread(self.decision_log.close, 10.0)
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:
                log.exception("closing expert %s", backend.name)
        for batcher in self.batchers.values():
            batcher.close()
        await self.client.aclose()

    def _count_shed(self, name: str) -> Callable[[str], None]:
        counter = self.metrics.router_shed

        def count(kind: str) -> None:
            counter.labels(name, kind).inc()

        return count

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

    def _refresh_gauges(self) -> None:
        self.update_gauges()
        if self.decision_log is not None:
            self.metrics.log_queue.set(self.decision_log.pending())

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every routing model can be served by some expert in its chain (with no routing
        models: when some expert is up). One dead expert with a live fallback is no reason to take the
        replica out of service. The detail names states only, never backend errors or addresses."""
        backends = {
            name: {"backend": self.backends[name].kind, "up": breaker.up, "breaker": breaker.state.value}
            for name, breaker in self.breakers.items()
        }
        models = {
            model: bool(reach) and all(self.servable(e) for e in reach)
            for model in self.config.routing_models
            for reach in [self.routing_reach(model)]
        }
        ok = all(models.values()) if models else any(self.servable(e) for e in self.backends)
        return ok, {"routing_models": models, "backends": backends}

    def servable(self, expert: str) -> bool:
        """Some expert of `expert`'s fallback chain is up."""
        return any(self.breakers[name].up for name in self.fallback_chain(expert))

    def routing_reach(self, model: str) -> set[str]:
        """The experts a routing model's router (or experiment arms) may decide; empty before start."""
        target = self.config.routing_models.get(model)
        routers: list[str] = []
        experts: set[str] = set()
        if target in self.experiments:
            for arm in self.experiments[target].config.arms.values():
                if arm.router is not None:
                    routers.append(arm.router)
                elif arm.expert is not None:
                    experts.add(arm.expert)
        elif target is not None:
            routers.append(target)
        for name in routers:
            if (batcher := self.batchers.get(name)) is None:
                return set()
            experts |= {*decidable_experts(batcher.router), batcher.fallback}
        return experts

    def _experts_for_models(self, models: Collection[str]) -> frozenset[str]:
        """What a key allowed `models` may be served by: the experts it names, and for each routing
        model it names, the experts that model may decide and their fallback chains."""
        out = {m for m in models if m in self.backends}
        for model in models:
            for expert in self.routing_reach(model):
                out.update(self.fallback_chain(expert))
        return frozenset(out)

    # -- routing -------------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        out = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "moerge",
                "moerge": {"type": "expert", "backend": b.kind, **_lora_info(b)},
            }
            for name, b in self.backends.items()
            if b.available()
        ]
        for model, target in self.config.routing_models.items():
            info: dict[str, Any] = {"type": "routing"}
            if target in self.experiments:
                exp = self.experiments[target]
                info.update(
                    experiment=target,
                    enabled=exp.config.enabled,
                    arms={a: round(share, 6) for a, share in exp.shares.items()},
                    control=exp.control,
                )
            else:
                router = self.batchers[target].router if target in self.batchers else None
                info.update(
                    router=target,
                    kind=getattr(router, "name", None),
                    experts=getattr(router, "experts", None),
                )
            out.append(
                {
                    "id": model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "moerge",
                    "moerge": info,
                }
            )
        return out

    async def route(
        self,
        model: str,
        messages: list[dict[str, Any]],
        previous: str | None,
        *,
        request_id: str,
        user: str | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        pinned: str | None = None,
    ) -> Routed:
        """Direct, a router, or an experiment arm (sticky by its key) plus the experiment's shadow routers.

        `pinned`: the expert that must serve the request whatever the model (it holds the conversation's
        state: a Responses `previous_response_id`); the model must exist all the same."""
        if pinned is not None and (model in self.backends or model in self.config.routing_models):
            d = Decision(pinned, {pinned: 1.0}, 1.0, "previous-response", "1", "previous_response_id")
            self.metrics.decisions.labels(d.router, d.expert, d.reason).inc()
            return Routed(d, "previous-response")
        if model in self.backends and not self.backends[model].available():
            raise OpenAIError(
                404,
                f"The model `{model}` was unregistered.",
                param="model",
                code="model_not_found",
            )
        if model in self.backends:
            routed = Routed(direct_decision(model), "direct")
        else:
            target = self.config.routing_models.get(model)
            if target is None:
                raise OpenAIError(
                    404,
                    f"The model `{model}` does not exist. Known models: "
                    + ", ".join([*self.backends, *self.config.routing_models]),
                    param="model",
                    code="model_not_found",
                )
            request = RoutingRequest(messages, previous)
            if target in self.experiments:
                routed = await self._route_experiment(
                    self.experiments[target], request, request_id, user, headers, api_key
                )
            else:
                routed = Routed(await self._decide_with(target, request), target)
        d = routed.decision
        self.metrics.decisions.labels(d.router, d.expert, d.reason).inc()
        return routed

    async def _decide_with(self, router: str, request: RoutingRequest) -> Decision:
        batcher = self.batchers[router]
        decision = await batcher.decide(request)
        if decision.expert not in self.backends:  # defensive: load_router checks the expert set
            decision = batcher._fallback_decision(ValueError(f"unknown expert {decision.expert!r}"))
        return decision

    async def _route_experiment(
        self,
        exp: Experiment,
        request: RoutingRequest,
        request_id: str,
        user: str | None,
        headers: dict[str, str] | None,
        api_key: str | None,
    ) -> Routed:
        key = assignment_key(exp.config.assign_by, user, headers or {}, api_key)
        assignment = exp.assign(key, request_id)
        shadow = {
            name: asyncio.ensure_future(self.batchers[name].decide(request, shadow=True))
            for name in exp.config.shadow
        }
        arm = exp.arm_config(assignment.arm)
        if arm.router is not None:
            decision, router = await self._decide_with(arm.router, request), arm.router
        else:
            assert arm.expert is not None
            decision = Decision(arm.expert, {arm.expert: 1.0}, 1.0, "fixed", "1", "experiment-arm")
            router = f"expert:{arm.expert}"
        attributed = assignment.experiment is not None
        return Routed(
            decision,
            router,
            assignment.experiment,
            assignment.arm if attributed else None,
            shadow,
            assignment.unit,
        )

    def fallback_chain(self, expert: str, api_key: str | None = None) -> list[str]:
        """`expert` then its fallbacks, at most `retry.max_fallbacks` of them, and only experts the API
        key may be served by (a key allowed only `math` is never answered by `code`)."""
        chain = [expert]
        while (nxt := self.config.experts[chain[-1]].fallback) is not None and nxt not in chain:
            chain.append(nxt)
        if api_key is not None and (allowed := self._key_experts.get(api_key)) is not None:
            chain = [name for name in chain if name in allowed]
        return chain[: 1 + self.config.retry.max_fallbacks]

    # -- dispatch ------------------------------------------------------------------------------------
    async def dispatch(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        raw: Request | None,
        expert: str,
        api_key: str | None = None,
        fallbacks: bool = True,
    ) -> Served:
        """`fallbacks=False`: only `expert` (retried), never its fallback chain (it alone holds the state)."""
        t, retry = self.config.timeouts, self.config.retry
        errors: list[str] = []  # for the log only: backend errors may name internal addresses
        outcomes: dict[str, str] = {}  # for the client: expert → what happened
        attempts = 0
        chain = self.fallback_chain(expert, api_key)
        if not fallbacks:
            chain = [name for name in chain[:1] if name == expert]
        for name in chain:
            breaker, backend = self.breakers[name], self.backends[name]
            if not backend.available():  # unregistered at runtime: on to its fallback, no breaker verdict
                outcomes[name] = "unregistered"
                continue
            for attempt in range(retry.attempts + 1):
                if not breaker.allow():
                    errors.append(f"{name}: circuit open ({breaker.last_error})")
                    outcomes.setdefault(name, "circuit open")
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
                    outcomes[name] = "failed"
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
                return Served(name, result, attempts)
        self.update_gauges()
        log.warning("no backend could serve expert %s: %s", expert, "; ".join(errors[-4:]))
        tried = ", ".join(f"{name} {outcome}" for name, outcome in outcomes.items())
        raise OpenAIError(
            503,
            f"No backend could serve expert `{expert}`"
            + (f" (tried: {tried})." if tried else ": no expert this API key may use is configured."),
            type="server_error",
            code="backend_unavailable",
        )

    def record_stream_failure(self, expert: str, error: str) -> None:
        self.breakers[expert].record_failure(error)
        self.metrics.stream_errors.labels(expert).inc()
