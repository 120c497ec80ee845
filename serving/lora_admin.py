"""Adapters registered and unregistered on a running gateway (the admin API), and their saved state.

`POST /admin/lora/{family}/adapters` checks an adapter as config load does (serving/lora.py), loads it
into the family's engine (in-process: vLLM's own `OpenAIServingModels.load_lora_adapter`, what
`vllm serve`'s endpoint calls; remote: the engine's `/v1/load_lora_adapter`, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` there) and makes it an expert. `DELETE .../adapters/{name}` unloads
it; the expert stays known, unavailable, so a router that still decides it gets its fallback chain (a
direct request for it is a 404). For in-process families the set of adapters is written atomically to the
state file beside the config, and `load_config` reads it back, so a restart serves the same adapters.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from serving.config import LoraAdapterConfig, LoraMember, Name, VllmExpert, _Strict
from serving.errors import OpenAIError

if TYPE_CHECKING:
    from serving.gateway import Gateway

log = logging.getLogger("moerge.serving")
STATE_VERSION = 1


class RegisterAdapter(_Strict):
    """The body of POST /admin/lora/{family}/adapters."""

    name: Name
    path: str = Field(min_length=1, description="PEFT folder, as the engine sees it")
    served_name: str | None = Field(None, min_length=1, description="remote engines: its name there")
    fallback: Name | None = None
    description: str = ""


def state_path(config_path: Path) -> Path:
    """The state file of a config: `serve.yaml` → `serve.lora-state.json` beside it."""
    return config_path.with_name(config_path.stem + ".lora-state.json")


def apply_state(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The raw config with each in-process family's adapters replaced by the saved set (if any)."""
    if not path.exists():
        return data
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unknown state version {state.get('version')!r}")
    for family, saved in state.get("families", {}).items():
        fam = (data.get("lora") or {}).get(family)
        if isinstance(fam, dict) and (fam.get("base") or {}).get("backend") == "vllm":
            fam["adapters"] = saved["adapters"]
            log.info("LoRA family %s: %d adapters from %s", family, len(saved["adapters"]), path)
    return data


def write_state(gateway: Gateway) -> None:
    """Write the in-process families' adapters (registered ones included) atomically to the state file."""
    path = gateway.config.lora_state_file
    if path is None:
        return
    families = {
        family: {
            "adapters": {
                name: a.model_dump(exclude_none=True, exclude_defaults=True) | {"path": a.path}
                for name, a in fam.adapters.items()
            }
        }
        for family, fam in gateway.config.lora.items()
        if isinstance(fam.base, VllmExpert)
    }
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": STATE_VERSION, "families": families}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _family(gateway: Gateway, family: str) -> Any:
    engine = gateway.lora_engines.get(family)
    if engine is None:
        raise OpenAIError(
            404,
            f"No LoRA family `{family}`.",
            type="not_found_error",
            param="family",
            code="family_not_found",
        )
    return engine


async def register(gateway: Gateway, family: str, body: RegisterAdapter) -> dict[str, Any]:
    from serving.backends.lora import LoraMemberBackend
    from serving.lora import check_adapter

    engine = _family(gateway, family)
    fam = engine.cfg
    name = body.name
    existing = gateway.backends.get(name)
    revived = isinstance(existing, LoraMemberBackend) and existing.removed and existing.engine is engine
    if (existing is not None and not revived) or name in gateway.config.routing_models:
        raise OpenAIError(409, f"`{name}` is already a model name.", param="name", code="name_taken")
    if body.fallback is not None and body.fallback not in gateway.backends:
        raise OpenAIError(400, f"Unknown fallback expert `{body.fallback}`.", param="fallback")
    if engine.in_process and body.served_name is not None:
        raise OpenAIError(400, "served_name is only for remote engines.", param="served_name")
    if engine.in_process or Path(body.path).exists():
        problems = check_adapter(body.path, fam.max_lora_rank)
        if problems:
            raise OpenAIError(
                400,
                f"Adapter `{name}` refused: " + "; ".join(f"adapters.{name}.{p}" for p in problems),
                param="path",
                code="invalid_adapter",
            )
    adapter = LoraAdapterConfig(
        path=body.path, served_name=body.served_name, fallback=body.fallback, description=body.description
    )
    await engine.load_adapter(name, adapter)
    _add_member(gateway, engine, name, adapter)
    write_state(gateway)
    log.info("LoRA family %s: registered adapter %s (%s)", family, name, body.path)
    return {"object": "lora_adapter", "family": family, "name": name, "registered": True}


def _add_member(gateway: Gateway, engine: Any, name: str, adapter: LoraAdapterConfig) -> None:
    """Make a loaded adapter an expert of the gateway (or bring an unregistered one back)."""
    from serving.backends.lora import LoraMemberBackend
    from serving.health import CircuitBreaker

    fam = engine.cfg
    fam.adapters[name] = adapter
    base_name = engine.base_name if fam.serve_base else None
    gateway.config.experts[name] = LoraMember(
        backend="lora",
        family=engine.family,
        adapter=name,
        fallback=adapter.fallback or base_name,
        description=adapter.description,
    )
    existing = gateway.backends.get(name)
    if isinstance(existing, LoraMemberBackend):
        existing.removed = False
        return
    cb = gateway.config.circuit_breaker
    gateway.backends[name] = LoraMemberBackend(name, engine, name)
    gateway.breakers[name] = CircuitBreaker(cb.failure_threshold, cb.reset_after_s)
    gateway.breakers[name].record_probe(True)
    gateway.accountant.known_models.add(name)


async def sync_remote(gateway: Gateway, family: str) -> dict[str, Any]:
    """Learn a remote family's adapters from its engine's /v1/models: adapters loaded there (e.g. by
    `vllm serve --lora-modules` or its own runtime API) become experts named as the engine names them;
    configured adapters the engine no longer serves are unavailable (their requests take the fallback)."""
    from serving.backends.lora import LoraMemberBackend

    engine = _family(gateway, family)
    if engine.in_process:
        raise OpenAIError(400, "Only remote families are synced from their engine.", param="family")
    try:
        remote = await engine.remote_adapters()
    except Exception as err:
        raise OpenAIError(
            502,
            f"The engine of `{family}` did not list its models: {type(err).__name__}",
            type="server_error",
        ) from None
    known = {a.served_name or n: n for n, a in engine.cfg.adapters.items()}
    added, missing = [], []
    for served, path in remote.items():
        if served == engine.cfg.zero_adapter or served in known:
            continue
        backend = gateway.backends.get(served)
        revive = isinstance(backend, LoraMemberBackend) and backend.engine is engine
        if (backend is not None and not revive) or served in gateway.config.routing_models:
            log.warning(
                "LoRA family %s: the engine's adapter %s has another model's name; skipped", family, served
            )
            continue
        _add_member(gateway, engine, served, LoraAdapterConfig(path=path or None))
        added.append(served)
    for served, name in known.items():
        backend = gateway.backends.get(name)
        if isinstance(backend, LoraMemberBackend):
            backend.removed = served not in remote
            if backend.removed:
                missing.append(name)
    if added or missing:
        log.info("LoRA family %s: learned %s; not served by the engine: %s", family, added, missing)
    return {"object": "lora_sync", "family": family, "added": added, "unavailable": missing}


async def unregister(gateway: Gateway, family: str, name: str) -> dict[str, Any]:
    from serving.backends.lora import LoraMemberBackend

    engine = _family(gateway, family)
    backend = gateway.backends.get(name)
    if not isinstance(backend, LoraMemberBackend) or backend.engine is not engine or backend.adapter is None:
        raise OpenAIError(
            404,
            f"No adapter `{name}` in family `{family}`.",
            type="not_found_error",
            param="name",
            code="adapter_not_found",
        )
    if backend.removed:
        raise OpenAIError(404, f"Adapter `{name}` is not registered.", param="name", code="adapter_not_found")
    backend.removed = True  # from now on its requests take the fallback chain
    adapter = engine.cfg.adapters.pop(name)
    try:
        await engine.unload_adapter(name, adapter)
    finally:
        write_state(gateway)
    log.info("LoRA family %s: unregistered adapter %s", family, name)
    return {"object": "lora_adapter", "family": family, "name": name, "registered": False}


def listing(gateway: Gateway) -> dict[str, Any]:
    from serving.backends.lora import LoraMemberBackend

    out = {}
    for family, engine in gateway.lora_engines.items():
        members = [
            b for b in gateway.backends.values() if isinstance(b, LoraMemberBackend) and b.engine is engine
        ]
        out[family] = {
            "engine": engine.inner.kind,
            "base_expert": engine.base_name if engine.cfg.serve_base else None,
            "base_mode": engine.cfg.base_mode,
            "adapters": {
                b.name: {"registered": not b.removed, "fallback": gateway.config.experts[b.name].fallback}
                for b in members
                if b.adapter is not None
            },
        }
    return {"object": "list", "families": out}
