"""Run the gateway under uvicorn (uvloop and httptools when installed), draining on SIGTERM.

SIGTERM first drains: the gateway keeps its port open and answers new requests 503 `shutting_down`
(with Retry-After; `/ready` turns 503) while open requests and streams finish, for at most
`server.drain_s`. Then uvicorn stops accepting connections and the app shuts down (pending log rows
written, the decision log flushed, engines closed). A client or load balancer that still reaches the
pod meanwhile gets an answer it can retry elsewhere instead of a refused connection. SIGINT (Ctrl-C)
and a second SIGTERM skip the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from serving.app import create_app
from serving.config import ServeConfig
from serving.limits import Slots
from serving.logging_json import configure_logging

log = logging.getLogger("moerge.serving")


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM turned into a drain (503 to new requests) before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, slots: Slots, drain_s: float) -> None:
        super().__init__(config)
        self.slots = slots
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.slots.draining or self._loop is None or self.drain_s <= 0:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
        self.slots.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        log.info(
            "SIGTERM: draining %d open requests (new ones get 503) for up to %.0f s",
            self.slots.in_flight,
            self.drain_s,
        )
        idle = await self.slots.wait_idle(self.drain_s)
        if not idle:
            log.warning("drain_s passed with %d requests still open; shutting down", self.slots.in_flight)
        self.should_exit = True


def run(config: ServeConfig) -> None:
    configure_logging(config.server.log_level, config.server.log_format)
    app = create_app(config)  # config errors found at start (decision log URL, tracing) raise here
    uv = uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        access_log=config.server.access_log,
        log_config=None,  # keep our handlers (JSON or text with request ids)
        timeout_graceful_shutdown=int(max(1, config.server.drain_s)),
    )
    DrainingServer(uv, app.state.slots, config.server.drain_s).run()
