"""A remote OpenAI-compatible server (`vllm serve`, another gateway...) behind one pooled httpx client.

Streams are relayed event by event without re-encoding; closing the relay closes the connection,
which is how vLLM's server learns that the client left and aborts the generation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
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
)
from serving.backends.transport import AiohttpTransport

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "responses": "/responses",
    "messages": "/messages",
}
_FORWARDED_HEADERS = ("x-request-id", "traceparent", "tracestate")


def make_client(connect_s: float, idle_s: float, max_connections: int = 1024) -> httpx.AsyncClient:
    """The gateway's one connection pool: every remote backend shares it (keep-alive, no per-call setup).

    httpx's API over aiohttp's pool (see transport.py for why).
    """
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections),
        timeout=httpx.Timeout(connect=connect_s, read=idle_s, write=idle_s, pool=connect_s),
        follow_redirects=False,
    )


class RemoteBackend(Backend):
    kind = "openai"

    def __init__(
        self, name: str, base_url: str, model: str, client: httpx.AsyncClient, api_key: str | None
    ) -> None:
        super().__init__(name)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = client
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.health_url = root + "/health"

    async def health(self) -> bool:
        try:
            resp = await self.client.get(self.health_url, headers=self.headers, timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

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
        """`model`: the remote's name for what serves it (a LoRA adapter's name; default: `self.model`)."""
        payload["model"] = model or self.model
        headers = dict(self.headers)
        if raw is not None:
            for h in _FORWARDED_HEADERS:
                if (v := raw.headers.get(h)) is not None:
                    headers[h] = v
        req = self.client.build_request(
            "POST", self.base_url + _PATHS[endpoint], content=json.dumps(payload).encode(), headers=headers
        )
        stream = bool(payload.get("stream"))
        resp: httpx.Response | None = None
        try:
            async with asyncio.timeout(first_token_s if stream else total_s):
                resp = await self.client.send(req, stream=True)
                if resp.status_code >= 500:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    raise BackendUnavailable(f"{self.name}: HTTP {resp.status_code}: {text}")
                ctype = resp.headers.get("content-type", "")
                if not stream or resp.status_code != 200 or not ctype.startswith("text/event-stream"):
                    data = await resp.aread()
                    await resp.aclose()
                    return JSONResult(resp.status_code, _json_or_text(data))
                events = _sse_events(resp)
                try:
                    first = await anext(events)
                except StopAsyncIteration:
                    raise BackendUnavailable(f"{self.name}: stream ended before its first event") from None
                if (err := is_error_event(first)) is not None and error_status(err) >= 500:
                    raise BackendUnavailable(
                        f"{self.name}: error before the first token: {err.get('message')}"
                    )
        except TimeoutError:
            if resp is not None:
                await resp.aclose()
            raise BackendUnavailable(f"{self.name}: no answer within the deadline") from None
        except (httpx.HTTPError, BackendStreamError) as err:
            if resp is not None:
                await resp.aclose()
            raise BackendUnavailable(f"{self.name}: {type(err).__name__}: {err}") from None
        except BaseException:  # BackendUnavailable included: the connection is closed, never left open
            if resp is not None:
                await resp.aclose()
            raise
        return StreamResult(first=first, rest=events, close=resp.aclose)


async def _sse_events(resp: httpx.Response) -> AsyncIterator[bytes]:
    """Complete events of an SSE body (their `event:` and `data:` lines; comments and ids dropped), as
    bytes ready to relay. Chat and completions events are `data:` only; Responses and Anthropic Messages
    events are named."""
    lines: list[str] = []
    try:
        async for line in resp.aiter_lines():
            if line.startswith(("data:", "event:")):
                lines.append(line)
            elif not line and lines:
                if any(x.startswith("data:") for x in lines):
                    yield ("\n".join(lines) + "\n\n").encode()
                lines = []
        if any(x.startswith("data:") for x in lines):  # a last event without its blank line
            yield ("\n".join(lines) + "\n\n").encode()
    except httpx.HTTPError as err:
        raise BackendStreamError(f"{type(err).__name__}: {err}") from None


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")
