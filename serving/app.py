"""The HTTP surface: OpenAI's endpoints plus /health, /ready and /metrics, over a Gateway.

Every answer carries the routing decision: in headers (`x-moerge-expert`, `x-moerge-router`,
`x-moerge-confidence`) and in a `moerge` field of the body (or of the first stream chunk), which
OpenAI clients ignore and moerge-aware ones read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.base import Decision, latest_user_text
from serving.backends.base import BackendStreamError, Endpoint, JSONResult, StreamResult
from serving.config import ServeConfig
from serving.errors import error_body, install_error_handlers, normalize_error
from serving.gateway import Gateway, Served
from serving.limits import BodySizeLimit
from serving.metrics import Metrics
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    install_openapi_schemas,
    parse_body,
    prompt_messages,
    request_body,
)

log = logging.getLogger("moerge.serving")
_DONE = b"data: [DONE]\n\n"
_SEP = (",", ":")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (bad JSON, missing or invalid field, context overflow)"},
    404: {"description": "Unknown model"},
    413: {"description": "Request body too large"},
    503: {"description": "No backend could serve the request"},
}


def create_app(config: ServeConfig, metrics: Metrics | None = None) -> FastAPI:
    gateway = Gateway(config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="moerge",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible gateway routing each request to a recycled expert LLM.",
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.server.max_body_bytes)

    @app.post("/v1/chat/completions", responses=_ERRORS, openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        payload, body = await parse_body(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return await _serve(gateway, request, "chat", body.model, payload, messages)

    @app.post("/v1/completions", responses=_ERRORS, openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        payload, body = await parse_body(request, CompletionRequest)
        return await _serve(
            gateway, request, "completions", body.model, payload, prompt_messages(body.prompt)
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": gateway.models()}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: every backend is up (last probe passed, breaker not open)."""
        ok, backends = gateway.readiness()
        return JSONResponse({"ready": ok, "backends": backends}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        gateway.update_gauges()
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi_schemas(app, [ChatCompletionRequest, CompletionRequest])
    return app


def decision_headers(decision: Decision, served: str) -> dict[str, str]:
    headers = {
        "x-moerge-expert": served,
        "x-moerge-router": decision.router,
        "x-moerge-confidence": f"{decision.confidence:.4f}",
        "x-moerge-reason": decision.reason.replace("→", "->").encode("ascii", "replace").decode(),
    }
    if served != decision.expert:
        headers["x-moerge-routed-expert"] = decision.expert
    return headers


def extension(decision: Decision, served: Served, requested: str) -> dict[str, Any]:
    return {
        "expert": served.expert,
        "requested_model": requested,
        "router": decision.router,
        "router_version": decision.version,
        "confidence": decision.confidence,
        "reason": decision.reason,
        "scores": decision.scores,
        "routed_expert": decision.expert,
        "fallback": served.expert != decision.expert,
        "attempts": served.attempts,
    }


async def _serve(
    gateway: Gateway,
    request: Request,
    endpoint: Endpoint,
    model: str,
    payload: dict[str, Any],
    messages: list[dict[str, Any]],
) -> Response:
    start = time.perf_counter()
    m = gateway.metrics
    decision = await gateway.decide(model, messages, request.headers.get("x-moerge-previous-expert"))
    _log_decision(gateway, request, model, decision, messages)
    # Until the first event (streaming) or the full answer, a client that leaves cancels the backend
    # request; once streaming, Starlette's own disconnect watch cancels the relay, which closes it.
    served = await _cancel_on_disconnect(
        request, gateway.dispatch(endpoint, payload, request, decision.expert)
    )
    if served is None:  # the client left; the backend request was cancelled, which aborts it
        m.requests.labels(endpoint, model, decision.expert, "499").inc()
        return Response(status_code=499)
    headers = decision_headers(decision, served.expert)
    ext = extension(decision, served, model)
    result = served.result
    if isinstance(result, JSONResult):
        m.requests.labels(endpoint, model, served.expert, str(result.status)).inc()
        m.latency.labels(endpoint, served.expert, "false").observe(time.perf_counter() - start)
        status = result.status
        if status == 200 and isinstance(result.body, dict):
            result.body["moerge"] = ext
            body = result.body
        elif status == 200:  # a 200 that is not a JSON object: the backend is not speaking OpenAI
            status, body = (
                502,
                error_body(
                    f"The expert `{served.expert}` sent an invalid answer.",
                    "server_error",
                    None,
                    "bad_backend_response",
                ),
            )
        else:
            body = normalize_error(status, result.body)
        return Response(
            json.dumps(body, separators=_SEP).encode(),
            status_code=status,
            media_type="application/json",
            headers=headers,
        )
    m.requests.labels(endpoint, model, served.expert, "200").inc()
    return ClosingStreamingResponse(
        _relay(gateway, endpoint, served.expert, result, ext, start),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends, however it ends.

    When a client disconnects, Starlette cancels the sending task; if that lands while the relay is
    parked at a `yield`, the generator is merely dropped and its `finally` (which aborts the backend
    request) would wait for garbage collection. Closing it here makes the abort immediate.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _relay(
    gateway: Gateway, endpoint: str, expert: str, result: StreamResult, ext: dict[str, Any], start: float
) -> AsyncIterator[bytes]:
    """Relay a backend stream; a failure after the first event ends it with an error event, never a hang."""
    m, idle_s = gateway.metrics, gateway.config.timeouts.idle_s
    done = False
    try:
        yield _with_extension(result.first, ext)
        m.ttft.labels(expert).observe(time.perf_counter() - start)
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    event = await anext(result.rest)
            except StopAsyncIteration:
                break
            if event.startswith(_DONE):
                done = True
            yield event
        if not done:
            raise BackendStreamError("the backend closed the stream before it was complete")
    except (BackendStreamError, TimeoutError, OSError) as err:
        reason = "no event within the idle timeout" if isinstance(err, TimeoutError) else str(err)
        log.warning("stream from expert %s failed after the first event: %s", expert, reason)
        gateway.record_stream_failure(expert, reason)
        body = error_body(
            f"The expert `{expert}` failed mid-stream: {reason}", "server_error", None, "backend_stream_error"
        )
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
        yield _DONE
    finally:
        await result.close()
        m.latency.labels(endpoint, expert, "true").observe(time.perf_counter() - start)


def _with_extension(event: bytes, ext: dict[str, Any]) -> bytes:
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return event
    if not isinstance(chunk, dict):
        return event
    chunk["moerge"] = ext
    return b"data: " + json.dumps(chunk, separators=_SEP).encode() + b"\n\n"


async def _cancel_on_disconnect(request: Request, work: Any) -> Served | None:
    """Run `work`, cancelling it if the client disconnects first (cancelling aborts the backend request).

    A stream obtained just as the client left is closed here, so its backend request is aborted too.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(BaseException):
        served = await task
        if isinstance(served.result, StreamResult):
            await served.result.close()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _log_decision(
    gateway: Gateway, request: Request, model: str, decision: Decision, messages: list[dict[str, Any]]
) -> None:
    if not gateway.config.server.log_decisions or not log.isEnabledFor(logging.INFO):
        return
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
    extra = ""
    if gateway.config.server.log_prompts:
        extra = f" prompt={latest_user_text(messages)[:500]!r}"
    log.info(
        "route id=%s model=%s expert=%s router=%s confidence=%.3f reason=%s%s",
        rid,
        model,
        decision.expert,
        decision.router,
        decision.confidence,
        decision.reason,
        extra,
    )
