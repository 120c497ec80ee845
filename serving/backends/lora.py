"""A LoRA family: one engine (in-process or remote) shared by its experts, the base and every adapter.

Each expert of the family is a `LoraMemberBackend` of its own (its own circuit breaker, metrics and
decision-log rows, as any expert), and all of them send their requests to the family's one engine with
`model` set to the engine's name for that member: the adapter's name (vLLM resolves it to a
`LoRARequest`, in-process through its own `OpenAIServingModels` exactly as `vllm serve` does), and for
the base either a zero adapter (`base_mode: zero-adapter`, the default; see serving/lora.py for why) or
the engine's base model name (`plain`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

from serving.backends.base import Backend, BackendUnavailable, Endpoint, JSONResult, StreamResult
from serving.config import LoraFamilyConfig, OpenAIExpert, VllmExpert

log = logging.getLogger("moerge.serving")


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
        self.inner: Any
        if isinstance(cfg.base, VllmExpert):
            from serving.backends.inprocess import InProcessBackend

            # zero-adapter mode: the zero adapter takes the base expert's name, so answers name the
            # expert; the engine's own (plain) name is then another one, never sent by moerge.
            served = f"{self.base_name}@plain" if cfg.uses_zero_adapter() else self.base_name
            self.inner = InProcessBackend(family, cfg.base.model, cfg.base.engine_args, engines, served)
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


class LoraMemberBackend(Backend):
    """One expert of a family: the base (`adapter` None) or one adapter, served by the family's engine."""

    kind = "lora"

    def __init__(self, name: str, engine: LoraEngine, adapter: str | None) -> None:
        super().__init__(name)
        self.engine = engine
        self.adapter = adapter

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
        if not self.engine._started:
            raise BackendUnavailable(
                f"{self.name}: the engine of LoRA family {self.engine.family} is not running"
            )
        result: JSONResult | StreamResult = await self.engine.inner.request(
            endpoint,
            payload,
            raw,
            first_token_s=first_token_s,
            total_s=total_s,
            model=self.engine.upstream_model(self.adapter),
        )
        return result
