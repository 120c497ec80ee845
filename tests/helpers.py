"""Support for tests and benchmarks: a `vllm serve` subprocess, a gateway on a background thread, and a
throwaway PostgreSQL server (installed from Debian's `postgresql` package if missing).

It lives under tests/, outside the installed packages (nothing in merge/, router/, serving/ or moerge/ may
import it); tests and bench/ scripts import it as `tests.helpers` from the repository root.

All bind 127.0.0.1 only. The vLLM server runs in its own process group so that killing it (a fault
test does) takes its engine-core child with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


class VllmServer:
    """`vllm serve MODEL` on a free loopback port: the server module `vllm serve` runs, started directly
    (as `moerge up` does), so it works whichever distribution provides vLLM."""

    def __init__(
        self,
        model: str | Path,
        served_names: list[str],
        *,
        max_model_len: int = 256,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            *served_names,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--enforce-eager",
            "--max-model-len",
            str(max_model_len),
            *(extra_args or []),
        ]
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **(env or {}),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmServer:
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def wait_ready(self, timeout_s: float = 240) -> VllmServer:
        wait_http_ok(self.url + "/health", timeout_s, self.proc)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (server and engine core); SIGKILL it if SIGTERM is not enough."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> VllmServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.kill(signal.SIGTERM)


class ThreadedServer:
    """A uvicorn server for `app` on a background thread (its own event loop), for in-process tests."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="moerge-gateway", daemon=True)

    def start(self, timeout_s: float = 300) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the gateway failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start in time")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or installed here."""


def postgres_bin() -> Path | None:
    """The folder of `initdb`/`pg_ctl` (PATH first, then Debian's /usr/lib/postgresql/VERSION/bin)."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name or 0)
    )
    return versions[-1].parent if versions else None


def install_postgres() -> Path:
    """The PostgreSQL binaries, installing the Debian package `postgresql` if they are missing (root only)."""
    if (found := postgres_bin()) is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed and cannot be installed here (needs root + apt-get)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(argv)} failed: {done.stderr[-500:]}")
    if (found := postgres_bin()) is None:
        raise PostgresUnavailable("installed `postgresql` but found no initdb")
    return found


class PostgresServer:
    """A throwaway PostgreSQL cluster: initdb in a temp dir, on a free loopback port, with one database.

    As root, the server runs as the `postgres` user (initdb refuses root). fsync is off: test data.
    """

    def __init__(self, database: str = "moerge") -> None:
        self.bin = install_postgres()
        self.database = database
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="moerge-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.url = f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{database}"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr[-800:] or done.stdout[-800:]}"
            )

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
            )
            self._pg_ctl("start")
            self._run(
                str(self.bin / "createdb"),
                "-h",
                LOOPBACK,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                self.database,
            )
        else:
            self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str) -> None:
        opts = f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.root} -c fsync=off"
        if action == "start":
            self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            )
        else:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """Stop at once (like a crash: connections are cut)."""
        self._pg_ctl("stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.destroy()
