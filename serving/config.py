"""The `moerge serve` configuration: one YAML file, validated by pydantic so every error names its field.

Paths in the file are resolved relative to the file itself, so an example config can point at a zoo
built beside it. Whether those paths exist is checked separately (`missing_paths`), so the schema can be
validated on a machine that has not built the models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    """Where the gateway listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get a 413")
    log_decisions: bool = Field(
        False, description="log one line per routing decision (metrics count them anyway)"
    )
    log_prompts: bool = Field(False, description="include the prompt in decision logs (off: privacy)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False


class Timeouts(_Strict):
    """Deadlines per backend attempt; an attempt that misses one counts as a backend failure."""

    connect_s: float = Field(5.0, gt=0)
    first_token_s: float = Field(60.0, gt=0, description="request sent → first streamed event")
    idle_s: float = Field(60.0, gt=0, description="longest gap between two streamed events")
    total_s: float = Field(600.0, gt=0, description="whole non-streaming request")


class RetryConfig(_Strict):
    attempts: int = Field(1, ge=0, le=10, description="extra tries on the same expert before its fallback")
    backoff_s: float = Field(0.05, ge=0, le=10)


class BreakerConfig(_Strict):
    """Circuit breaker per backend, fed by requests and by a periodic health probe."""

    failure_threshold: int = Field(3, ge=1)
    reset_after_s: float = Field(10.0, gt=0, description="open → half-open after this long")
    health_interval_s: float = Field(5.0, gt=0)


class BatchingConfig(_Strict):
    """Router micro-batching: requests that arrive while a batch is being decided join the next one."""

    max_batch: int = Field(64, ge=1)
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="extra wait to grow a batch (0: none)")


class _ExpertBase(_Strict):
    fallback: Name | None = Field(None, description="expert to try when this one is down or failing")
    description: str = ""


class VllmExpert(_ExpertBase):
    """An in-process vLLM async engine (the embedded default)."""

    backend: Literal["vllm"]
    model: str = Field(min_length=1, description="checkpoint directory (or model id)")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="`vllm serve` options, e.g. max_model_len: 256, enforce_eager: true"
    )

    @model_validator(mode="after")
    def _safe_engine_args(self) -> VllmExpert:
        keys = {k.replace("-", "_") for k in self.engine_args}
        if self.engine_args.get("trust_remote_code") or self.engine_args.get("trust-remote-code"):
            raise ValueError("engine_args.trust_remote_code is refused: moerge never runs model code")
        reserved = sorted(keys & {"model", "served_model_name", "host", "port", "model_tag"})
        if reserved:
            raise ValueError(
                f"engine_args: {', '.join(reserved)} are set by moerge (use `model` and the expert name)"
            )
        return self


class OpenAIExpert(_ExpertBase):
    """A remote OpenAI-compatible server (e.g. `vllm serve`)."""

    backend: Literal["openai"]
    url: AnyHttpUrl = Field(description="base URL including /v1, e.g. http://127.0.0.1:8001/v1")
    model: str | None = Field(None, description="the remote's model name (default: the expert's name)")
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="environment variable holding the key")

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env) if self.api_key_env else None


ExpertConfig = Annotated[VllmExpert | OpenAIExpert, Field(discriminator="backend")]


class RouterConfig(_Strict):
    """A built-in router kind (`fixed`, `random`, ...) or a trained router artifact directory."""

    kind: str | None = None
    artifact: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    experts: list[Name] | None = Field(
        None, description="experts a built-in kind chooses from (default: all)"
    )
    fallback: Name | None = Field(None, description="expert used if the router itself fails")

    @model_validator(mode="after")
    def _one_source(self) -> RouterConfig:
        if (self.kind is None) == (self.artifact is None):
            raise ValueError(
                "give exactly one of `kind` (built-in router) or `artifact` (trained router path)"
            )
        return self


class ServeConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    experts: dict[Name, ExpertConfig] = Field(min_length=1)
    routers: dict[Name, RouterConfig] = Field(default_factory=dict)
    routing_models: dict[Name, Name] = Field(
        default_factory=dict, description="model name a client sends → router name (default: auto → first)"
    )
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    @model_validator(mode="after")
    def _cross_references(self) -> ServeConfig:
        experts = set(self.experts)
        for name, expert in self.experts.items():
            if expert.fallback is not None and expert.fallback not in experts:
                raise ValueError(f"experts.{name}.fallback: unknown expert {expert.fallback!r}")
            if expert.fallback == name:
                raise ValueError(f"experts.{name}.fallback: an expert cannot fall back to itself")
        for name, router in self.routers.items():
            for e in [*(router.experts or []), *([router.fallback] if router.fallback else [])]:
                if e not in experts:
                    raise ValueError(f"routers.{name}: unknown expert {e!r}")
        if self.routers and not self.routing_models:
            self.routing_models = {"auto": next(iter(self.routers))}
        for model, router in self.routing_models.items():
            if router not in self.routers:
                raise ValueError(f"routing_models.{model}: unknown router {router!r}")
            if model in experts:
                raise ValueError(f"routing_models.{model}: the name is already an expert's")
        return self

    def resolve_paths(self, base: Path) -> ServeConfig:
        """Resolve `./` and `../` model and artifact paths against `base` (the config file's folder)."""

        def fix(p: str) -> str:
            if p.startswith(("./", "../")):
                return str((base / p).resolve())
            return str(Path(p).expanduser()) if p.startswith("~") else p  # absolute, cwd-relative or an id

        for expert in self.experts.values():
            if isinstance(expert, VllmExpert):
                expert.model = fix(expert.model)
        for router in self.routers.values():
            if router.artifact is not None:
                router.artifact = fix(router.artifact)
        return self


class ConfigError(ValueError):
    """A config that cannot be used; the message names each offending field."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, base: Path | None = None) -> ServeConfig:
    if not isinstance(data, dict):
        raise ConfigError("(top level): the config must be a YAML mapping")
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    return config.resolve_paths(base) if base is not None else config


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    return parse_config(data, base=path.resolve().parent)


def missing_paths(config: ServeConfig) -> list[str]:
    """Local model and artifact paths that do not exist, as `field: path` lines."""
    out = []
    for name, expert in config.experts.items():
        if (
            isinstance(expert, VllmExpert)
            and expert.model.startswith("/")
            and not Path(expert.model).exists()
        ):
            out.append(f"experts.{name}.model: {expert.model}")
    for name, router in config.routers.items():
        if router.artifact is not None and not Path(router.artifact).exists():
            out.append(f"routers.{name}.artifact: {router.artifact}")
    return out
