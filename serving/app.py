"""The HTTP surface: OpenAI's endpoints (chat, completions, Responses), Anthropic's Messages, feedback,
admin, /health, /ready and /metrics, over a Gateway. Every model endpoint is a `Protocol`
(serving/endpoints.py) run through one request lifecycle, `handle`.

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
from serving.backends.base import BackendStreamError, JSONResult, StreamResult, make_event, split_event
from serving.config import ServeConfig
from serving.endpoints import CHAT, COMPLETIONS, MESSAGES, RESPONSES, Protocol
from serving.errors import OpenAIError, error_body, install_error_handlers, normalize_error
from serving.gateway import Gateway, Served
from serving.limits import BodyReader, ConcurrencyCap, Slots
from serving.logging_json import request_id_var
from serving.metrics import Metrics
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    MessagesRequest,
    ResponsesRequest,
    check_max_tokens,
    install_openapi_schemas,
    parse_body,
    request_body,
    reserved_tokens,
)

log = logging.getLogger("moerge.serving")
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
    404: {
        "description": "Unknown model (or, for feedback, unknown request id; for responses, unknown "
        "previous_response_id)"
    },
    408: {"description": "The request body did not arrive within server.body_timeout_s"},
    413: {"description": "Request body too large"},
    415: {"description": "The body is not JSON (Content-Type must be application/json)"},
    429: {"description": "Rate limit of the API key reached (see Retry-After)"},
    503: {"description": "No backend could serve the request, or the gateway is at its concurrency cap"},
}
# The same statuses; under /v1/messages the bodies are Anthropic's `{"type": "error", "error": {...}}`.
_ANTHROPIC_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": spec["description"] + " (Anthropic's error shape)"}
    for status, spec in _ERRORS.items()
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
        [
            ChatCompletionRequest,
            CompletionRequest,
            ResponsesRequest,
            MessagesRequest,
            FeedbackRequest,
            lora_admin.RegisterAdapter,
        ],
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
    """OpenAI's endpoints (chat, completions, responses, models), Anthropic's messages, moerge's feedback."""

    @app.post("/v1/chat/completions", responses=_ERRORS, openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await handle(gateway, request, CHAT)

    @app.post("/v1/completions", responses=_ERRORS, openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await handle(gateway, request, COMPLETIONS)

    @app.post("/v1/responses", responses=_ERRORS, openapi_extra=request_body(ResponsesRequest))
    async def responses(request: Request) -> Response:
        """OpenAI's Responses API, routed like chat; `previous_response_id` goes to the expert holding it."""
        return await handle(gateway, request, RESPONSES)

    @app.post("/v1/messages", responses=_ANTHROPIC_ERRORS, openapi_extra=request_body(MessagesRequest))
    async def messages(request: Request) -> Response:
        """Anthropic's Messages API, routed like chat; errors in Anthropic's shape."""
        return await handle(gateway, request, MESSAGES)

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


_ENDPOINTS = {
    "/v1/chat/": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}


def _endpoint_of(path: str) -> str:
    return next((name for prefix, name in _ENDPOINTS.items() if path.startswith(prefix)), "other")


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
    """The key's name; `Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY` (its SDK's default)."""
    header = request.headers.get("authorization")
    if header is None and (api_key := request.headers.get("x-api-key")):
        header = f"Bearer {api_key}"
    try:
        return gateway.keys.authenticate(header)
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


async def handle(gateway: Gateway, request: Request, proto: Protocol) -> Response:
    """One request's whole life, for every model endpoint: admit, parse, route, dispatch, relay, account.

    However it ends (an answer, a client or backend error, a client that left, a crash) it is finished
    exactly once, in `_end`: here for every answer but a stream, by the stream's response when its last
    event is sent (or it is abandoned). Errors take the endpoint's shape (`proto.error`).
    """
    rec = gateway.accountant.begin(new_request_id(), proto.endpoint)
    request_id_var.set(rec.request_id)  # this request's task (and its stream relay) only
    rec.span = gateway.tracer.start("moerge.request", endpoint=proto.endpoint, request_id=rec.request_id)
    streaming = False
    try:
        response = await _serve(gateway, request, rec, proto)
        streaming = isinstance(response, ClosingStreamingResponse)
        return response
    except OpenAIError as err:
        rec.status = err.status
        return JSONResponse(proto.error(err.status, err.body()), status_code=err.status, headers=err.headers)
    except asyncio.CancelledError:
        rec.status = 499
        raise
    except Exception:
        log.exception("request %s failed in the gateway", rec.request_id)
        rec.status = 500
        body = error_body("internal error in the gateway", "server_error", None, 500)
        return JSONResponse(proto.error(500, body), status_code=500)
    finally:
        if not streaming:
            _end(gateway, rec)


def _end(gateway: Gateway, rec: RequestRecord) -> None:
    """The end of a request: metrics, token settlement, decision-log row, span (idempotent)."""
    gateway.accountant.finish(rec)


async def _serve(gateway: Gateway, request: Request, rec: RequestRecord, proto: Protocol) -> Response:
    """Admit and parse, route, dispatch, then answer as JSON or as a relayed stream."""
    payload, body = await _admit(gateway, request, rec, proto)
    routed, pinned = await _route(gateway, request, rec, proto, body)
    assert rec.model is not None
    decision = routed.decision
    # Until the first event (streaming) or the full answer, a client that leaves cancels the backend
    # request; once streaming, Starlette's own disconnect watch cancels the relay, which closes it.
    served = await _cancel_on_disconnect(
        request,
        gateway.dispatch(
            proto.endpoint, payload, request, decision.expert, rec.api_key, fallbacks=pinned is None
        ),
    )
    if served is None:  # the client left; the backend request was cancelled, which aborts it
        rec.status = 499
        return Response(status_code=499)
    rec.served_expert = served.expert
    headers = decision_headers(routed, served.expert, rec.request_id)
    ext = extension(routed, served, rec.model, rec.request_id)
    result = served.result
    if isinstance(result, JSONResult):
        return _json_answer(gateway, rec, proto, payload, served.expert, result, headers, ext)

    rec.status = 499  # until the relay says otherwise: a stream never relayed was abandoned

    async def end_stream() -> None:  # however the stream response ends: close the backend, account
        await result.close()
        _end(gateway, rec)

    return ClosingStreamingResponse(
        _relay(gateway, rec, result, ext, proto, payload),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
        cleanup=end_stream,
    )


async def _admit(
    gateway: Gateway, request: Request, rec: RequestRecord, proto: Protocol
) -> tuple[dict[str, Any], Any]:
    """Authenticate, check the key's limits, parse the body, cap and reserve its tokens."""
    rec.api_key = _authenticate(gateway, request)
    _admit_request(gateway, rec.api_key)  # before parsing: a limited key costs the gateway nothing
    payload, body = await parse_body(request, proto.body)
    rec.model, rec.stream, rec.messages = body.model, bool(body.stream), proto.routing_messages(body)  # type: ignore[attr-defined]
    cap = gateway.config.max_tokens_for(rec.api_key)
    check_max_tokens(body, cap)
    proto.prepare(gateway, payload, body, cap)
    assert rec.model is not None
    _admit_model(gateway, rec.api_key, rec.model)
    rec.reserved_tokens = _reserve(gateway, rec.api_key, reserved_tokens(body, len(await request.body())))
    return payload, body


async def _route(
    gateway: Gateway, request: Request, rec: RequestRecord, proto: Protocol, body: Any
) -> tuple[Routed, Any]:
    """The routing decision (an experiment arm, the router, or the expert a follow-up is pinned to),
    remembered for feedback and logged."""
    assert rec.model is not None and rec.messages is not None  # set by _admit
    pinned = proto.pinned(gateway, rec, body)
    routed = await gateway.route(
        rec.model,
        rec.messages,
        request.headers.get("x-moerge-previous-expert"),
        request_id=rec.request_id,
        user=proto.user(body),
        headers=request.headers,  # type: ignore[arg-type]  # case-insensitive mapping
        api_key=_assignment_api_key(rec.api_key, request),
        pinned=pinned,
    )
    rec.routed = routed
    if gateway.decision_log is not None:
        gateway.decision_log.remember(rec.request_id, routed.experiment, routed.arm)
    decision = routed.decision
    rec.span.set(
        router=routed.router, routed_expert=decision.expert, experiment=routed.experiment, arm=routed.arm
    )
    _log_decision(gateway, rec, decision)
    return routed, pinned


def _json_answer(
    gateway: Gateway,
    rec: RequestRecord,
    proto: Protocol,
    payload: dict[str, Any],
    expert: str,
    result: JSONResult,
    headers: dict[str, str],
    ext: dict[str, Any],
) -> Response:
    """A whole answer: the `moerge` field and usage on success, the protocol's error shape otherwise."""
    status = result.status
    if status == 200 and isinstance(result.body, dict):
        result.body["moerge"] = ext
        out = result.body
        rec.usage(out.get("usage"))
        proto.answered(gateway, rec, payload, out)
    elif status == 200:  # a 200 that is not a JSON object: the backend is not speaking the API
        status = 502
        out = proto.error(
            502,
            error_body(
                f"The expert `{expert}` sent an invalid answer.", "server_error", None, "bad_backend_response"
            ),
        )
    else:
        out = proto.error(status, normalize_error(status, result.body))
    rec.status = status
    return Response(
        json.dumps(out, separators=_SEP).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
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
    request) would wait for garbage collection. Closing it here makes the abort immediate. `cleanup` then
    runs, however the response ended (a generator closed before it ever ran skips its own `finally`):
    the lifecycle's end of a stream (the backend closed, the request accounted).
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
    gateway: Gateway,
    rec: RequestRecord,
    result: StreamResult,
    ext: dict[str, Any],
    proto: Protocol,
    payload: dict[str, Any],
) -> AsyncIterator[bytes]:
    """Relay a backend stream; a failure after the first event ends it with the protocol's error events,
    never a hang. Sets `rec.status` (200, 502, or 499 when the client left); the response accounts.

    Token counts come from the stream's usage (chat: stream_options.include_usage); without it, the
    content events are counted (vLLM sends one per token).
    """
    m, idle_s = gateway.metrics, gateway.config.timeouts.idle_s
    expert = rec.served_expert or "-"
    done = failed = False
    events = 0
    try:
        first, obj = _with_extension(result.first, ext)
        proto.answered(gateway, rec, payload, obj)
        events += _account_event(proto, rec, split_event(result.first)[0], obj)
        yield first
        rec.ttft_s = time.perf_counter() - rec.start
        m.ttft.labels(expert).observe(rec.ttft_s)
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    event = await anext(result.rest)
            except StopAsyncIteration:
                break
            name, data = split_event(event)
            done = done or proto.is_last(name, data)
            if data is None or data == "[DONE]":
                pass
            elif not proto.named_events and b'"usage"' not in event:  # chat: no JSON parse per token
                events += 1
            else:
                events += _account_event(proto, rec, name, _json_or_none(data))
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
        for event in proto.failure(
            f"The expert `{expert}` {what} mid-stream; the answer is incomplete (request {rec.request_id})."
        ):
            yield event
    finally:
        if rec.tokens_out is None:
            rec.tokens_out = events
        rec.status = 502 if failed else 200 if done else 499


def _account_event(proto: Protocol, rec: RequestRecord, name: str | None, obj: Any) -> int:
    """Take an event's usage into the record; 1 if it is a content event that carries none, else 0."""
    usage = proto.usage(name, obj)
    if isinstance(usage, dict):
        rec.usage(usage)
        return 0
    return 1 if proto.is_content(name, obj) else 0


def _json_or_none(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _with_extension(event: bytes, ext: dict[str, Any]) -> tuple[bytes, Any]:
    """The first event with the `moerge` field added to its data object, and that object."""
    name, data = split_event(event)
    try:
        chunk = json.loads(data or "")
    except ValueError:
        return event, None
    if not isinstance(chunk, dict):
        return event, chunk
    chunk["moerge"] = ext
    return make_event(json.dumps(chunk, separators=_SEP), name), chunk


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
