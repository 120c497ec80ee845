"""The one interface every backend implements, and the two shapes a backend answer can take.

Backends speak OpenAI's wire format both ways: a request is the client's JSON body (with `model` set to
the backend's own name), an answer is a JSON body with its status, or an SSE stream whose first event
has already arrived. Waiting for that first event before answering the client is what lets the gateway
retry or fall back on a backend that fails before the first token, without the client ever noticing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request

Endpoint = Literal["chat", "completions"]


class BackendUnavailable(Exception):
    """The backend is down, timed out or failed (5xx) before answering: retry, then fall back."""


class BackendStreamError(Exception):
    """The backend failed after the first event: too late to fall back, the stream ends with an error."""


@dataclass
class JSONResult:
    status: int
    body: Any


@dataclass
class StreamResult:
    first: bytes  # one complete SSE event, `data: {...}\n\n`
    rest: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]  # aborts the backend request if it is still running


class Backend(ABC):
    """One expert's serving engine."""

    kind: str

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Bring the backend up (load an engine, open connections)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything; in-flight requests are aborted."""

    def available(self) -> bool:
        """False when the expert was withdrawn at runtime (an unregistered adapter): skip it, no failure."""
        return True

    @abstractmethod
    async def health(self) -> bool:
        """True when the backend can take requests now."""

    @abstractmethod
    async def request(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        raw: Request | None,
        *,
        first_token_s: float,
        total_s: float,
    ) -> JSONResult | StreamResult:
        """Send one request; raise BackendUnavailable on failures worth retrying elsewhere."""

    def describe(self) -> dict[str, Any]:
        """What /v1/models says of the expert beyond its name (a LoRA family's expert says more)."""
        return {"backend": self.kind}


_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
}


def error_status(err: dict[str, Any]) -> int:
    """The HTTP status an OpenAI error object stands for: its numeric `code`, else its `type` (a text
    code such as "server_error", or none, counts as 500: worth retrying elsewhere)."""
    code = err.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    if isinstance(code, str) and code.isdigit() and 100 <= int(code) <= 599:
        return int(code)
    return _TYPE_STATUS.get(str(err.get("type")), 500)


def is_error_event(event: bytes) -> dict[str, Any] | None:
    """The error object of an SSE `data: {"error": ...}` event, else None."""
    if not event.startswith(b'data: {"error"'):
        return None
    try:
        body = json.loads(event[6:])
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {"message": str(err)}
