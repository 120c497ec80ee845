"""An expert served by vLLM's async engine inside the gateway process (the embedded default).

Rather than re-implement chat templating, sampling-parameter mapping, tool calls, structured output and
logprobs, this reuses vLLM's own OpenAI serving classes (`OpenAIServingChat`, `OpenAIServingCompletion`)
(and its Responses and Anthropic Messages serving, `OpenAIServingResponses`, `AnthropicServingMessages`)
over an `AsyncLLM`, set up exactly as `vllm serve` sets them up: the request is validated by vLLM's
protocol models and every field reaches the engine as it would through `vllm serve`. The engine core
runs in its own process (vLLM spawns it), so generation does not compete with the event loop.
May import: serving.backends.base, serving.engine_args, serving.errors, serving.vllm_boundary (every use
of vLLM goes through it), pydantic, starlette.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AsyncExitStack
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import State
from starlette.requests import Request

from serving.backends.base import (
    Backend,
    BackendStreamError,
    BackendUnavailable,
    Endpoint,
    JSONResult,
    StreamResult,
    error_status,
    is_error_event,
    make_event,
)
from serving.engine_args import check_rope_positions, engine_flags
from serving.errors import error_body, validation_message
from serving.vllm_boundary import (
    async_engine_client,
    check_tool_parser,
    check_vllm,
    error_response,
    init_serving_state,
    is_cpu_platform,
    request_models,
    serve_arg_parser,
    validate_serve_args,
)

log = logging.getLogger("moerge.serving")

# Defaults that suit an embedded engine; the expert's engine_args override them.
_DEFAULT_ENGINE_ARGS: dict[str, Any] = {"disable_log_stats": True}


# On CPU, vLLM sizes an engine's KV cache from --gpu-memory-utilization (0.92 of the RAM by default), so
# the first of several embedded engines takes nearly all memory and the next one cannot start. Unless the
# expert's engine_args or VLLM_CPU_KVCACHE_SPACE say otherwise, each embedded engine gets an equal share of
# half the RAM, at most 4 GiB (4 GiB holds ~190k tokens of SmolLM2-135M's cache).
KV_SHARE_OF_RAM = 0.5
KV_CAP_BYTES = 4 * 2**30


def with_cpu_kv_budget(
    engine_args: dict[str, Any], engines: int, total_bytes: int | None = None
) -> dict[str, Any]:
    """The engine args with a KV-cache budget for CPU engines that set none."""
    if {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_args):
        return engine_args
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return engine_args
    if not is_cpu_platform():
        return engine_args
    if total_bytes is None:
        import psutil

        total_bytes = int(psutil.virtual_memory().total)
    budget = int(min(KV_CAP_BYTES, total_bytes * KV_SHARE_OF_RAM / max(1, engines)))
    return {**engine_args, "kv_cache_memory_bytes": budget}


def engine_argv(model: str, served_name: str, engine_args: dict[str, Any]) -> list[str]:
    """`vllm serve` command-line flags for an expert (serving/engine_args.py maps the config's options)."""
    return [
        "--model",
        model,
        "--served-model-name",
        served_name,
        *engine_flags({**_DEFAULT_ENGINE_ARGS, **engine_args}),
    ]


def parse_engine_args(model: str, served_name: str, engine_args: dict[str, Any]) -> Any:
    """vLLM's own parser over the flags: unknown or malformed engine args fail here, by name."""
    parser = serve_arg_parser("moerge-engine")
    try:
        args = parser.parse_args(engine_argv(model, served_name, engine_args))
        validate_serve_args(args)
    except (SystemExit, Exception) as err:  # argparse exits on errors even with exit_on_error=False
        raise ValueError(f"invalid engine_args for expert {served_name!r}: {err}") from None
    if getattr(args, "trust_remote_code", False):
        raise ValueError("trust_remote_code is refused")
    try:
        check_rope_positions(model, engine_args, os.environ)
    except ValueError as err:
        raise ValueError(f"expert {served_name!r}: {err}") from None
    return args


class InProcessBackend(Backend):
    kind = "vllm"

    def __init__(
        self,
        name: str,
        model: str,
        engine_args: dict[str, Any],
        engines: int = 1,
        served_name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.model = model
        self.served_name = served_name or name  # the engine's own model name (`--served-model-name`)
        self.engine_args = engine_args
        self.engines = engines  # embedded engines in this process: they share the CPU KV-cache budget
        self.engine: Any = None
        self.state = State()
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        check_vllm()  # before any vLLM internals are imported
        engine_args = with_cpu_kv_budget(self.engine_args, self.engines)
        if engine_args is not self.engine_args:
            log.info(
                "expert %s: KV cache %.2f GiB (CPU, %d embedded engines; set engine_args.kv_cache_memory_bytes "
                "or VLLM_CPU_KVCACHE_SPACE to choose)",
                self.name,
                engine_args["kv_cache_memory_bytes"] / 2**30,
                self.engines,
            )
        if (
            parser := engine_args.get("tool_call_parser")
        ) is not None and "tool_parser_plugin" not in engine_args:
            check_tool_parser(parser, f"expert {self.name!r}: tool_call_parser")
        args = parse_engine_args(self.model, self.served_name, engine_args)
        self.engine = await self._stack.enter_async_context(async_engine_client(args))
        tasks = await self.engine.get_supported_tasks()
        await init_serving_state(self.engine, self.state, args, tasks)
        if getattr(self.state, "openai_serving_chat", None) is None:
            raise ValueError(f"expert {self.name!r}: the model does not support text generation")
        self._protocol: dict[str, Any] = request_models()
        s = self.state
        self._calls: dict[str, Any] = {
            "chat": s.openai_serving_chat.create_chat_completion,
            "completions": s.openai_serving_completion.create_completion,
        }
        if s.openai_serving_responses is not None:
            # Stored responses are what `previous_response_id` continues (vllm serve needs
            # VLLM_ENABLE_RESPONSES_API_STORE=1). vLLM never evicts them: the gateway keeps a bounded
            # map of the ids it answered and calls `forget_response` for those it drops.
            s.openai_serving_responses.enable_store = True
            self._calls["responses"] = s.openai_serving_responses.create_responses
        if getattr(s, "anthropic_serving_messages", None) is not None:
            self._calls["messages"] = s.anthropic_serving_messages.create_messages
        self._error_type, self._create_error = error_response()

    async def close(self) -> None:
        await self._stack.aclose()
        self.engine = None
        self.state = State()  # drop the serving objects so the shut-down engine is collected now

    async def health(self) -> bool:
        if self.engine is None or self.engine.errored:
            return False
        try:
            await self.engine.check_health()
        except Exception:
            return False
        return True

    def unfinished_requests(self) -> int:
        return 0 if self.engine is None else self.engine.get_num_unfinished_requests()

    async def request(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        raw: Request | None,
        *,
        first_token_s: float,
        total_s: float,
        model: str | None = None,
    ) -> JSONResult | StreamResult:
        """`model`: the engine's name for what serves it (a LoRA adapter's name; default: the base)."""
        if self.engine is None:
            raise BackendUnavailable(f"{self.name}: engine not running")
        payload["model"] = model or self.served_name
        try:
            req = self._protocol[endpoint].model_validate(payload)
        except ValidationError as err:
            message, param, code = validation_message(_public_errors(err))
            return JSONResult(400, error_body(message, "invalid_request_error", param, code))
        except Exception as err:  # vLLM's validators also raise its own errors (VLLMValidationError...)
            error = self._create_error(err)
            return JSONResult(int(error.error.code), error.model_dump())
        if (call := self._calls.get(endpoint)) is None:
            return JSONResult(
                404,
                error_body(
                    f"The expert `{self.name}` does not serve /v1/{endpoint}.", "invalid_request_error"
                ),
            )
        stream = bool(payload.get("stream"))
        result: Any = None
        try:
            async with asyncio.timeout(first_token_s if stream else total_s):
                result = await call(req, raw)
                if stream and not isinstance(result, self._error_type):
                    if endpoint == "responses":  # event objects: SSE as vLLM's router writes them
                        result = _responses_sse(result)
                    first = await _first_event(result)
        except TimeoutError:
            if hasattr(result, "aclose"):
                await result.aclose()  # aborts the engine request
            raise BackendUnavailable(f"{self.name}: no answer within the deadline") from None
        except BackendUnavailable:
            raise
        except Exception as err:
            result = self._create_error(err)
        if isinstance(result, self._error_type):
            status = int(result.error.code)
            if status >= 500:
                raise BackendUnavailable(f"{self.name}: {result.error.message}")
            return JSONResult(status, result.model_dump())
        if not stream:
            if endpoint == "responses":
                return JSONResult(200, result.model_dump(mode="json", by_alias=True))
            if endpoint == "messages":
                return JSONResult(200, result.model_dump(exclude_none=True))
            return JSONResult(200, result.model_dump(exclude_none=False))
        if (event_error := is_error_event(first)) is not None and error_status(event_error) >= 500:
            await result.aclose()
            raise BackendUnavailable(
                f"{self.name}: error before the first token: {event_error.get('message')}"
            )
        return StreamResult(first=first, rest=_events(result), close=result.aclose)

    def forget_response(self, response_id: str) -> None:
        """Drop a stored Responses answer (and its input messages) from the engine's memory."""
        serving = getattr(self.state, "openai_serving_responses", None)
        if serving is not None:
            serving.response_store.pop(response_id, None)
            serving.msg_store.pop(response_id, None)


async def _responses_sse(gen: Any) -> Any:
    """vLLM's Responses stream events as SSE (`event: TYPE`, `data: JSON`), as its own router sends them."""
    try:
        async for event in gen:
            data = event.model_dump_json(indent=None, by_alias=True)
            yield make_event(data, getattr(event, "type", "unknown"))
    finally:
        await gen.aclose()


async def _first_event(gen: Any) -> bytes:
    try:
        event = await anext(gen)
    except StopAsyncIteration:
        raise BackendUnavailable("stream ended before its first event") from None
    except Exception as err:
        await gen.aclose()
        raise BackendUnavailable(f"{type(err).__name__}: {err}") from None
    return event.encode() if isinstance(event, str) else event


async def _events(gen: Any) -> Any:
    try:
        async for event in gen:
            yield event.encode() if isinstance(event, str) else event
    except Exception as err:
        raise BackendStreamError(f"{type(err).__name__}: {err}") from None


_INTERNAL = {
    "function-wrap",
    "function-after",
    "function-before",
    "function-plain",
    "tagged-union",
    "union",
    "chain",
    "nullable",
    "default",
    "lax-or-strict",
    "json-or-python",
}


def _public_errors(err: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors with pydantic-internal location segments (`function-after[...]`) removed."""
    out = []
    for e in err.errors(include_input=False, include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in _INTERNAL)))
        out.append({**e, "loc": loc})
    return out
