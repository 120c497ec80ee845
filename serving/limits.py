"""Limits enforced before any parsing: content type (415), body size (413), upload deadline (408) and
concurrent requests (503).

The body is read whole (up to its limit, within its deadline) *before* a request takes a concurrency
slot: a client trickling its upload holds a connection, never one of the slots that served requests
need. With a Content-Length an oversize body is refused without reading it; a chunked one is read up to
the limit, so nothing oversize is ever buffered whole. The body is then replayed to the app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error_body, shaped

# Request bodies the API parses are JSON. Refusing every other type (415) keeps browsers' "simple"
# cross-site POSTs (text/plain, form encodings: no CORS preflight) from ever reaching a backend.
_JSON_TYPES = ("application/json",)


def is_json_type(content_type: str) -> bool:
    """application/json, or a structured `+json` type, with any parameters (charset)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


class BodyReader:
    """Reads each POST body whole before the app (and the concurrency cap) sees the request."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.on_reject = on_reject or (lambda reason, path: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        json_body = is_json_type(headers.get(b"content-type", b"").decode("latin-1"))
        length = None
        if b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                await _reject(send, 400, "Invalid Content-Length header.", "invalid_header", path=path)
                return
            if length and not json_body:
                await self._not_json(send, path)
                return
            if length > self.max_bytes:
                self.on_reject("body_size", path)
                await _reject(send, 413, self._too_large(), "request_too_large", path=path)
                return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.on_reject("client_disconnect", path)
                        return  # the client left mid-upload: nobody to answer (not a 500)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        self.on_reject("body_size", path)
                        await _reject(send, 413, self._too_large(), "request_too_large", path=path)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            self.on_reject("body_timeout", path)
            await _reject(
                send,
                408,
                f"The request body did not arrive within {self.timeout_s:g} s.",
                "request_timeout",
                path=path,
            )
            return
        if size and not json_body:  # a body-less POST (an admin action) needs no content type
            await self._not_json(send, path)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _not_json(self, send: Send, path: str) -> None:
        self.on_reject("content_type", path)
        await _reject(
            send,
            415,
            "The request body must be JSON: send `Content-Type: application/json`.",
            "unsupported_media_type",
            path=path,
        )

    def _too_large(self) -> str:
        return f"Request body too large: the limit is {self.max_bytes} bytes."


async def _reject(
    send: Send,
    status: int,
    message: str,
    code: str,
    kind: str = "invalid_request_error",
    retry_after: int | None = None,
    path: str = "",
) -> None:
    body = json.dumps(shaped(path, status, error_body(message, kind, None, code))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Slots:
    """The gateway's concurrent-request budget, shared by the cap middleware and the shutdown drain."""

    def __init__(self, max_in_flight: int | None) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is open; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class ConcurrencyCap:
    """At most `slots.max_in_flight` requests on the model endpoints at once; the next gets 503 at once.

    Queueing without bound behind a saturated engine only turns overload into timeouts; answering 503
    with Retry-After lets clients and load balancers go elsewhere. A request counts until its response
    ends, so a stream holds its slot until the last event. While draining (shutdown), new requests get
    503 too.
    """

    def __init__(
        self,
        app: ASGIApp,
        slots: Slots,
        prefixes: tuple[str, ...] = (
            "/v1/chat/",
            "/v1/completions",
            "/v1/responses",
            "/v1/messages",
            "/v1/feedback",
        ),
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.slots = slots
        self.prefixes = prefixes
        self.on_reject = on_reject or (lambda reason, path: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        slots = self.slots
        if slots.draining:
            self.on_reject("draining", scope["path"])
            await _reject(
                send, 503, "The gateway is shutting down.", "shutting_down", "server_error", 1, scope["path"]
            )
            return
        if slots.max_in_flight is not None and slots.in_flight >= slots.max_in_flight:
            self.on_reject("concurrency", scope["path"])
            await _reject(
                send,
                503,
                f"The gateway is at its limit of {slots.max_in_flight} concurrent requests; retry shortly.",
                "overloaded",
                "server_error",
                retry_after=1,
                path=scope["path"],
            )
            return
        slots.acquire()
        try:
            await self.app(scope, receive, send)
        finally:
            slots.release()
