"""The HTTP surface: OpenAI's endpoints plus /health, /ready and /metrics, over a Gateway.

Every answer carries the routing decision: in headers (`x-moerge-expert`, `x-moerge-router`,
`x-moerge-confidence`, `x-moerge-request-id`, and `x-moerge-experiment`/`x-moerge-arm` inside an A/B
test) and in a `moerge` field of the body (or of the first stream chunk), which OpenAI clients ignore
and moerge-aware ones read. The request id is what `POST /v1/feedback` takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.middleware.trustedhost import TrustedHostMiddleware

from router.base import Decision, latest_user_text
from serving import lora_admin
from serving.accounting import RequestRecord, Routed
from serving.auth import authenticate_admin, bearer_token, hash_key
from serving.backends.base import BackendStreamError, Endpoint, JSONResult, StreamResult
from serving.config import ServeConfig
from serving.errors import OpenAIError, error_body, install_error_handlers, normalize_error
from serving.gateway import Gateway, Served
from serving.limits import BodyReader, ConcurrencyCap, Slots
from serving.logging_json import request_id_var
from serving.metrics import Metrics
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    check_max_tokens,
    install_openapi_schemas,
    parse_body,
    prompt_messages,
    request_body,
    reserved_tokens,
)

log = logging.getLogger("moerge.serving")
_DONE = b"data: [DONE]\n\n"
_SEP = (",", ":")
_REJECT_STATUS = {
    "body_size": "413",
    "content_type": "415",
    "body_timeout": "408",
    "client_disconnect": "499",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (bad JSON, missing or invalid field, context overflow)"},
    401: {"description": "Missing or wrong API key"},
    403: {"description": "The API key may not use this model"},
    404: {"description": "Unknown model (or, for feedback, unknown request id)"},
    408: {"description": "The request body did not arrive within server.body_timeout_s"},
    413: {"description": "Request body too large"},
    415: {"description": "The body is not JSON (Content-Type must be application/json)"},
    429: {"description": "Rate limit of the API key reached (see Retry-After)"},
    503: {"description": "No backend could serve the request, or the gateway is at its concurrency cap"},
}


def create_app(config: ServeConfig, metrics: Metrics | None = None) -> FastAPI:
    """The app in its steps: the gateway and its slots, the FastAPI object, admission middleware, the
    OpenAI routes, the admin routes, the probes (health, readiness, metrics), the published schemas."""
    gateway = Gateway(config, metrics)
    slots = Slots(config.server.max_concurrent_requests)
    app = _new_app(config, gateway, slots)
    _add_admission(app, config, gateway.metrics, slots)
    _add_openai_routes(app, gateway)
    _add_admin_routes(app, gateway)
    _add_probes(app, config, gateway, slots)
    install_openapi_schemas(
        app,
        [ChatCompletionRequest, CompletionRequest, FeedbackRequest, lora_admin.RegisterAdapter],
        config.server.max_tokens,
    )
    return app


def _new_app(config: ServeConfig, gateway: Gateway, slots: Slots) -> FastAPI:
    """The FastAPI object: its lifespan starts the gateway, then drains open requests and closes it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for open requests (its graceful timeout); any
            # still open here (another server, a keep-alive race) get `drain_s` before backends close.
            slots.draining = True
            await slots.wait_idle(config.server.drain_s)
            await gateway.close()

    docs = config.server.docs  # off: no /docs, /redoc, /openapi.json
    app = FastAPI(
        title="moerge",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible gateway routing each request to a recycled expert LLM.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.gateway = gateway
    app.state.slots = slots
    install_error_handlers(app)
    return app


def _add_admission(app: FastAPI, config: ServeConfig, m: Metrics, slots: Slots) -> None:
    """What a request passes before any route: allowed hosts, the whole body within its deadline, a slot."""

    def rejected(reason: str, path: str) -> None:
        m.rejected.labels(reason).inc()
        m.requests.labels(_endpoint_of(path), "-", "-", _REJECT_STATUS.get(reason, "503")).inc()

    # Starlette runs the middleware added last first: hosts, then the body (read whole, within its
    # deadline, before a slot is taken), then the concurrency cap.
    app.add_middleware(ConcurrencyCap, slots=slots, on_reject=rejected)
    server = config.server
    app.add_middleware(
        BodyReader, max_bytes=server.max_body_bytes, timeout_s=server.body_timeout_s, on_reject=rejected
    )
    if server.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=server.allowed_hosts)


def _add_openai_routes(app: FastAPI, gateway: Gateway) -> None:
    """OpenAI's endpoints (chat, completions, models) and moerge's feedback."""

    @app.post("/v1/chat/completions", responses=_ERRORS, openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await _handle(gateway, request, "chat", ChatCompletionRequest, _chat_messages)

    @app.post("/v1/completions", responses=_ERRORS, openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await _handle(gateway, request, "completions", CompletionRequest, _completion_messages)

    @app.post("/v1/feedback", responses=_ERRORS, openapi_extra=request_body(FeedbackRequest))
    async def post_feedback(request: Request) -> dict[str, Any]:
        """Attach a score and/or label to an answered request (by its `x-moerge-request-id`)."""
        _admit_request(gateway, _authenticate(gateway, request))  # feedback counts like any request
        _, body = await parse_body(request, FeedbackRequest)
        return await record_feedback(gateway, body)

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def list_models(request: Request) -> dict[str, Any]:
        key = _authenticate(gateway, request)
        return {"object": "list", "data": [x for x in gateway.models() if gateway.keys.allowed(key, x["id"])]}


def _add_admin_routes(app: FastAPI, gateway: Gateway) -> None:
    """The admin API (admin keys only): LoRA adapters registered, synced and unregistered at runtime."""

    @app.get("/admin/lora", responses=_ERRORS)
    async def admin_lora_list(request: Request) -> dict[str, Any]:
        """LoRA families and their adapters (admin keys only)."""
        _authenticate_admin(gateway, request)
        return lora_admin.listing(gateway)

    @app.post(
        "/admin/lora/{family}/adapters",
        responses=_ERRORS,
        openapi_extra=request_body(lora_admin.RegisterAdapter),
    )
    async def admin_lora_register(family: str, request: Request) -> dict[str, Any]:
        """Register an adapter on a family's running engine: checked, loaded, then an expert."""
        _authenticate_admin(gateway, request)
        _, body = await parse_body(request, lora_admin.RegisterAdapter)
        async with gateway.lora_admin_lock:
            return await lora_admin.register(gateway, family, body)

    @app.post("/admin/lora/{family}/sync", responses=_ERRORS)
    async def admin_lora_sync(family: str, request: Request) -> dict[str, Any]:
        """Learn a remote family's adapters from its engine's /v1/models."""
        _authenticate_admin(gateway, request)
        async with gateway.lora_admin_lock:
            return await lora_admin.sync_remote(gateway, family)

    @app.delete("/admin/lora/{family}/adapters/{name}", responses=_ERRORS)
    async def admin_lora_unregister(family: str, name: str, request: Request) -> dict[str, Any]:
        """Unregister an adapter: unloaded; requests routed to it take its fallback chain."""
        _authenticate_admin(gateway, request)
        async with gateway.lora_admin_lock:
            return await lora_admin.unregister(gateway, family, name)


def _add_probes(app: FastAPI, config: ServeConfig, gateway: Gateway, slots: Slots) -> None:
    """Liveness, readiness and (unless they have their own port) Prometheus metrics."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: every routing model can be served by some expert of its chain; not shutting down."""
        ok, detail = gateway.readiness()
        ok = ok and not slots.draining
        return JSONResponse(
            {"ready": ok, "draining": slots.draining, **detail}, status_code=200 if ok else 503
        )

    if config.server.metrics_port is None:  # else the gateway serves them on their own port

        @app.get(
            "/metrics",
            response_class=Response,
            responses={200: {"description": "Prometheus metrics", "content": {CONTENT_TYPE_LATEST: {}}}},
        )
        async def metrics_endpoint() -> Response:
            return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _endpoint_of(path: str) -> str:
    return (
        "chat"
        if path.startswith("/v1/chat/")
        else "completions"
        if path.startswith("/v1/completions")
        else "other"
    )


def _chat_messages(body: Any) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in body.messages]


def _completion_messages(body: Any) -> list[dict[str, Any]]:
    return prompt_messages(body.prompt)


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def decision_headers(routed: Routed, served: str, request_id: str) -> dict[str, str]:
    decision = routed.decision
    headers = {
        "x-moerge-request-id": request_id,
        "x-moerge-expert": served,
        "x-moerge-router": _header_value(decision.router),
        "x-moerge-confidence": f"{decision.confidence:.4f}",
        "x-moerge-reason": _header_value(decision.reason),
    }
    if served != decision.expert:
        headers["x-moerge-routed-expert"] = decision.expert
    if routed.experiment is not None:
        headers["x-moerge-experiment"] = routed.experiment
        headers["x-moerge-arm"] = routed.arm or ""
    return headers


def _header_value(text: str) -> str:
    """`text` as one line of printable ASCII (a router's reason may quote a pattern with a newline)."""
    ascii_text = text.replace("→", "->").encode("ascii", "replace").decode()
    return "".join(c if " " <= c <= "~" else " " for c in ascii_text)


def extension(routed: Routed, served: Served, requested: str, request_id: str) -> dict[str, Any]:
    decision = routed.decision
    return {
        "request_id": request_id,
        "expert": served.expert,
        "requested_model": requested,
        "router": decision.router,
        "router_name": routed.router,
        "router_version": decision.version,
        "confidence": decision.confidence,
        "reason": decision.reason,
        "scores": decision.scores,
        "routed_expert": decision.expert,
        "fallback": served.expert != decision.expert,
        "attempts": served.attempts,
        "experiment": routed.experiment,
        "arm": routed.arm,
    }


def _authenticate_admin(gateway: Gateway, request: Request) -> str:
    try:
        return authenticate_admin(gateway.admin_keys, gateway.keys, request.headers.get("authorization"))
    except OpenAIError:
        gateway.metrics.rejected.labels("admin_auth").inc()
        raise


def _authenticate(gateway: Gateway, request: Request) -> str | None:
    try:
        return gateway.keys.authenticate(request.headers.get("authorization"))
    except OpenAIError:
        gateway.metrics.rejected.labels("auth").inc()
        raise


def _admit_request(gateway: Gateway, key: str | None) -> None:
    try:
        gateway.limiter.admit(key)
    except OpenAIError:
        gateway.metrics.rejected.labels("rate_limit").inc()
        raise


def _admit_model(gateway: Gateway, key: str | None, model: str) -> None:
    try:
        gateway.keys.check_model(key, model)
    except OpenAIError:
        gateway.metrics.rejected.labels("model_not_allowed").inc()
        raise


def _reserve(gateway: Gateway, key: str | None, tokens: int) -> int:
    try:
        return gateway.limiter.reserve_tokens(key, tokens)
    except OpenAIError:
        gateway.metrics.rejected.labels("rate_limit").inc()
        raise


def _assignment_api_key(key: str | None, request: Request) -> str | None:
    """The key name with auth on; without, a digest of the bearer token (never the token itself)."""
    if key is not None:
        return key
    token = bearer_token(request.headers.get("authorization"))
    return hash_key(token)[:32] if token else None


async def _handle(
    gateway: Gateway,
    request: Request,
    endpoint: Endpoint,
    model_cls: type[ChatCompletionRequest] | type[CompletionRequest],
    to_messages: Any,
) -> Response:
    """Auth, parse, admit, route and serve one request, accounting for it whatever happens."""
    rec = RequestRecord(new_request_id(), endpoint)
    gateway.metrics.in_flight.labels(endpoint).inc()  # the accountant's finish() takes it off
    request_id_var.set(rec.request_id)  # this request's task (and its stream relay) only
    rec.span = gateway.tracer.start("moerge.request", endpoint=endpoint, request_id=rec.request_id)
    try:
        rec.api_key = _authenticate(gateway, request)
        _admit_request(gateway, rec.api_key)  # before parsing: a limited key costs the gateway nothing
        payload, body = await parse_body(request, model_cls)
        rec.model, rec.stream, rec.messages = body.model, bool(body.stream), to_messages(body)
        cap = gateway.config.max_tokens_for(rec.api_key)
        check_max_tokens(body, cap)
        if (
            cap is not None
            and body.max_tokens is None
            and getattr(body, "max_completion_tokens", None) is None
        ):
            payload["max_tokens"] = cap  # a capped gateway never lets an answer run to the context's end
        _admit_model(gateway, rec.api_key, body.model)
        rec.reserved_tokens = _reserve(gateway, rec.api_key, reserved_tokens(body, len(await request.body())))
        return await _serve(gateway, request, rec, payload, body.user)
    except OpenAIError as err:
        rec.status = err.status
        gateway.accountant.finish(rec)
        raise
    except asyncio.CancelledError:
        rec.status = 499
        gateway.accountant.finish(rec)
        raise
    except Exception:
        rec.status = 500
        gateway.accountant.finish(rec)
        raise


async def _serve(
    gateway: Gateway, request: Request, rec: RequestRecord, payload: dict[str, Any], user: str | None
) -> Response:
    assert rec.model is not None and rec.messages is not None
    routed = await gateway.route(
        rec.model,
        rec.messages,
        request.headers.get("x-moerge-previous-expert"),
        request_id=rec.request_id,
        user=user,
        headers=request.headers,  # type: ignore[arg-type]  # case-insensitive mapping
        api_key=_assignment_api_key(rec.api_key, request),
    )
    rec.routed = routed
    if gateway.decision_log is not None:
        gateway.decision_log.remember(rec.request_id, routed.experiment, routed.arm)
    decision = routed.decision
    rec.span.set(
        router=routed.router, routed_expert=decision.expert, experiment=routed.experiment, arm=routed.arm
    )
    _log_decision(gateway, rec, decision)
    # Until the first event (streaming) or the full answer, a client that leaves cancels the backend
    # request; once streaming, Starlette's own disconnect watch cancels the relay, which closes it.
    served = await _cancel_on_disconnect(
        request,
        gateway.dispatch(rec.endpoint, payload, request, decision.expert, rec.api_key),  # type: ignore[arg-type]
    )
    if served is None:  # the client left; the backend request was cancelled, which aborts it
        rec.status = 499
        gateway.accountant.finish(rec)
        return Response(status_code=499)
    rec.served_expert = served.expert
    headers = decision_headers(routed, served.expert, rec.request_id)
    ext = extension(routed, served, rec.model, rec.request_id)
    result = served.result
    if isinstance(result, JSONResult):
        status = result.status
        if status == 200 and isinstance(result.body, dict):
            result.body["moerge"] = ext
            body = result.body
            rec.usage(body.get("usage"))
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
        rec.status = status
        gateway.accountant.finish(rec)
        return Response(
            json.dumps(body, separators=_SEP).encode(),
            status_code=status,
            media_type="application/json",
            headers=headers,
        )

    async def cleanup() -> None:  # the relay never started (the client left first): close, account
        if not rec.finished:
            await result.close()
            rec.status = 499
            gateway.accountant.finish(rec)

    return ClosingStreamingResponse(
        _relay(gateway, rec, result, ext),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
        cleanup=cleanup,
    )


async def record_feedback(gateway: Gateway, body: FeedbackRequest) -> dict[str, Any]:
    """Store feedback for a request the gateway answered; 404 for an id it never issued."""
    dlog = gateway.decision_log
    if dlog is None:
        raise OpenAIError(
            404, "Feedback needs the decision log (decision_log.enabled: true).", code="feedback_disabled"
        )
    known = dlog.recent(body.request_id)
    if known is None:
        try:
            known = await asyncio.to_thread(dlog.lookup, body.request_id)
        except SQLAlchemyError:
            raise OpenAIError(
                503,
                "The decision log is unavailable; the request id cannot be checked now.",
                code="decision_log_unavailable",
            ) from None
    if known is None:
        raise OpenAIError(
            404,
            f"No request with id `{body.request_id}` (use the x-moerge-request-id of an answer).",
            param="request_id",
            code="request_not_found",
        )
    experiment, arm = known
    if not dlog.add_feedback(body.request_id, body.score, body.label):
        raise OpenAIError(503, "The decision log is full; feedback was not stored.", code="decision_log_full")
    if experiment is not None:
        m = gateway.metrics
        m.ab_feedback.labels(
            experiment, arm or "", gateway.config.decision_log.metric_label(body.label)
        ).inc()
        if body.score is not None:
            m.ab_feedback_score.labels(experiment, arm or "").observe(body.score)
    return {
        "object": "feedback",
        "request_id": body.request_id,
        "experiment": experiment,
        "arm": arm,
        "score": body.score,
        "label": body.label,
    }


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends, however it ends.

    When a client disconnects, Starlette cancels the sending task; if that lands while the relay is
    parked at a `yield`, the generator is merely dropped and its `finally` (which aborts the backend
    request) would wait for garbage collection. Closing it here makes the abort immediate. A generator
    closed before it ever ran skips its `finally`, so `cleanup` runs too (it must be idempotent).
    """

    def __init__(self, *args: Any, cleanup: Callable[[], Awaitable[None]] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                if self.cleanup is not None:
                    await self.cleanup()


async def _relay(
    gateway: Gateway, rec: RequestRecord, result: StreamResult, ext: dict[str, Any]
) -> AsyncIterator[bytes]:
    """Relay a backend stream; a failure after the first event ends it with an error event, never a hang.

    Token counts come from the stream's `usage` (stream_options.include_usage); without it, the
    content events are counted (vLLM sends one per token).
    """
    m, idle_s = gateway.metrics, gateway.config.timeouts.idle_s
    expert = rec.served_expert or "-"
    done = failed = False
    events = 0
    try:
        yield _with_extension(result.first, ext)
        rec.ttft_s = time.perf_counter() - rec.start
        m.ttft.labels(expert).observe(rec.ttft_s)
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    event = await anext(result.rest)
            except StopAsyncIteration:
                break
            if event.startswith(_DONE):
                done = True
            elif b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event:
                _stream_usage(rec, event)
            else:
                events += 1
            yield event
        if not done:
            raise BackendStreamError("the backend closed the stream before it was complete")
    except (BackendStreamError, TimeoutError, OSError) as err:
        failed = True
        reason = "no event within the idle timeout" if isinstance(err, TimeoutError) else str(err)
        log.warning("stream from expert %s failed after the first event: %s", expert, reason)
        gateway.record_stream_failure(expert, reason)
        # The client learns what happened, not the backend's own error text (addresses, internals):
        # that is in the log, under this request id.
        what = "went silent" if isinstance(err, TimeoutError) else "broke off"
        body = error_body(
            f"The expert `{expert}` {what} mid-stream; the answer is incomplete (request {rec.request_id}).",
            "server_error",
            None,
            "backend_stream_error",
        )
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
        yield _DONE
    finally:
        await result.close()
        if rec.tokens_out is None:
            rec.tokens_out = events
        rec.status = 502 if failed else 200 if done else 499
        gateway.accountant.finish(rec)


def _stream_usage(rec: RequestRecord, event: bytes) -> None:
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return
    if isinstance(chunk, dict):
        rec.usage(chunk.get("usage"))


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


def _log_decision(gateway: Gateway, rec: RequestRecord, decision: Decision) -> None:
    if not gateway.config.server.log_decisions or not log.isEnabledFor(logging.INFO):
        return
    extra = ""
    if gateway.config.server.log_prompts:
        extra = f" prompt={latest_user_text(rec.messages or [])[:500]!r}"
    routed = rec.routed
    log.info(
        "route model=%s expert=%s router=%s experiment=%s arm=%s confidence=%.3f reason=%s%s",
        rec.model,
        decision.expert,
        decision.router,
        routed.experiment if routed else None,
        routed.arm if routed else None,
        decision.confidence,
        decision.reason,
        extra,
    )
