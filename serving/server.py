"""Run the gateway under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import logging

import uvicorn

from serving.app import create_app
from serving.config import ServeConfig


def configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("moerge.serving").setLevel(level.upper())


def run(config: ServeConfig) -> None:
    configure_logging(config.server.log_level)
    uvicorn.run(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        access_log=config.server.access_log,
        timeout_graceful_shutdown=10,
    )
