"""The `moerge serve` configuration: one YAML file, validated by pydantic so every error names its field.

Paths in the file are relative to the file itself (or to `paths_relative_to`), so an example config can
point at a zoo built beside it: moerge's one rule (moerge/config_base.py, which also owns `ConfigError`
and the error wording). A model is a path when written `./x`, `../x`, `~/x` or `/x`, else a model id.
Whether those paths exist is checked separately (`missing_paths`), so the schema can be validated on a
machine that has not built the models. The models are not frozen: validation fills in defaults that
depend on other sections (routing_models, the LoRA families' experts) and the CLI overrides the address.
May import: moerge.config_base, pydantic, serving.engine_args, and router's kind registry (router.base,
router.heads) to check router kinds by name (serving's other modules import it, not the reverse).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moerge.config_base import ConfigError as ConfigError  # the one ConfigError, raised here too
from moerge.config_base import (
    ConfigPathStr,
    ModelRef,
    MutableConfigModel,
    base_dir,
    read_yaml_mapping,
    resolve_path,
    validate_config,
)
from serving.engine_args import check_engine_args

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Strict(MutableConfigModel):
    """Extra fields are errors; not frozen (see the module's first lines)."""


class ServerConfig(_Strict):
    """Where the gateway listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get a 413")
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request body must arrive whole within this (408 after)"
    )
    allowed_hosts: list[str] | None = Field(
        None,
        min_length=1,
        description="Host header values served (e.g. [api.example.com, '*.example.com']); others get "
        "400 (null: any host)",
    )
    log_decisions: bool = Field(
        False, description="log one line per routing decision (metrics count them anyway)"
    )
    log_prompts: bool = Field(False, description="include the prompt in decision logs (off: privacy)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one JSON object per log line, with the request id (serving/logging_json.py)",
    )
    access_log: bool = False
    max_concurrent_requests: int | None = Field(
        256,
        ge=1,
        description="requests served at once (streams until they end); more get a fast 503 (null: no cap)",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="serve /metrics on this port (same host) instead of the API port (null: the API port)",
    )
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (turn off in production)")
    drain_s: float = Field(
        30.0, ge=0, le=3600, description="on shutdown, how long open requests and streams may finish"
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="most tokens a request may ask for (max_tokens / max_completion_tokens / "
        "max_output_tokens; 400 beyond)",
    )
    max_stored_responses: int = Field(
        10000,
        ge=0,
        le=10_000_000,
        description="Responses API: ids of answers kept for `previous_response_id` (the oldest are "
        "forgotten, in-process engines drop them too; 0: nothing is stored)",
    )


class Timeouts(_Strict):
    """Deadlines per backend attempt; an attempt that misses one counts as a backend failure."""

    connect_s: float = Field(5.0, gt=0)
    first_token_s: float = Field(60.0, gt=0, description="request sent → first streamed event")
    idle_s: float = Field(60.0, gt=0, description="longest gap between two streamed events")
    total_s: float = Field(600.0, gt=0, description="whole non-streaming request")


class RetryConfig(_Strict):
    """Retries and fallbacks: at most (1 + max_fallbacks) experts x (1 + attempts) tries per request."""

    attempts: int = Field(1, ge=0, le=5, description="extra tries on the same expert before its fallback")
    backoff_s: float = Field(0.05, ge=0, le=10)
    max_fallbacks: int = Field(3, ge=0, le=16, description="fallback experts tried after the decided one")


class BreakerConfig(_Strict):
    """Circuit breaker per backend, fed by requests and by a periodic health probe."""

    failure_threshold: int = Field(3, ge=1)
    reset_after_s: float = Field(10.0, gt=0, description="open → half-open after this long")
    health_interval_s: float = Field(5.0, gt=0)


class BatchingConfig(_Strict):
    """Router micro-batching: requests that arrive while a batch is being decided join the next one."""

    max_batch: int = Field(64, ge=1)
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="extra wait to grow a batch (0: none)")
    max_queue: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="requests waiting per router; beyond, serving requests get the router's fallback "
        "expert and shadow decisions are shed",
    )


class _ExpertBase(_Strict):
    fallback: Name | None = Field(None, description="expert to try when this one is down or failing")
    description: str = ""


class VllmExpert(_ExpertBase):
    """An in-process vLLM async engine (the embedded default)."""

    backend: Literal["vllm"]
    model: ModelRef = Field(
        min_length=1, description="checkpoint folder (./x, ../x: relative to this file) or model id"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="`vllm serve` options, e.g. max_model_len: 256, enforce_eager: true"
    )
    tool_call_parser: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="vLLM's tool-call parser for this model (`--tool-call-parser`: hermes, llama3_json, "
        "pythonic...): tool_choice `required` or a named function needs one; checked against the pinned "
        "vLLM's parsers at start and by --check",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description="tool_choice `auto`: the model decides when to call tools (`--enable-auto-tool-choice`; "
        "needs tool_call_parser)",
    )

    @model_validator(mode="after")
    def _safe_engine_args(self) -> VllmExpert:
        try:
            check_engine_args(self.engine_args)
        except ValueError as err:
            raise ValueError(f"engine_args: {err}") from None
        keys = {k.replace("-", "_") for k in self.engine_args}
        if both := sorted(keys & {"tool_call_parser", "enable_auto_tool_choice"}):
            raise ValueError(f"engine_args: {', '.join(both)}: set it on the expert, not in engine_args")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self

    def engine_options(self) -> dict[str, Any]:
        """`engine_args` plus the tool-calling options, as the engine gets them."""
        out = dict(self.engine_args)
        if self.tool_call_parser is not None:
            out["tool_call_parser"] = self.tool_call_parser
        if self.enable_auto_tool_choice:
            out["enable_auto_tool_choice"] = True
        return out


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


class LoraMember(_ExpertBase):
    """An expert of a LoRA family (`lora:`): one adapter of the family's engine, or its base.

    Written by moerge when it expands the `lora` section into experts, never in `experts:` itself.
    """

    backend: Literal["lora"]
    family: Name
    adapter: Name | None = Field(None, description="the adapter (None: the family's base model)")


ExpertConfig = Annotated[VllmExpert | OpenAIExpert | LoraMember, Field(discriminator="backend")]
BaseEngineConfig = Annotated[VllmExpert | OpenAIExpert, Field(discriminator="backend")]

# vLLM engine args that the `lora` family sets itself (from its own fields and adapters).
LORA_ENGINE_ARGS = ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules")


class LoraAdapterConfig(_Strict):
    """One PEFT LoRA adapter of a family: an expert of its own, named by its key."""

    path: ConfigPathStr | None = Field(
        None,
        description="PEFT folder (adapter_config.json + adapter_model.safetensors); required in-process, "
        "checked when local for a remote engine",
    )
    served_name: str | None = Field(
        None, min_length=1, description="remote engines: the adapter's name there (default: the key)"
    )
    fallback: Name | None = Field(None, description="expert tried when this one fails (default: the base)")
    description: str = ""


class LoraFamilyConfig(_Strict):
    """One engine serving a base model and many LoRA adapters, each adapter an expert of its own.

    `base` is an in-process engine (`backend: vllm`: moerge enables LoRA on it and loads the adapters)
    or a remote one (`backend: openai`: `vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`;
    each adapter is the `model` of the upstream request).
    """

    base: BaseEngineConfig
    base_expert: Name | None = Field(
        None, description="the expert name of the base model (default: the family name)"
    )
    serve_base: bool = Field(True, description="serve the base model as an expert too")
    base_mode: Literal["zero-adapter", "plain"] = Field(
        "zero-adapter",
        description="zero-adapter: the base is served as an adapter whose weights are 0, so it is never a "
        "no-adapter row in a batch with adapters (vLLM's CPU LoRA kernels add the last slot's adapter to "
        "those rows); plain: requests for the base carry no adapter (correct on GPUs)",
    )
    zero_adapter: str | None = Field(
        None,
        min_length=1,
        description="remote engines in zero-adapter mode: the name the engine serves a zero adapter as "
        "(`python -m serving lora zero-adapter ADAPTER OUT` writes one); in-process moerge writes its own",
    )
    discover: bool = Field(
        True,
        description="remote engines: adapters the engine lists in /v1/models (and no config names) become "
        "experts too, at start and on POST /admin/lora/FAMILY/sync",
    )
    max_loras: int | None = Field(
        None, ge=1, description="adapters in one batch (default: every adapter, the zero adapter included)"
    )
    max_lora_rank: int = Field(16, description="largest adapter rank (one of vLLM's allowed ranks)")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters kept in CPU memory (>= max_loras)")
    adapters: dict[Name, LoraAdapterConfig] = Field(default_factory=dict)

    @field_validator("adapters", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _allowed_rank(cls, rank: int) -> int:
        from serving.lora import ALLOWED_RANKS

        if rank not in ALLOWED_RANKS:
            raise ValueError(f"{rank} is not a rank vLLM allows ({', '.join(map(str, ALLOWED_RANKS))})")
        return rank

    @model_validator(mode="after")
    def _engine(self) -> LoraFamilyConfig:
        in_process = isinstance(self.base, VllmExpert)
        if in_process:
            keys = {k.replace("-", "_") for k in self.base.engine_args}  # type: ignore[union-attr]
            if clash := sorted(keys & set(LORA_ENGINE_ARGS)):
                raise ValueError(
                    f"base.engine_args: {', '.join(clash)} are set by the family (max_loras, max_lora_rank, "
                    "max_cpu_loras, adapters)"
                )
            for name, adapter in self.adapters.items():
                if adapter.path is None:
                    raise ValueError(f"adapters.{name}.path: required for an in-process engine")
                if adapter.served_name is not None:
                    raise ValueError(f"adapters.{name}.served_name: only for remote engines")
            if self.zero_adapter is not None:
                raise ValueError("zero_adapter: only for remote engines (in-process, moerge writes it)")
        elif self.serve_base and self.base_mode == "zero-adapter" and self.zero_adapter is None:
            raise ValueError(
                "zero_adapter: a remote engine in base_mode zero-adapter must serve a zero adapter "
                "(`python -m serving lora zero-adapter ADAPTER OUT`, then --lora-modules NAME=OUT); "
                "name it here, or set base_mode: plain"
            )
        max_loras = self.max_loras
        if max_loras is None and in_process:  # the default: every adapter, the zero adapter included
            max_loras = max(1, len(self.adapters) + self.uses_zero_adapter())
        if max_loras is not None and self.max_cpu_loras is not None and self.max_cpu_loras < max_loras:
            raise ValueError(
                f"max_cpu_loras: {self.max_cpu_loras} must be >= max_loras ({max_loras}"
                + ("" if self.max_loras else ": every adapter and the zero adapter")
                + "), as vLLM requires"
            )
        if self.base.fallback is not None and not self.serve_base:
            raise ValueError("base.fallback: the base is not served (serve_base: false)")
        return self

    def uses_zero_adapter(self) -> bool:
        return self.serve_base and self.base_mode == "zero-adapter"

    def engine_lora_args(self, extra_modules: list[str] | None = None) -> dict[str, Any]:
        """The vLLM engine args of an in-process family: LoRA on, its adapters (and `extra_modules`,
        `NAME=PATH`, e.g. the zero adapter) as static LoRA modules; max_loras defaults to all of them."""
        modules = [f"{name}={a.path}" for name, a in self.adapters.items()] + list(extra_modules or [])
        args: dict[str, Any] = {
            "enable_lora": True,
            "max_loras": self.max_loras or max(1, len(modules)),
            "max_lora_rank": self.max_lora_rank,
        }
        if self.max_cpu_loras is not None:
            args["max_cpu_loras"] = self.max_cpu_loras
        if modules:
            args["lora_modules"] = modules
        return args


class PerplexityParams(_Strict):
    """`params` of a `perplexity` router: the softmax, and how each candidate's engine is asked."""

    temperature: float = Field(1.0, gt=0, description="softmax temperature over the negated mean NLLs")
    timeout_s: float = Field(10.0, gt=0, description="a candidate that has not scored by then is skipped")
    max_chars: int = Field(4096, ge=1, description="the routing text is cut (middle out) to this length")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="each engine keeps the prompt's last N tokens (vLLM truncate_prompt_tokens)"
    )


class RouterConfig(_Strict):
    """A built-in router kind (`fixed`, `random`, ...) or a trained router artifact directory.

    For `perplexity`, `experts` are the candidates whose engines score the prompt (default: all served
    experts) and `params` are `PerplexityParams`."""

    kind: str | None = None
    artifact: ConfigPathStr | None = Field(None, description="a trained router's folder")
    params: dict[str, Any] = Field(default_factory=dict)
    experts: list[Name] | None = Field(
        None, description="experts a built-in kind chooses from (default: all)"
    )
    fallback: Name | None = Field(None, description="expert used if the router itself fails")
    digest: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="pins a trained artifact: any other content is refused (`moerge router digest DIR`)",
    )
    serve_as: dict[str, Name] | None = Field(
        None,
        description="a trained artifact's classes re-mapped to other served experts (over its own "
        "serve_as): e.g. the same domain router sending math to a merged MoE or to the math adapter",
    )

    @field_validator("kind")
    @classmethod
    def _built_in_kind(cls, kind: str | None) -> str | None:
        """A kind named by the router registry; a trained kind is served from its `artifact` instead."""
        if kind is None:
            return kind
        from router.base import router_kinds
        from router.heads import head_kinds

        trained = head_kinds()
        if kind in trained:
            raise ValueError(f"router kind {kind!r} is trained: give `artifact: DIR` (its artifact) instead")
        built_in = [k for k in router_kinds() if k not in trained]
        if kind not in built_in:
            raise ValueError(f"unknown router kind {kind!r}; built-in kinds: {', '.join(built_in)}")
        return kind

    @model_validator(mode="after")
    def _one_source(self) -> RouterConfig:
        if (self.kind is None) == (self.artifact is None):
            raise ValueError(
                "give exactly one of `kind` (built-in router) or `artifact` (trained router path)"
            )
        if self.digest is not None and self.artifact is None:
            raise ValueError("`digest` pins a trained `artifact`; a built-in kind has none")
        if self.serve_as is not None and self.artifact is None:
            raise ValueError("`serve_as` re-maps a trained `artifact`'s classes; a built-in kind has none")
        if self.kind == "perplexity":
            self.perplexity_params()
        return self

    def perplexity_params(self) -> PerplexityParams:
        """The checked `params` of a perplexity router (errors name `params.FIELD`)."""
        try:
            return PerplexityParams.model_validate(self.params)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(
                f"params.{where}: {first['msg']} (a perplexity router takes "
                f"{', '.join(PerplexityParams.model_fields)})"
            ) from None


SHA256_HEX = r"^[0-9a-f]{64}$"


class ApiKey(_Strict):
    """One client key, stored as the sha256 of the key (`moerge keys hash` prints it), never in clear."""

    sha256: str = Field(pattern=SHA256_HEX, description="hex sha256 of the key the client sends")
    models: list[Name] | None = Field(None, description="models this key may use (default: all)")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")
    max_tokens: int | None = Field(
        None, ge=1, description="most tokens one request of this key may ask for (below server.max_tokens)"
    )


class AdminKey(_Strict):
    """An admin key (register/unregister adapters at runtime), stored as its sha256 like user keys."""

    sha256: str = Field(pattern=SHA256_HEX, description="hex sha256 of the key (`moerge keys hash`)")


class AuthConfig(_Strict):
    """Bearer API keys for /v1/*. No keys: the gateway is open (bind it to loopback)."""

    keys: dict[Name, ApiKey] = Field(default_factory=dict, description="key name → hashed key and limits")
    admin_keys: dict[Name, AdminKey] = Field(
        default_factory=dict,
        description="keys of the admin API (/admin/*), separate from user keys; none: the admin API is off",
    )

    @model_validator(mode="after")
    def _unique_hashes(self) -> AuthConfig:
        seen: dict[str, str] = {}
        for section, keys in (("keys", self.keys), ("admin_keys", self.admin_keys)):
            for name, key in keys.items():
                if key.sha256 in seen:
                    raise ValueError(f"{section}.{name}.sha256: the same key as {seen[key.sha256]}")
                seen[key.sha256] = f"{section}.{name}"
        return self


class ArmConfig(_Strict):
    """One arm of an experiment: a router (by name, from `routers`) or a fixed expert, with a weight."""

    router: Name | None = None
    expert: Name | None = None
    weight: float = Field(1.0, gt=0, description="relative share of the experiment's traffic")

    @model_validator(mode="after")
    def _one_policy(self) -> ArmConfig:
        if (self.router is None) == (self.expert is None):
            raise ValueError("give exactly one of `router` (a router name) or `expert` (always this expert)")
        return self


ASSIGN_BY = r"^(user|api_key|header:[A-Za-z0-9-]{1,64})$"


class ExperimentConfig(_Strict):
    """An A/B test between routing policies, reached through a routing model that names it.

    Assignment is sticky: sha256(salt + key) picks the arm, so the same user gets the same arm on
    every request and after every restart; changing the salt reshuffles everyone.
    """

    enabled: bool = Field(True, description="off: everyone gets the control arm, nothing is attributed")
    arms: dict[Name, ArmConfig] = Field(min_length=1)
    control: Name | None = Field(None, description="the baseline arm of the report (default: the first)")
    assign_by: str = Field(
        "user",
        pattern=ASSIGN_BY,
        description="user (OpenAI `user` field), api_key, or header:NAME; requests without one are "
        "assigned per request (not sticky)",
    )
    salt: str | None = Field(None, max_length=128, description="hash salt (default: the experiment name)")
    traffic: float = Field(
        1.0, ge=0, le=1, description="share of keys in the experiment; the rest get control, unattributed"
    )
    shadow: list[Name] = Field(
        default_factory=list, description="routers that decide every request too; logged, never served"
    )

    @model_validator(mode="after")
    def _control_arm(self) -> ExperimentConfig:
        if self.control is None:
            self.control = next(iter(self.arms))
        elif self.control not in self.arms:
            raise ValueError(f"control: unknown arm {self.control!r} (arms: {', '.join(self.arms)})")
        return self


LABEL_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
DEFAULT_FEEDBACK_LABELS = ("good", "bad", "thumbs_up", "thumbs_down", "wrong_expert")


class DecisionLogConfig(_Strict):
    """One row per request in a SQL database (SQLAlchemy): SQLite by default, PostgreSQL by URL."""

    enabled: bool = False
    url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. sqlite:///decisions.db (relative to the config file) or "
        "postgresql://user@host:5432/moerge (default: sqlite next to the config)",
    )
    url_env: str | None = Field(None, description="environment variable holding the URL (wins over url)")
    store_prompts: bool = Field(False, description="store the prompt text (off: only its sha256)")
    queue_size: int = Field(10000, ge=1, le=10_000_000, description="rows buffered; beyond, rows are dropped")
    batch_size: int = Field(256, ge=1, le=100_000)
    flush_interval_s: float = Field(0.5, gt=0, le=60)
    connect_timeout_s: float = Field(3.0, gt=0, le=60)
    feedback_labels: list[Annotated[str, Field(pattern=LABEL_PATTERN)]] = Field(
        default_factory=lambda: list(DEFAULT_FEEDBACK_LABELS),
        max_length=64,
        description="feedback labels counted by name in moerge_ab_feedback_total; any other label is "
        "counted as `other` (the decision log stores it as sent)",
    )

    @field_validator("feedback_labels")
    @classmethod
    def _own_labels(cls, labels: list[str]) -> list[str]:
        if reserved := sorted({"score", "other"} & set(labels)):
            raise ValueError(f"{reserved} are the metric's own labels (no label, any other label)")
        return labels

    def metric_label(self, label: str | None) -> str:
        """The `label` of moerge_ab_feedback_total for a feedback: bounded, whatever a client sends."""
        if label is None:
            return "score"
        return label if label in self.feedback_labels else "other"

    def resolved_url(self) -> str:
        """The URL to connect to (url_env first), driver-mapped; ValueError naming the field if unusable."""
        if self.url_env and (env := os.environ.get(self.url_env)):
            try:
                return check_db_url(env)
            except ValueError as err:
                raise ValueError(f"decision_log.url_env ({self.url_env}): {err}") from None
        return check_db_url(self.url or "sqlite:///moerge-decisions.db")

    @field_validator("url")
    @classmethod
    def _sqlite_beside_config(cls, url: str | None, info: ValidationInfo) -> str | None:
        """A relative SQLite file is relative to the config file, as every path in it."""
        if url is not None and url.startswith("sqlite:///"):
            file = url[len("sqlite:///") :]
            if file and file != ":memory:" and not file.startswith(("/", "file:")):
                return "sqlite:///" + str(resolve_path(file, base_dir(info)))
        return url

    @model_validator(mode="after")
    def _valid_url(self) -> DecisionLogConfig:
        if self.url is not None:
            check_db_url(self.url)
        return self


def check_db_url(url: str) -> str:
    """The URL with `postgresql://` mapped to psycopg 3; ValueError for anything SQLAlchemy cannot use."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"url: not a database URL: {err}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"url: only sqlite and postgresql are supported, not {parsed.get_backend_name()!r}")
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class TracingConfig(_Strict):
    """OpenTelemetry spans per request, if the `opentelemetry` packages are installed (extra `otel`)."""

    enabled: bool = False
    service_name: str = "moerge-gateway"
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint; unset: the global tracer provider (or OTEL_* env)"
    )


class ServeConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    experts: dict[Name, ExpertConfig] = Field(default_factory=dict)
    lora: dict[Name, LoraFamilyConfig] = Field(
        default_factory=dict,
        description="LoRA families: one engine (base) and its adapters, each adapter an expert",
    )
    lora_state_file: ConfigPathStr | None = Field(
        None,
        description="where adapters registered at runtime are saved (default: CONFIG.lora-state.json beside "
        "the config file; null with a config given as data: not saved)",
    )
    paths_relative_to: str | None = Field(
        None,
        description="the folder this file's relative paths are relative to (default: the file's own; "
        "`moerge up` sets it to the topology's folder in the gateway config it generates)",
    )
    routers: dict[Name, RouterConfig] = Field(default_factory=dict)
    routing_models: dict[Name, Name] = Field(
        default_factory=dict,
        description="model name a client sends → router or experiment name (default: auto → first router)",
    )
    experiments: dict[Name, ExperimentConfig] = Field(default_factory=dict)
    decision_log: DecisionLogConfig = Field(default_factory=DecisionLogConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_hand_written_members(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("experts"), dict):
            for name, expert in data["experts"].items():
                if isinstance(expert, dict) and expert.get("backend") == "lora":
                    raise ValueError(f"experts.{name}.backend: lora experts are declared under `lora:`")
        return data

    def _expand_lora(self) -> None:
        """Each family's base and adapters become experts (`LoraMember`), checked for name clashes."""
        for family, fam in self.lora.items():
            members: dict[str, LoraMember] = {}
            base_name = fam.base_expert or family
            if fam.serve_base:
                members[base_name] = LoraMember(
                    backend="lora",
                    family=family,
                    adapter=None,
                    fallback=fam.base.fallback,
                    description=fam.base.description,
                )
            for name, adapter in fam.adapters.items():
                fallback = adapter.fallback or (base_name if fam.serve_base else None)
                members[name] = LoraMember(
                    backend="lora",
                    family=family,
                    adapter=name,
                    fallback=fallback,
                    description=adapter.description,
                )
            if fam.serve_base and base_name in fam.adapters:
                raise ValueError(f"lora.{family}.adapters.{base_name}: the name is the base expert's")
            for name, member in members.items():
                if name in self.experts:
                    where = "adapters." + name if member.adapter else "base_expert"
                    raise ValueError(f"lora.{family}.{where}: {name!r} is already an expert's name")
                self.experts[name] = member

    @model_validator(mode="after")
    def _decision_log_beside_config(self, info: ValidationInfo) -> ServeConfig:
        """The decision log's default SQLite file lies beside the config file (the current folder
        for a config given as data), never in a process's working folder by accident."""
        if self.decision_log.url is None:
            self.decision_log.url = f"sqlite:///{base_dir(info) / 'moerge-decisions.db'}"
        return self

    @model_validator(mode="after")
    def _cross_references(self) -> ServeConfig:
        self._expand_lora()
        if not self.experts:
            raise ValueError("experts: at least one expert (or a `lora` family) is needed")
        experts = set(self.experts)
        for name, expert in self.experts.items():
            if expert.fallback is not None and expert.fallback not in experts:
                raise ValueError(f"experts.{name}.fallback: unknown expert {expert.fallback!r}")
            if expert.fallback == name:
                raise ValueError(f"experts.{name}.fallback: an expert cannot fall back to itself")
        for name, router in self.routers.items():
            for e in router.experts or []:
                if e not in experts:
                    raise ValueError(
                        f"routers.{name}.experts: unknown expert {e!r}; served experts: {', '.join(self.experts)}"
                    )
            if router.fallback is not None and router.fallback not in experts:
                raise ValueError(f"routers.{name}.fallback: unknown expert {router.fallback!r}")
        for name in self.experiments:
            if name in self.routers:
                raise ValueError(f"experiments.{name}: the name is already a router's")
        for name, exp in self.experiments.items():
            for arm_name, arm in exp.arms.items():
                if arm.router is not None and arm.router not in self.routers:
                    raise ValueError(
                        f"experiments.{name}.arms.{arm_name}.router: unknown router {arm.router!r}"
                    )
                if arm.expert is not None and arm.expert not in experts:
                    raise ValueError(
                        f"experiments.{name}.arms.{arm_name}.expert: unknown expert {arm.expert!r}"
                    )
            for shadow in exp.shadow:
                if shadow not in self.routers:
                    raise ValueError(f"experiments.{name}.shadow: unknown router {shadow!r}")
        if self.routers and not self.routing_models:
            self.routing_models = {"auto": next(iter(self.routers))}
        for model, target in self.routing_models.items():
            if target not in self.routers and target not in self.experiments:
                raise ValueError(f"routing_models.{model}: unknown router or experiment {target!r}")
            if model in experts:
                raise ValueError(f"routing_models.{model}: the name is already an expert's")
        for key_name, key in self.auth.keys.items():
            for m in key.models or []:
                if m not in experts and m not in self.routing_models:
                    raise ValueError(f"auth.keys.{key_name}.models: unknown model {m!r}")
        return self

    def max_tokens_for(self, key: str | None) -> int | None:
        """The max_tokens cap of a request by `key` (None: auth off): the lower of the key's and the server's."""
        caps = [self.server.max_tokens, self.auth.keys[key].max_tokens if key in self.auth.keys else None]
        return min((c for c in caps if c is not None), default=None)


def parse_config(data: Any, base: Path | None = None, source: Path | str | None = None) -> ServeConfig:
    """A serve config from parsed data; relative paths are taken from `base` (default: the folder of
    `source`, else the current folder), or from `paths_relative_to` relative to it."""
    if base is None:
        base = Path(source).resolve().parent if source is not None else Path.cwd()
    if isinstance(data, dict) and isinstance(data.get("paths_relative_to"), str):
        base = resolve_path(data["paths_relative_to"], base)
    config = validate_config(ServeConfig, data, what="serve config", source=source, base=base)
    problems = adapter_problems(config)
    if problems:
        raise ConfigError("\n".join(problems), field=problems[0].split(":")[0], source=source)
    return config


def adapter_problems(config: ServeConfig) -> list[str]:
    """Why vLLM would refuse each local adapter that exists (missing ones are `missing_paths`' job)."""
    from serving.lora import check_adapter

    out = []
    for family, fam in config.lora.items():
        for name, adapter in fam.adapters.items():
            if adapter.path is None or not Path(adapter.path).exists():
                continue
            for problem in check_adapter(adapter.path, fam.max_lora_rank):
                out.append(f"lora.{family}.adapters.{name}.{problem}")
    return out


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    data = read_yaml_mapping(path, what="serve config")
    if data.get("lora"):
        from serving.lora_admin import apply_state, state_path

        state = data.get("lora_state_file")
        state_file = (
            resolve_path(state, _paths_base(data, path))
            if isinstance(state, str)
            else state_path(path.resolve())
        )
        data.setdefault("lora_state_file", str(state_file))
        try:
            data = apply_state(data, state_file)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"lora_state_file: cannot read {state_file}: {err}", field="lora_state_file", source=path
            ) from None
    return parse_config(data, source=path)


def _paths_base(data: dict[str, Any], path: Path) -> Path:
    """The folder the relative paths of the file at `path` are relative to."""
    base = path.resolve().parent
    relative_to = data.get("paths_relative_to")
    return resolve_path(relative_to, base) if isinstance(relative_to, str) else base


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
    for family, fam in config.lora.items():
        if (
            isinstance(fam.base, VllmExpert)
            and fam.base.model.startswith("/")
            and not Path(fam.base.model).exists()
        ):
            out.append(f"lora.{family}.base.model: {fam.base.model}")
        for name, adapter in fam.adapters.items():
            if (
                adapter.path is not None
                and isinstance(fam.base, VllmExpert)
                and not Path(adapter.path).exists()
            ):
                out.append(f"lora.{family}.adapters.{name}.path: {adapter.path}")
    for name, router in config.routers.items():
        if router.artifact is not None and not Path(router.artifact).exists():
            out.append(f"routers.{name}.artifact: {router.artifact}")
    return out
