"""Routing: turn the `model` a client sent into a Decision, off the event loop and in micro-batches.

A client naming an expert goes direct. A client naming a routing model (`auto`, ...) gets its router's
decision. Most routers are CPU-bound (sentence embeddings), so each runs in its own worker thread; requests
that arrive while a batch is being decided queue up and are decided together in the next
`decide_batch` call: under load one encoder call serves many requests, and a lone request waits for
nothing (unless `max_wait_ms` asks to grow batches). An I/O-bound router (`AsyncRouter`: `perplexity`, whose
experts' engines score the prompt) is awaited on the loop instead, each request concurrently.
May import: router.* (trained routers lazily), serving.config.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from router.base import AsyncRouter, Decision, Router, RoutingRequest, create_router
from router.perplexity import PromptNLLScorer
from serving.config import RouterConfig

log = logging.getLogger("moerge.serving")


# What `params` may set for a trained artifact: another head, the n-gram fast path on/off, the LRU size.
ARTIFACT_PARAMS = {"kind", "fast_path", "cache_size"}


def load_router(
    name: str, cfg: RouterConfig, experts: Sequence[str], scorer: PromptNLLScorer | None = None
) -> Router:
    """A built-in kind over the configured experts, or a trained artifact (its experts must be served).

    `scorer`: what a `perplexity` router scores prompts with (the gateway's, over its backends)."""
    if cfg.artifact is not None:
        from router.artifact import load_router as load_artifact  # lazy: trained routers pull in torch & co

        unknown_params = sorted(set(cfg.params) - ARTIFACT_PARAMS)
        if unknown_params:
            raise ValueError(
                f"routers.{name}.params: {unknown_params} are not options of a trained router; "
                f"expected some of {sorted(ARTIFACT_PARAMS)}"
            )
        if cfg.digest is None:
            log.warning(
                "routers.%s: artifact %s is not pinned; add `digest: <the output of moerge router digest %s>` "
                "so that only that artifact is served",
                name,
                cfg.artifact,
                cfg.artifact,
            )
        router = load_artifact(Path(cfg.artifact), digest=cfg.digest, serve_as=cfg.serve_as, **cfg.params)
    else:
        importlib.import_module("router.fixed")  # registers the built-in kinds
        assert cfg.kind is not None
        params = dict(cfg.params)
        if cfg.kind == "perplexity":
            if scorer is None:
                raise ValueError(f"routers.{name}: a perplexity router needs the gateway's scorer")
            p = cfg.perplexity_params()
            params = {"scorer": scorer, "temperature": p.temperature, "max_chars": p.max_chars}
            params["fallback"] = cfg.fallback
        router = create_router(cfg.kind, experts=list(cfg.experts or experts), **params)
    unknown = sorted(set(router.experts) - set(experts))
    if unknown:
        raise ValueError(f"routers.{name}: the router chooses experts that are not served: {unknown}")
    return router


def decidable_experts(router: Router) -> list[str]:
    """The experts a router can decide: a fixed router's one expert, otherwise all of its experts."""
    from router.fixed import FixedRouter

    return [router.expert] if isinstance(router, FixedRouter) else list(router.experts)


def direct_decision(expert: str) -> Decision:
    return Decision(expert, {expert: 1.0}, 1.0, "direct", "1", "direct")


class RouterOverloaded(Exception):
    """A shadow decision shed because the router's queue is full (it is not decided)."""


class MicroBatcher:
    """Collects concurrent routing requests for one router and decides them in batches on a worker thread.

    A router that has never needed more than `inline_below_s` for a batch of this size (a rule, a coin)
    is called on the loop directly: a thread hop would cost more than the decision, and it cannot block
    the loop for long. The first batch always goes to the thread, to measure.

    The queue is bounded (`max_queue` waiting requests): beyond it a serving request gets the router's
    fallback expert at once (reason `router-overloaded→fallback`) and a shadow request is shed (raises
    RouterOverloaded). A request whose caller gave up (a cancelled shadow decision) is dropped from the
    queue without being decided, and with it the conversation it held.
    """

    def __init__(
        self,
        name: str,
        router: Router,
        fallback: str,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        observe: Any = None,
        inline_below_s: float = 0.0002,
        max_queue: int = 1024,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.router = router
        self.fallback = fallback
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.observe = observe  # callable(batch_size, seconds) for metrics
        self.max_queue = max_queue
        self.on_shed = on_shed or (lambda kind: None)  # kind: "shadow" | "serving"
        self._queue: deque[tuple[RoutingRequest, asyncio.Future[Decision]]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"router-{name}")
        self.inline_below_s = inline_below_s
        self._slowest = float("inf")  # the router's slowest time per request so far; inf until measured
        self._awaiting = 0  # an AsyncRouter's decisions in flight (it is awaited, not queued)

    def queued(self) -> int:
        return len(self._queue) + self._awaiting

    async def decide(self, request: RoutingRequest, shadow: bool = False) -> Decision:
        if isinstance(self.router, AsyncRouter):
            return await self._decide_async(self.router, request, shadow)
        if len(self._queue) >= self.max_queue:
            self._queue = deque(item for item in self._queue if not item[1].done())  # drop abandoned ones
            if len(self._queue) >= self.max_queue:
                self.on_shed("shadow" if shadow else "serving")
                if shadow:
                    raise RouterOverloaded(f"router {self.name}: {self.max_queue} requests queued")
                return self._fallback_decision(RouterOverloaded(), "router-overloaded→fallback")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._queue.append((request, fut))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await fut

    async def _decide_async(self, router: AsyncRouter, request: RoutingRequest, shadow: bool) -> Decision:
        """An I/O-bound router, awaited here concurrently with every other request; at most `max_queue`
        decisions in flight (beyond: shed, as a full queue)."""
        if self._awaiting >= self.max_queue:
            self.on_shed("shadow" if shadow else "serving")
            if shadow:
                raise RouterOverloaded(f"router {self.name}: {self.max_queue} decisions in flight")
            return self._fallback_decision(RouterOverloaded(), "router-overloaded→fallback")
        self._awaiting += 1
        start = time.perf_counter()
        try:
            decision = await router.decide_async(request)
        except Exception as err:  # a router must not raise; if it does, serve from its fallback expert
            log.exception("router %s failed", self.name)
            decision = self._fallback_decision(err)
        finally:
            self._awaiting -= 1
        if self.observe is not None:
            self.observe(1, time.perf_counter() - start)
        return decision

    def _next_batch(self) -> list[tuple[RoutingRequest, asyncio.Future[Decision]]]:
        batch: list[tuple[RoutingRequest, asyncio.Future[Decision]]] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if not item[1].done():  # cancelled: nobody waits for this decision
                batch.append(item)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait_s and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch = self._next_batch()
            if not batch:
                continue
            requests = [r for r, _ in batch]
            start = time.perf_counter()
            try:
                if self._slowest * len(requests) < self.inline_below_s:
                    decisions, own = self._timed(requests)
                else:
                    decisions, own = await loop.run_in_executor(self._executor, self._timed, requests)
                if len(decisions) != len(requests):
                    raise RuntimeError(
                        f"decide_batch returned {len(decisions)} decisions for {len(requests)}"
                    )
                per_request = own / len(requests)
                self._slowest = (
                    per_request if self._slowest == float("inf") else max(self._slowest, per_request)
                )
            except Exception as err:  # a router must not raise; if it does, serve from its fallback expert
                log.exception("router %s failed on a batch of %d", self.name, len(requests))
                decisions = [self._fallback_decision(err) for _ in requests]
            elapsed = time.perf_counter() - start
            if self.observe is not None:
                self.observe(len(requests), elapsed)
            for (_, fut), decision in zip(batch, decisions, strict=True):
                if not fut.done():
                    fut.set_result(decision)

    def _timed(self, requests: list[RoutingRequest]) -> tuple[list[Decision], float]:
        start = time.perf_counter()
        decisions = self.router.decide_batch(requests)
        return decisions, time.perf_counter() - start

    def _fallback_decision(self, err: Exception, reason: str = "router-error→fallback") -> Decision:
        return Decision(
            self.fallback,
            {},
            0.0,
            getattr(self.router, "name", self.name),
            getattr(self.router, "version", "?"),
            reason,
            {"error": type(err).__name__},
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
