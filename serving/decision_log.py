"""The decision log: one row per request (and feedback rows) in SQLite or PostgreSQL, via SQLAlchemy Core.

Rows are written by one background thread in batches, never on the request path. The database may be
slow or down: the request path only appends to a bounded queue, and when that queue is full the row
is dropped and counted (`moerge_decision_log_dropped_total`) — serving never waits for the log. While
the database is down the writer holds its current batch and retries with backoff, so a short outage
loses nothing until the queue fills.

A database that is up but refuses a row (a duplicate id, a value it cannot store) is not an outage:
the batch is retried row by row and only the refused rows are dropped (reason `rejected`), so one bad
row never blocks the rows behind it. Values are cleaned when recorded (NUL characters and lone
surrogates removed, strings cut to their column's length, non-finite floats in JSON made null), so
what a client sends (a feedback label, a model name) cannot make PostgreSQL refuse a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)

log = logging.getLogger("moerge.serving")

metadata = MetaData()
decisions = Table(
    "moerge_decisions",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("ts", DateTime(timezone=True), nullable=False, index=True),
    Column("endpoint", String(16), nullable=False),
    Column("model", String(256), nullable=False),
    Column("experiment", String(128), index=True),
    Column("arm", String(128)),
    Column("unit", String(32)),  # salted hash of the sticky assignment key (user...); null: not sticky
    Column("router", String(128), nullable=False),
    Column("expert", String(128), nullable=False),  # the decided expert
    Column("served_expert", String(128)),  # who answered (a fallback may differ); null if none did
    Column("reason", String(128)),
    Column("confidence", Float),
    Column("scores", JSON),
    Column("shadow", JSON),  # {router: {"expert", "confidence", "scores"}} of shadow routers
    Column("api_key", String(128)),  # the key's name from the config, never the key
    Column("stream", Boolean),
    Column("status", Integer, nullable=False),
    Column("latency_s", Float),
    Column("ttft_s", Float),
    Column("tokens_in", Integer),
    Column("tokens_out", Integer),
    Column("prompt_sha256", String(64)),
    Column("prompt", Text),  # only with decision_log.store_prompts
)
feedback = Table(
    "moerge_feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("score", Float),
    Column("label", String(64)),
)


def now() -> datetime:
    return datetime.now(UTC)


def prompt_digest(messages: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(sha256, canonical text) of a conversation: equal prompts get equal hashes across requests."""
    text = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), text


def make_engine(url: str, connect_timeout_s: float = 3.0) -> Engine:
    """An engine that fails fast when the server is away (connect timeout) and survives its restarts."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": connect_timeout_s})

        @event.listens_for(engine, "connect")
        def _wal(dbapi_conn: Any, _: Any) -> None:  # readers (the report) never block the writer
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=2,
        connect_args={"connect_timeout": max(1, int(connect_timeout_s))},
    )


def clean_text(text: str, max_length: int | None = None) -> str:
    """`text` storable in any database: no NUL, no lone surrogate (→ `?`), at most `max_length` chars."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode()
    return text[:max_length] if max_length is not None else text


def clean_json(value: Any) -> Any:
    """A JSON value PostgreSQL accepts: strings cleaned, NaN and infinities as null (JSON has neither)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def clean_row(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """The row with every string bounded by its column's length and every value cleaned (see above)."""
    out = {}
    for key, value in row.items():
        column = table.c.get(key)
        if column is not None and isinstance(value, str):
            value = clean_text(value, getattr(column.type, "length", None))
        elif column is not None and isinstance(column.type, JSON) and value is not None:
            value = clean_json(value)
        out[key] = value
    return out


@dataclass
class _Item:
    table: Table
    row: dict[str, Any]


class _Unreachable(Exception):
    """The database cannot be reached: keep the batch and retry later."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class DecisionLog:
    """Bounded queue + writer thread. `record`/`add_feedback` never block and never raise."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 10000,
        batch_size: int = 256,
        flush_interval_s: float = 0.5,
        connect_timeout_s: float = 3.0,
        on_drop: Callable[[str, int], None] | None = None,
        on_written: Callable[[int], None] | None = None,
        on_error: Callable[[], None] | None = None,
        recent: int = 100_000,
    ) -> None:
        self.url = url
        self.engine = make_engine(url, connect_timeout_s)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._on_drop = on_drop or (lambda reason, n: None)
        self._on_written = on_written or (lambda n: None)
        self._on_error = on_error or (lambda: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._schema_ready = False
        self._schema_lock = threading.Lock()  # the writer and feedback lookups may both create it
        self._recent: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self._recent_max = recent
        self._last_error_log = 0.0
        self._last_reject_log = 0.0
        self.dropped = 0
        self.written = 0

    # -- request path ---------------------------------------------------------------------------------
    def remember(self, request_id: str, experiment: str | None, arm: str | None) -> None:
        """Note a request id before its row is written, so feedback can arrive at once (loop thread only).

        Bounded by `recent` (the gateway passes queue + batch size: at most that many rows can be
        unwritten); older ids are looked up in the database.
        """
        self._recent[request_id] = (experiment, arm)
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    def recent(self, request_id: str) -> tuple[str | None, str | None] | None:
        return self._recent.get(request_id)

    def record(self, row: dict[str, Any]) -> bool:
        return self._put(_Item(decisions, clean_row(decisions, row)))

    def add_feedback(self, request_id: str, score: float | None, label: str | None) -> bool:
        row = {"request_id": request_id, "ts": now(), "score": score, "label": label}
        return self._put(_Item(feedback, clean_row(feedback, row)))

    def _put(self, item: _Item) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._on_drop("queue_full", 1)
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    # -- lookups (blocking: call from a worker thread) ----------------------------------------------------
    def lookup(self, request_id: str) -> tuple[str | None, str | None] | None:
        """(experiment, arm) of a logged request, or None when the id is unknown. Raises if the DB is down."""
        self._ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(decisions.c.experiment, decisions.c.arm).where(decisions.c.request_id == request_id)
            ).first()
        return None if row is None else (row[0], row[1])

    # -- writer thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moerge-decision-log", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (up to `timeout_s`), then stop; what is left is dropped and counted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        left = self._queue.qsize()
        if left:
            self.dropped += left
            self._on_drop("shutdown", left)
        self.engine.dispose()

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if not self._schema_ready:
                metadata.create_all(self.engine, checkfirst=True)
                self._schema_ready = True

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        try:
            batch.append(self._queue.get(timeout=self.flush_interval_s))
        except queue.Empty:
            return batch
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        batch: list[_Item] = []
        failures = 0
        while True:
            if not batch:
                if self._stop.is_set() and self._queue.empty():
                    return
                batch = self._take()
                if not batch:
                    continue
            try:
                self._write(batch)  # writes what it can; what is left when the database is away stays
            except _Unreachable as err:
                failures += 1
                self._on_error()
                self._log_error(err.cause)
                if self._stop.wait(min(0.1 * 2 ** min(failures, 6), 5.0)):
                    self.dropped += len(batch)  # shutting down with the database away
                    self._on_drop("shutdown", len(batch))
                    return
                continue
            failures = 0

    def _write(self, batch: list[_Item]) -> None:
        """Write `batch` (emptying it): in one transaction, or row by row if the database refuses it.

        Raises _Unreachable, with the unwritten rows still in `batch`, when the database cannot be
        reached; a row it refuses while reachable is dropped (reason `rejected`).
        """
        try:
            self._ensure_schema()
            self._insert(batch)
        except Exception as err:
            if not self._reachable():
                raise _Unreachable(err) from None
        else:
            self._wrote(len(batch))
            batch.clear()
            return
        while batch:  # the database is up and refused something in the batch: find which rows
            try:
                self._insert(batch[:1])
            except Exception as err:
                if not self._reachable():
                    raise _Unreachable(err) from None
                self.dropped += 1
                self._on_drop("rejected", 1)
                self._log_rejected(batch[0], err)
            else:
                self._wrote(1)
            del batch[0]

    def _wrote(self, n: int) -> None:
        self.written += n
        self._on_written(n)

    def _reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        return True

    def _insert(self, batch: list[_Item]) -> None:
        with self.engine.begin() as conn:
            for table in (decisions, feedback):  # decisions first: feedback refers to them
                rows = [i.row for i in batch if i.table is table]
                if rows:
                    conn.execute(table.insert(), rows)

    def _log_rejected(self, item: _Item, err: Exception) -> None:
        t = time.monotonic()
        if t - self._last_reject_log > 10:
            self._last_reject_log = t
            log.warning(
                "decision log: the database refused a %s row (request %s), dropped: %s",
                item.table.name,
                str(item.row.get("request_id"))[:64],
                str(err).splitlines()[0][:300],
            )

    def _log_error(self, err: Exception) -> None:
        t = time.monotonic()
        if t - self._last_error_log > 10:
            self._last_error_log = t
            log.warning(
                "decision log: cannot write to the database (%d rows queued, %d dropped so far): %s",
                self._queue.qsize(),
                self.dropped,
                str(err).splitlines()[0][:300],
            )
