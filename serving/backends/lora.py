"""A LoRA family: one engine (in-process or remote) shared by its experts, the base and every adapter.

Each expert of the family is a `LoraMemberBackend` of its own (its own circuit breaker, metrics and
decision-log rows, as any expert), and all of them send their requests to the family's one engine with
`model` set to the engine's name for that member: the adapter's name (vLLM resolves it to a
`LoRARequest`, in-process through its own `OpenAIServingModels` exactly as `vllm serve` does), and for
the base either a zero adapter (`base_mode: zero-adapter`, the default; see serving/lora.py for why) or
the engine's base model name (`plain`).
May import: serving.backends, serving.config, serving.lora, serving.errors, serving.vllm_boundary (the
only way to vLLM), httpx, starlette.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

from serving.backends.base import Backend, BackendUnavailable, Endpoint, JSONResult, StreamResult
from serving.config import LoraAdapterConfig, LoraFamilyConfig, OpenAIExpert, VllmExpert
from serving.errors import OpenAIError
from serving.vllm_boundary import load_lora_request, unload_lora_request

log = logging.getLogger("moerge.serving")


def runs_alone(payload: dict[str, Any]) -> bool:
    """Does this request need the engine to itself? Prompt logprobs do (asked for directly, or through
    `echo` with logprobs, which vLLM turns into prompt logprobs): vLLM 0.32's LoRA logits layer maps one
    adapter index per request onto one row per prompt token, so a batch of several requests fails the
    whole engine (`einsum(): subscript b has size 2 ... 19` in punica_cpu.add_lora_logits; vllm#29955,
    #16668); one request alone is computed right (its index broadcasts)."""
    if payload.get("prompt_logprobs") is not None:
        return True
    return bool(payload.get("echo")) and (
        payload.get("logprobs") is not None or payload.get("top_logprobs") is not None
    )


class AloneGate:
    """Admission to one engine: ordinary requests share it, a `runs_alone` one waits until nothing else
    runs and keeps new requests out while it runs (and while it waits, so it is never starved).
    Synchronous `leave` so that it can run in any `finally`, cancellation included."""

    def __init__(self) -> None:
        self.running = 0
        self.alone = False
        self.waiting_alone = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _may_enter(self, alone: bool) -> bool:
        if alone:
            return self.running == 0
        return not self.alone and self.waiting_alone == 0

    async def enter(self, alone: bool) -> None:
        if alone:
            self.waiting_alone += 1
        try:
            while not self._may_enter(alone):
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
        finally:
            if alone:
                self.waiting_alone -= 1
                self._wake()  # ordinary requests held back for it may go (it now runs, or gave up)
        self.running += 1
        self.alone = alone

    def leave(self, alone: bool) -> None:
        self.running -= 1
        if alone:
            self.alone = False
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def hold_stream(self, result: StreamResult, alone: bool) -> StreamResult:
        """The stream keeps its place until it ends or is closed, whichever comes first."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.leave(alone)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in result.rest:
                    yield chunk
            finally:
                release()

        async def close() -> None:
            try:
                await result.close()
            finally:
                release()

        return StreamResult(result.first, rest(), close)


class LoraEngine:
    """The engine of one family, started once however many experts it serves."""

    def __init__(
        self, family: str, cfg: LoraFamilyConfig, client: httpx.AsyncClient, engines: int = 1
    ) -> None:
        self.family = family
        self.cfg = cfg
        self.base_name = cfg.base_expert or family
        self.in_process = isinstance(cfg.base, VllmExpert)
        self._zero_dir: Path | None = None
        self._started = False
        self._lock = asyncio.Lock()
        self.gate = AloneGate()
        self.inner: Any
        if isinstance(cfg.base, VllmExpert):
            from serving.backends.inprocess import InProcessBackend

            # zero-adapter mode: the zero adapter takes the base expert's name, so answers name the
            # expert; the engine's own (plain) name is then another one, never sent by moerge.
            served = f"{self.base_name}@plain" if cfg.uses_zero_adapter() else self.base_name
            self.inner = InProcessBackend(family, cfg.base.model, cfg.base.engine_options(), engines, served)
        else:
            assert isinstance(cfg.base, OpenAIExpert)
            from serving.backends.remote import RemoteBackend

            base = cfg.base
            self.inner = RemoteBackend(family, str(base.url), base.model or family, client, base.key())

    def upstream_model(self, adapter: str | None) -> str:
        """The engine's name for a member: the adapter, the zero adapter, or the base."""
        if adapter is not None:
            served = self.cfg.adapters[adapter].served_name if not self.in_process else None
            return served or adapter
        if self.cfg.uses_zero_adapter():
            return self.base_name if self.in_process else str(self.cfg.zero_adapter)
        return str(self.inner.served_name if self.in_process else self.inner.model)

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            if self.in_process:
                extra = []
                if self.cfg.uses_zero_adapter():
                    extra.append(f"{self.base_name}={self._write_zero_adapter()}")
                lora_args = self.cfg.engine_lora_args(extra)
                self.inner.engine_args = {**self.inner.engine_args, **lora_args}
                log.info(
                    "LoRA family %s: %d adapters on one engine (max_loras %d, max_lora_rank %d, base %s)",
                    self.family,
                    len(self.cfg.adapters),
                    lora_args["max_loras"],
                    lora_args["max_lora_rank"],
                    "through a zero adapter" if extra else "plain",
                )
            await self.inner.start()
            self._started = True

    def _write_zero_adapter(self) -> Path:
        from serving.lora import write_zero_adapter

        if not self.cfg.adapters:
            raise ValueError(
                f"lora.{self.family}: base_mode zero-adapter needs one adapter to shape the zero adapter "
                "after (or set base_mode: plain)"
            )
        source = next(iter(self.cfg.adapters.values())).path
        assert source is not None
        self._zero_dir = Path(tempfile.mkdtemp(prefix=f"moerge-lora-{self.family}-"))
        return write_zero_adapter(source, self._zero_dir / "zero")

    async def close(self) -> None:
        async with self._lock:
            if not self._started:
                return
            self._started = False
            try:
                await self.inner.close()
            finally:
                if self._zero_dir is not None:
                    shutil.rmtree(self._zero_dir, ignore_errors=True)
                    self._zero_dir = None

    async def health(self) -> bool:
        return bool(await self.inner.health())

    async def load_adapter(self, name: str, adapter: LoraAdapterConfig) -> None:
        """Load an adapter into the running engine (OpenAIError if the engine refuses it)."""

        if self.in_process:
            models = self.inner.state.openai_serving_models
            result = await models.load_lora_adapter(load_lora_request(name, str(adapter.path)))
            if not isinstance(result, str):
                raise OpenAIError(
                    400 if int(result.error.code) < 500 else 502,
                    f"The engine refused adapter `{name}`: {result.error.message}",
                    param="path",
                    code="adapter_load_failed",
                )
            return
        body = {"lora_name": adapter.served_name or name, "lora_path": str(adapter.path)}
        await self._remote_call("/v1/load_lora_adapter", body, name, "load")

    async def unload_adapter(self, name: str, adapter: LoraAdapterConfig) -> None:
        if self.in_process:
            models = self.inner.state.openai_serving_models
            lora = models.lora_requests.get(name)
            await models.unload_lora_adapter(unload_lora_request(name))
            if lora is not None:  # the serving layer forgets the name; the engine frees its weights
                await self.inner.engine.remove_lora(lora.lora_int_id)
            return
        await self._remote_call(
            "/v1/unload_lora_adapter", {"lora_name": adapter.served_name or name}, name, "unload"
        )

    async def _remote_call(self, path: str, body: dict[str, Any], name: str, what: str) -> None:
        root = self.inner.base_url.removesuffix("/v1")
        try:
            resp = await self.inner.client.post(
                root + path, json=body, headers=self.inner.headers, timeout=60
            )
        except httpx.HTTPError as err:
            raise OpenAIError(
                502,
                f"The engine of family `{self.family}` did not answer: {type(err).__name__}",
                type="server_error",
                code="engine_unreachable",
            ) from None
        if resp.status_code != 200:
            hint = (
                " (does the engine run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1?)"
                if resp.status_code == 404
                else ""
            )
            raise OpenAIError(
                400 if resp.status_code < 500 else 502,
                f"The engine could not {what} adapter `{name}`: HTTP {resp.status_code} {resp.text[:300]}{hint}",
                code=f"adapter_{what}_failed",
            )

    async def remote_adapters(self) -> dict[str, str]:
        """A remote engine's adapters from its /v1/models: served name → path (entries with a parent)."""
        resp = await self.inner.client.get(
            self.inner.base_url + "/models", headers=self.inner.headers, timeout=10
        )
        resp.raise_for_status()
        return {m["id"]: m.get("root") or "" for m in resp.json().get("data", []) if m.get("parent")}


class LoraMemberBackend(Backend):
    """One expert of a family: the base (`adapter` None) or one adapter, served by the family's engine."""

    kind = "lora"

    def __init__(self, name: str, engine: LoraEngine, adapter: str | None) -> None:
        super().__init__(name)
        self.engine = engine
        self.adapter = adapter
        self.removed = False  # unregistered at runtime: its requests take the fallback chain

    def available(self) -> bool:
        return not self.removed

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "family": self.engine.family,
            "adapter": self.adapter,
            "engine": self.engine.inner.kind,
        }

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def health(self) -> bool:
        return await self.engine.health()

    async def request(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        raw: Request | None,
        *,
        first_token_s: float,
        total_s: float,
    ) -> JSONResult | StreamResult:
        if self.removed:
            raise BackendUnavailable(f"{self.name}: adapter unregistered")
        if not self.engine._started:
            raise BackendUnavailable(
                f"{self.name}: the engine of LoRA family {self.engine.family} is not running"
            )
        gate, alone = self.engine.gate, runs_alone(payload)
        try:
            await asyncio.wait_for(gate.enter(alone), first_token_s)
        except TimeoutError:
            raise OpenAIError(
                503,
                f"The engine of LoRA family `{self.engine.family}` stayed busy for {first_token_s:g} s: a "
                "request with prompt logprobs runs alone on a LoRA engine (vLLM fails a batch of several).",
                type="server_error",
                code="engine_busy",
            ) from None
        try:
            result: JSONResult | StreamResult = await self.engine.inner.request(
                endpoint,
                payload,
                raw,
                first_token_s=first_token_s,
                total_s=total_s,
                model=self.engine.upstream_model(self.adapter),
            )
        except BaseException:
            gate.leave(alone)
            raise
        if isinstance(result, StreamResult):
            return gate.hold_stream(result, alone)
        gate.leave(alone)
        return result

    def forget_response(self, response_id: str) -> None:
        self.engine.inner.forget_response(response_id)
