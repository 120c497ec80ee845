"""Run the gateway under uvicorn (uvloop and httptools when installed).

On SIGTERM/SIGINT uvicorn stops accepting connections and lets open requests and streams finish for
`server.drain_s` seconds before the app shuts down (then the decision log is flushed).
"""

from __future__ import annotations

import uvicorn

from serving.app import create_app
from serving.config import ServeConfig
from serving.logging_json import configure_logging


def run(config: ServeConfig) -> None:
    configure_logging(config.server.log_level, config.server.log_format)
    app = create_app(config)  # config errors found at start (decision log URL, tracing) raise here
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        access_log=config.server.access_log,
        log_config=None,  # keep our handlers (JSON or text with request ids)
        timeout_graceful_shutdown=int(max(1, config.server.drain_s)),
    )
