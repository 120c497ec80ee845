"""The decision log against SQLite and a real PostgreSQL server (started by the test setup), outages included."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from serving.config import check_db_url
from serving.decision_log import DecisionLog, decisions, feedback, make_engine
from serving.report import build_report, load_experiment
from tests.helpers import PostgresServer

pytestmark = pytest.mark.timeout(600)  # the first test may install PostgreSQL (apt-get)


def row(i: int, arm: str, **kw: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{arm}-{i}",
        "ts": datetime.now(UTC),
        "endpoint": "chat",
        "model": "auto",
        "experiment": "exp",
        "arm": arm,
        "unit": f"user-{i % 40}",
        "router": "r",
        "expert": "math",
        "served_expert": "math",
        "reason": "fixed",
        "confidence": 0.9,
        "scores": {"math": 0.9, "code": 0.1},
        "shadow": {"hybrid": {"expert": "code", "confidence": 0.6, "scores": {"code": 0.6}}},
        "stream": i % 2 == 0,
        "status": 200,
        "latency_s": 0.05 + i / 1000,
        "ttft_s": 0.01,
        "tokens_in": 12,
        "tokens_out": 30,
        "prompt_sha256": "a" * 64,
        "prompt": None,
        **kw,
    }


def count(url: str, table: Any = decisions) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    finally:
        engine.dispose()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    # one database per test on the shared server
    name = f"t{abs(hash(request.node.name)) % 10**8}"
    engine = make_engine(server.url.rsplit("/", 1)[0] + "/postgres")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + "/" + name


def test_rows_feedback_and_lookup_round_trip(db_url: str) -> None:
    dropped: list[tuple[str, int]] = []
    log = DecisionLog(
        db_url, batch_size=64, flush_interval_s=0.05, on_drop=lambda r, n: dropped.append((r, n))
    )
    log.start()
    for i in range(300):
        assert log.record(row(i, "control" if i % 3 else "treatment"))
    for i in range(0, 300, 5):
        log.add_feedback(f"req-{'control' if i % 3 else 'treatment'}-{i}", score=(i % 7) / 7, label="good")
    log.add_feedback("req-control-1", score=None, label="wrong_expert")
    log.close(timeout_s=30)
    assert dropped == [] and log.written == 300 + 61
    assert count(db_url) == 300 and count(db_url, feedback) == 61
    fresh = DecisionLog(db_url)  # a restarted gateway finds old requests for feedback
    assert fresh.lookup("req-treatment-3") == ("exp", "treatment")
    assert fresh.lookup("req-nope") is None
    fresh.close()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = (
            conn.execute(select(decisions).where(decisions.c.request_id == "req-control-1")).one()._mapping
        )
    engine.dispose()
    assert stored["scores"] == {"math": 0.9, "code": 0.1}
    assert stored["shadow"]["hybrid"]["expert"] == "code"
    assert stored["ts"].tzinfo is not None or db_url.startswith("sqlite")
    rows, fb = load_experiment(db_url, "exp")
    report = build_report("exp", rows, fb, {"control": 2, "treatment": 1}, "control")
    assert report["arms"]["control"]["n"] == 200 and report["arms"]["treatment"]["n"] == 100
    assert report["arms"]["control"]["units"] == 40 and report["arms"]["treatment"]["units"] == 40
    assert report["arms"]["control"]["feedback"]["labels"] == {"good": 40, "wrong_expert": 1}


def test_duplicate_ids_do_not_block_the_batch(db_url: str) -> None:
    dropped: list[tuple[str, int]] = []
    log = DecisionLog(
        db_url, batch_size=10, flush_interval_s=0.05, on_drop=lambda r, n: dropped.append((r, n))
    )
    log.start()
    log.record(row(1, "control"))
    assert wait_for(lambda: log.written == 1)
    for i in range(5):
        log.record(row(i, "control"))  # req-control-1 again, in a batch with four good rows
    log.close(timeout_s=30)
    assert count(db_url) == 5 and dropped == [("rejected", 1)]


def test_bad_values_are_cleaned_and_bounded(db_url: str) -> None:
    """A NUL in a label, a lone surrogate, an over-long router name, NaN in the scores: PostgreSQL refuses
    each as given (and used to stop the log for good); they are cleaned when recorded and every row lands."""
    log = DecisionLog(db_url, batch_size=8, flush_interval_s=0.05)
    log.start()
    log.record(row(0, "control", router="expert:" + "r" * 300, reason="rule:0:a\x00b", model="m\x00"))
    log.record(row(1, "control", scores={"math": float("nan"), "co\x00de": float("inf")}, prompt="p\ud800"))
    log.add_feedback("req-control-0", score=1.0, label="good\x00")
    log.add_feedback("req-control-1", score=None, label="\ud83d" + "x" * 100)
    for i in range(2, 6):
        log.record(row(i, "control"))  # the rows behind the bad ones
    assert wait_for(lambda: log.written == 8, timeout_s=20), (log.written, log.dropped)
    log.close(timeout_s=30)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(select(decisions))}
        labels = sorted(r.label for r in conn.execute(select(feedback)))
    engine.dispose()
    first = rows["req-control-0"]
    assert first.router == "expert:" + "r" * 121 and first.reason == "rule:0:ab" and first.model == "m"
    assert rows["req-control-1"].scores == {"math": None, "code": None}
    assert rows["req-control-1"].prompt == "p?"
    assert labels == ["?" + "x" * 63, "good"]


def test_rows_the_database_rejects_are_dropped_not_retried(db_url: str) -> None:
    """Rows that no cleaning makes valid (here: a duplicate id, and a value the driver cannot send) are
    dropped and counted with reason `rejected`; the rows queued with and behind them are written."""
    dropped: list[tuple[str, int]] = []
    log = DecisionLog(
        db_url, batch_size=16, flush_interval_s=0.05, on_drop=lambda r, n: dropped.append((r, n))
    )
    log.record(row(0, "control"))
    log.record(row(0, "control"))  # duplicate id
    log.record(row(1, "control", latency_s=object()))  # no driver can send this
    for i in range(2, 12):
        log.record(row(i, "control"))
    log.start()
    assert wait_for(lambda: log.written == 11, timeout_s=20), (log.written, dropped)
    log.record(row(12, "control"))  # and the log goes on
    assert wait_for(lambda: log.written == 12, timeout_s=20)
    log.close(timeout_s=30)
    assert count(db_url) == 12 and sum(n for r, n in dropped if r == "rejected") == 2, dropped


def test_ab_report_cli_reads_postgres(postgres: PostgresServer) -> None:
    from moerge.cli import app

    url = postgres.url
    log = DecisionLog(url, flush_interval_s=0.05)
    log.start()
    for i in range(60):
        log.record(row(i, "control" if i < 30 else "treatment", experiment="cli-exp"))
    log.close(timeout_s=30)
    plain = "postgresql://" + url.split("://", 1)[1]  # the URL as a user writes it
    assert check_db_url(plain) == url
    out = CliRunner().invoke(app, ["ab", "report", "cli-exp", "--db", plain, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["arms"]["control"]["n"] == 30 and data["arms"]["treatment"]["n"] == 30


def test_postgres_outage_buffers_drops_and_recovers(postgres_factory: Callable[[], PostgresServer]) -> None:
    """Server stopped mid-run: rows queue up to the bound, the rest are dropped and counted; after a
    restart the queued rows are written. Every row is either written or counted as dropped."""
    server = postgres_factory()
    dropped: dict[str, int] = {}
    errors: list[int] = []
    log = DecisionLog(
        server.url,
        queue_size=5,
        batch_size=2,
        flush_interval_s=0.05,
        connect_timeout_s=1,
        on_drop=lambda r, n: dropped.__setitem__(r, dropped.get(r, 0) + n),
        on_error=lambda: errors.append(1),
    )
    log.start()
    for i in range(10):  # one at a time: the queue holds only 5
        log.record(row(i, "control"))
        assert wait_for(lambda n=i + 1: log.written == n)
    server.stop()
    for i in range(10, 40):
        log.record(row(i, "control"))  # never blocks, never raises
    assert wait_for(lambda: bool(errors)), "the writer noticed the outage"
    assert dropped.get("queue_full", 0) >= 30 - 5 - 2  # the queue holds 5, the writer's batch 2
    server.start()
    assert wait_for(lambda: log.written + dropped.get("queue_full", 0) == 40, timeout_s=60), (
        log.written,
        dropped,
    )
    log.close(timeout_s=30)
    assert count(server.url) == log.written and log.written >= 10 + 5
