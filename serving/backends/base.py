"""The one interface every backend implements, and the two shapes a backend answer can take.

Backends speak the endpoint's wire format both ways (OpenAI's chat, completions and Responses, Anthropic's
Messages): a request is the client's JSON body (with `model` set to the backend's own name), an answer is
a JSON body with its status, or an SSE stream whose first event has already arrived. Waiting for that first event before answering the client is what lets the gateway
retry or fall back on a backend that fails before the first token, without the client ever noticing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request

Endpoint = Literal["chat", "completions", "responses", "messages"]


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
    first: bytes  # one complete SSE event, `data: {...}\n\n` (with an `event:` line for Responses/Messages)
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

    def forget_response(self, response_id: str) -> None:  # noqa: B027 - optional hook
        """Drop a stored Responses answer the gateway no longer maps (in-process engines keep them)."""

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
    """The error object of an error event (`data: {"error": ...}`, or Anthropic's `event: error`), else None.

    A Responses `event: error` carries its fields at the top level (`{"type": "error", "code", "message"}`).
    """
    if not event.startswith((b'data: {"error"', b"event: error\n")):
        return None
    _, data = split_event(event)
    try:
        body = json.loads(data or "")
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    err = body.get("error", body if body.get("type") == "error" else None)
    return err if isinstance(err, dict) else {"message": str(err)}


def split_event(event: bytes) -> tuple[str | None, str | None]:
    """(event name, data) of one SSE event; None for a part it lacks. Multi-line data is joined."""
    if event.startswith(b"data:") and b"\n" not in event.rstrip(b"\n"):  # the common chat event
        return None, event[5:].strip().decode(errors="replace")
    name, data = None, []
    for line in event.decode(errors="replace").splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    return name, "\n".join(data) if data else None


def make_event(data: str, name: str | None = None) -> bytes:
    """One SSE event: `event: NAME` (when named) and `data: DATA`."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()
