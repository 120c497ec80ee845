"""The A/B and hardening features over HTTP, with stand-in OpenAI backends (no engine): experiments,
decision log (SQLite), feedback, auth, rate limits, concurrency cap, graceful drain, logs, tracing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import create_engine, func, select

from serving.app import create_app
from serving.auth import hash_key
from serving.config import load_config, parse_config
from serving.decision_log import decisions, feedback
from serving.logging_json import JsonFormatter
from tests.helpers import LOOPBACK, ThreadedServer, free_port, wait_http_ok

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
KEYS = {"alice": "sk-alice", "bob": "sk-bob", "slow": "sk-slow", "thin": "sk-thin", "capped": "sk-capped"}


def chunk(model: str, content: str | None = "ok", usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model}
    body["choices"] = (
        [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    )
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def fake_backend(gate: threading.Event | None = None) -> FastAPI:
    """A stand-in OpenAI server. With a gate, a stream sends one event, waits for the gate, then ends."""
    app = FastAPI()
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        if body.get("stream"):

            async def events() -> Any:
                yield chunk(body["model"])
                if gate is not None:
                    while not gate.is_set():
                        await asyncio.sleep(0.01)
                for _ in range(3):
                    yield chunk(body["model"])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk(body["model"], None, usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }

    return app


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture(scope="module")
def backends(gate: threading.Event) -> Iterator[dict[str, ThreadedServer]]:
    servers = {
        "ok": ThreadedServer(fake_backend()).start(),
        "gated": ThreadedServer(fake_backend(gate)).start(),
    }
    yield servers
    for s in servers.values():
        s.stop()


def base_config(backends: dict[str, ThreadedServer], db: Path, **extra: Any) -> dict[str, Any]:
    ok, gated = backends["ok"].url + "/v1", backends["gated"].url + "/v1"
    return {
        "server": {"max_concurrent_requests": 1, "log_decisions": True, "max_tokens": 100},
        "experts": {
            "good": {"backend": "openai", "url": ok},
            "other": {"backend": "openai", "url": ok},
            "gated": {"backend": "openai", "url": gated},
        },
        "routers": {
            "to-good": {"kind": "fixed", "params": {"expert": "good"}},
            "coin": {"kind": "random", "params": {"seed": 1}},
        },
        "experiments": {
            "ab": {
                "arms": {"control": {"router": "to-good"}, "treatment": {"expert": "other"}},
                "shadow": ["coin"],
            }
        },
        "routing_models": {"auto": "ab", "plain": "to-good"},
        "decision_log": {"enabled": True, "url": f"sqlite:///{db}", "flush_interval_s": 0.05},
        "auth": {
            "keys": {
                "alice": {"sha256": hash_key(KEYS["alice"])},
                "bob": {"sha256": hash_key(KEYS["bob"]), "models": ["auto"]},
                "slow": {"sha256": hash_key(KEYS["slow"]), "requests_per_minute": 2},
                "thin": {"sha256": hash_key(KEYS["thin"]), "tokens_per_minute": 5},
                "capped": {"sha256": hash_key(KEYS["capped"]), "max_tokens": 8},
            }
        },
        "circuit_breaker": {"health_interval_s": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ab-http") / "decisions.db"


@pytest.fixture(scope="module")
def gateway(backends: dict[str, ThreadedServer], db: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(parse_config(base_config(backends, db)))) as server:
        yield server


def auth(key: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[key]}"}


def chat(url: str, model: str = "auto", key: str | None = "alice", **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=auth(key) if key else {}, timeout=30)


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate: Any, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def db_rows(db: Path, table: Any = decisions) -> list[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(table))]
    finally:
        engine.dispose()


# -- experiments and the decision log --------------------------------------------------------------------
def test_experiment_arms_are_sticky_and_logged_with_shadow(gateway: ThreadedServer, db: Path) -> None:
    seen: dict[str, set[str]] = {}
    ids: dict[str, str] = {}
    for round_ in range(3):
        for i in range(12):
            resp = chat(
                gateway.url,
                user=f"u{i}",
                stream=round_ == 2,
                stream_options={"include_usage": True} if round_ == 2 else None,
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-moerge-experiment"] == "ab"
            arm = resp.headers["x-moerge-arm"]
            seen.setdefault(f"u{i}", set()).add(arm)
            expected_expert = "good" if arm == "control" else "other"
            assert resp.headers["x-moerge-expert"] == expected_expert
            ids[resp.headers["x-moerge-request-id"]] = arm
            if round_ < 2:
                ext = resp.json()["moerge"]
                assert ext["experiment"] == "ab" and ext["arm"] == arm
                assert ext["request_id"] == resp.headers["x-moerge-request-id"]
            else:
                first = json.loads(resp.text.split("\n\n")[0][len("data: ") :])
                assert first["moerge"]["arm"] == arm
    assert all(len(arms) == 1 for arms in seen.values()), "a user keeps their arm"
    assert {a for arms in seen.values() for a in arms} == {"control", "treatment"}
    assert wait_for(lambda: len([r for r in db_rows(db) if r["request_id"] in ids]) == len(ids))
    rows = {r["request_id"]: r for r in db_rows(db) if r["request_id"] in ids}
    for rid, row in rows.items():
        assert row["experiment"] == "ab" and row["arm"] == ids[rid] and row["status"] == 200
        assert row["router"] == ("to-good" if row["arm"] == "control" else "expert:other")
        assert set(row["shadow"]) == {"coin"} and row["shadow"]["coin"]["expert"] in (
            "good",
            "other",
            "gated",
        )
        assert row["prompt"] is None and len(row["prompt_sha256"]) == 64, "prompts are not stored by default"
        assert row["tokens_in"] == 10 and row["tokens_out"] == 10 and row["latency_s"] > 0
        assert row["unit"] and row["api_key"] == "alice"
        assert (row["ttft_s"] is not None) == bool(row["stream"])
    units = {r["unit"] for r in rows.values()}
    assert len(units) == 12, "one unit per sticky user"
    assert metric(gateway.url, "moerge_ab_requests_total", experiment="ab", status="200") >= len(ids)
    assert metric(gateway.url, "moerge_shadow_decisions_total", router="coin") >= len(ids)
    assert metric(gateway.url, "moerge_decision_log_written_total") >= len(ids)


def test_direct_and_router_models_are_not_attributed(gateway: ThreadedServer) -> None:
    for model in ("good", "plain"):
        resp = chat(gateway.url, model=model, user="u1")
        assert resp.status_code == 200 and "x-moerge-experiment" not in resp.headers
        assert resp.json()["moerge"]["experiment"] is None


def test_feedback(gateway: ThreadedServer, db: Path) -> None:
    resp = chat(gateway.url, user="fb-user")
    rid, arm = resp.headers["x-moerge-request-id"], resp.headers["x-moerge-arm"]
    post = lambda body, key="alice": httpx.post(gateway.url + "/v1/feedback", json=body, headers=auth(key))  # noqa: E731
    ok = post({"request_id": rid, "score": 0.75, "label": "good"})  # at once: the row may not be written yet
    assert ok.status_code == 200, ok.text
    assert ok.json() == {
        "object": "feedback",
        "request_id": rid,
        "experiment": "ab",
        "arm": arm,
        "score": 0.75,
        "label": "good",
    }
    assert post({"request_id": rid, "label": "wrong_expert"}).status_code == 200
    err = error_of(post({"request_id": "req-nope", "score": 1}), 404)
    assert err["code"] == "request_not_found" and err["param"] == "request_id"
    assert error_of(post({"request_id": rid}), 400)["message"]
    assert error_of(
        httpx.post(
            gateway.url + "/v1/feedback",
            content=b'{"request_id": "x", "score": NaN}',
            headers={**auth(), "content-type": "application/json"},
        ),
        400,
    )
    assert error_of(post({"request_id": rid, "score": 1, "extra": 1}), 400)["param"] == "extra"
    error_of(httpx.post(gateway.url + "/v1/feedback", json={"request_id": rid, "score": 1}), 401)
    assert wait_for(lambda: len([f for f in db_rows(db, feedback) if f["request_id"] == rid]) == 2)
    stored = {(f["score"], f["label"]) for f in db_rows(db, feedback) if f["request_id"] == rid}
    assert stored == {(0.75, "good"), (None, "wrong_expert")}
    assert metric(gateway.url, "moerge_ab_feedback_total", experiment="ab", arm=arm) >= 2


# -- auth, limits ---------------------------------------------------------------------------------------
def test_feedback_labels_do_not_grow_metric_series(gateway: ThreadedServer, db: Path) -> None:
    """Labels outside `decision_log.feedback_labels` are counted as `other`: a client cannot add series.
    The decision log keeps each label as sent (cleaned: this one has a NUL)."""
    rid = chat(gateway.url, user="fb-labels").headers["x-moerge-request-id"]
    size = len(httpx.get(gateway.url + "/metrics").text)
    for i in range(60):
        body = {"request_id": rid, "label": f"spam-{i}\u0000"}
        assert httpx.post(gateway.url + "/v1/feedback", json=body, headers=auth()).status_code == 200
    body = {"request_id": rid, "label": "thumbs_up"}
    assert httpx.post(gateway.url + "/v1/feedback", json=body, headers=auth()).status_code == 200
    text = httpx.get(gateway.url + "/metrics").text
    assert "spam" not in text and len(text) - size < 2_000
    assert metric(gateway.url, "moerge_ab_feedback_total", label="other") >= 60
    assert metric(gateway.url, "moerge_ab_feedback_total", label="thumbs_up") >= 1
    assert wait_for(lambda: len([f for f in db_rows(db, feedback) if f["request_id"] == rid]) == 61)
    labels = {f["label"] for f in db_rows(db, feedback) if f["request_id"] == rid}
    assert "spam-7" in labels and "thumbs_up" in labels


def test_feedback_label_set_is_validated() -> None:
    base = {"experts": {"a": {"backend": "openai", "url": "http://127.0.0.1:9/v1"}}}
    for bad in (["other"], ["score"], ["has space"], ["x" * 65]):
        with pytest.raises(ValueError, match="decision_log.feedback_labels"):
            parse_config({**base, "decision_log": {"feedback_labels": bad}})
    cfg = parse_config({**base, "decision_log": {"feedback_labels": ["ok"]}}).decision_log
    assert [cfg.metric_label(x) for x in ("ok", "good", None)] == ["ok", "other", "score"]


def test_auth_401_and_403(gateway: ThreadedServer) -> None:
    err = error_of(chat(gateway.url, key=None), 401)
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
    bad = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "auto", "messages": []},
        headers={"authorization": "Bearer sk-wrong"},
    )
    assert error_of(bad, 401)["code"] == "invalid_api_key" and bad.headers["www-authenticate"] == "Bearer"
    err = error_of(chat(gateway.url, model="good", key="bob"), 403)
    assert err["type"] == "permission_error" and err["param"] == "model"
    assert chat(gateway.url, model="auto", key="bob").status_code == 200
    models = httpx.get(gateway.url + "/v1/models", headers=auth("bob")).json()["data"]
    assert [m["id"] for m in models] == ["auto"] and models[0]["moerge"]["experiment"] == "ab"
    error_of(httpx.get(gateway.url + "/v1/models"), 401)
    assert httpx.get(gateway.url + "/health").status_code == 200, "health stays open"
    assert metric(gateway.url, "moerge_rejected_total", reason="auth") >= 3
    assert metric(gateway.url, "moerge_rejected_total", reason="model_not_allowed") >= 1


def test_max_tokens_caps_per_key_and_gateway(gateway: ThreadedServer) -> None:
    assert chat(gateway.url, key="capped", max_tokens=8).status_code == 200
    err = error_of(chat(gateway.url, key="capped", max_tokens=9), 400)
    assert err["param"] == "max_tokens" and "at most 8" in err["message"]
    assert chat(gateway.url, max_tokens=100).status_code == 200
    err = error_of(chat(gateway.url, max_completion_tokens=101), 400)
    assert err["param"] == "max_completion_tokens" and "at most 100" in err["message"]


def test_rate_limits_answer_429_with_retry_after(gateway: ThreadedServer) -> None:
    assert chat(gateway.url, key="slow").status_code == 200
    assert chat(gateway.url, key="slow").status_code == 200
    limited = chat(gateway.url, key="slow")
    err = error_of(limited, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_requests"
    assert int(limited.headers["retry-after"]) >= 1
    assert chat(gateway.url, key="thin").status_code == 200  # 20 tokens used of 5 per minute
    thin = chat(gateway.url, key="thin")
    assert error_of(thin, 429)["code"] == "rate_limit_tokens" and int(thin.headers["retry-after"]) >= 1
    assert chat(gateway.url, key="alice").status_code == 200, "limits are per key"


def test_failed_requests_are_counted(gateway: ThreadedServer) -> None:
    def count(status: str) -> float:
        return metric(gateway.url, "moerge_requests_total", endpoint="chat", status=status)

    before = {s: count(s) for s in ("400", "401", "404")}
    error_of(chat(gateway.url, model="nope"), 404)
    error_of(chat(gateway.url, temperature=9), 400)
    error_of(chat(gateway.url, key=None), 401)
    assert {s: count(s) - before[s] for s in before} == {"400": 1, "401": 1, "404": 1}
    assert 'model="nope"' not in httpx.get(gateway.url + "/metrics").text, (
        "unknown names do not become labels"
    )


def test_concurrency_cap_answers_503_at_once(gateway: ThreadedServer, gate: threading.Event) -> None:
    gate.clear()
    slots = gateway.app.state.slots
    body = {"model": "gated", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30
    ) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        assert slots.in_flight == 1, "the open stream holds its slot"
        assert metric(gateway.url, "moerge_requests_in_flight", endpoint="chat") == 1
        over = chat(gateway.url)
        err = error_of(over, 503)
        assert err["code"] == "overloaded" and over.headers["retry-after"] == "1"
        gate.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert wait_for(lambda: slots.in_flight == 0)
    assert metric(gateway.url, "moerge_requests_in_flight") == 0
    assert chat(gateway.url).status_code == 200, "the slot is free again"
    assert metric(gateway.url, "moerge_rejected_total", reason="concurrency") >= 1


def test_request_ids_in_json_logs(gateway: ThreadedServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moerge.serving"):
        resp = chat(gateway.url, user="log-user")
    rid = resp.headers["x-moerge-request-id"]
    routes = [r for r in caplog.records if r.getMessage().startswith("route ")]
    assert routes, "log_decisions writes a line per decision"
    line = json.loads(JsonFormatter().format(routes[-1]))
    assert line["request_id"] == rid and line["level"] == "info" and "experiment=ab" in line["msg"]


# -- outages and shutdown (their own gateways) ---------------------------------------------------------------
def test_decision_log_down_keeps_serving_and_counts_drops(
    backends: dict[str, ThreadedServer], tmp_path: Path
) -> None:
    dead = f"postgresql://postgres@{LOOPBACK}:{free_port()}/moerge"
    config = base_config(
        backends,
        tmp_path / "unused.db",
        decision_log={"enabled": True, "url": dead, "queue_size": 3, "batch_size": 2, "connect_timeout_s": 1},
    )
    with ThreadedServer(create_app(parse_config(config))) as server:
        for i in range(12):
            assert chat(server.url, user=f"u{i}").status_code == 200
        assert wait_for(
            lambda: metric(server.url, "moerge_decision_log_dropped_total", reason="queue_full") >= 1
        )
        assert metric(server.url, "moerge_decision_log_write_errors_total") >= 1
        assert metric(server.url, "moerge_decision_log_written_total") == 0
        rid = chat(server.url, user="x").headers["x-moerge-request-id"]
        fb = httpx.post(
            server.url + "/v1/feedback", json={"request_id": "req-unknown", "score": 1}, headers=auth()
        )
        assert error_of(fb, 503)["code"] == "decision_log_unavailable"
        assert rid


def test_graceful_shutdown_drains_open_streams(
    backends: dict[str, ThreadedServer], gate: threading.Event, tmp_path: Path
) -> None:
    gate.clear()
    server = ThreadedServer(create_app(parse_config(base_config(backends, tmp_path / "d.db")))).start()
    body = {"model": "gated", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30
    ) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        server.server.should_exit = True  # what SIGTERM does

        def refused() -> bool:
            try:
                httpx.get(server.url + "/health", timeout=1)
            except httpx.TransportError:
                return True
            return False

        assert wait_for(refused), "the server stopped accepting connections"
        assert server.thread.is_alive(), "and waits for the open stream"
        gate.set()
        rest = [line for line in lines if line]
    assert len(rest) == 4 and rest[-1] == "data: [DONE]", rest
    server.thread.join(30)
    assert not server.thread.is_alive()
    rows = db_rows(tmp_path / "d.db")
    assert [r["status"] for r in rows] == [200], "the drained stream was logged before exit"


def test_sigterm_drains_a_moerge_serve_process(
    backends: dict[str, ThreadedServer], gate: threading.Event, tmp_path: Path
) -> None:
    """A real SIGTERM to `moerge serve` with two open streams: new requests get 503 `shutting_down`
    (and /ready 503) while the streams finish; then the process exits, their rows logged."""
    gate.clear()
    port = free_port()
    config = base_config(backends, tmp_path / "d.db")
    config["server"] = {"port": port, "drain_s": 30}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://{LOOPBACK}:{port}"
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    body = {"model": "gated", "messages": [{"role": "user", "content": "x"}], "stream": True}
    try:
        wait_http_ok(url + "/ready", 120, proc)
        with (
            httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as a,
            httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as b,
        ):
            streams = [a.iter_lines(), b.iter_lines()]
            assert all(next(lines).startswith("data: ") for lines in streams)
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: httpx.get(url + "/ready").status_code == 503)
            assert httpx.get(url + "/ready").json()["draining"] is True
            refused = chat(url, model="good")
            assert error_of(refused, 503)["code"] == "shutting_down" and refused.headers["retry-after"]
            assert proc.poll() is None, "the process waits for its open streams"
            gate.set()
            rests = [[line for line in lines if line] for lines in streams]
        assert all(len(rest) == 4 and rest[-1] == "data: [DONE]" for rest in rests), rests
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    rows = db_rows(tmp_path / "d.db")
    assert sorted(r["status"] for r in rows) == [200, 200], "both drained streams were logged"


def test_tracing_spans(backends: dict[str, ThreadedServer], tmp_path: Path) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("a global tracer provider was already set in this process")
    config = base_config(backends, tmp_path / "d.db", tracing={"enabled": True})
    with ThreadedServer(create_app(parse_config(config))) as server:
        resp = chat(server.url, user="traced")
    spans = [s for s in exporter.get_finished_spans() if s.name == "moerge.request"]
    assert len(spans) == 1
    attrs = spans[0].attributes
    assert attrs["moerge.request_id"] == resp.headers["x-moerge-request-id"]
    assert attrs["moerge.experiment"] == "ab" and attrs["moerge.arm"] == resp.headers["x-moerge-arm"]
    assert attrs["http.response.status_code"] == 200


def test_example_ab_config_serves(backends: dict[str, ThreadedServer], tmp_path: Path) -> None:
    """examples/serve-ab.yaml as written, with its experts pointed at stand-in backends."""
    data = yaml.safe_load((ROOT / "examples" / "serve-ab.yaml").read_text())
    data["experts"] = {
        name: {"backend": "openai", "url": backends["ok"].url + "/v1"} for name in data["experts"]
    }
    data["decision_log"]["url"] = f"sqlite:///{tmp_path / 'ab.db'}"
    path = tmp_path / "serve-ab.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    with ThreadedServer(create_app(config)) as server:
        key = {"authorization": "Bearer sk-moerge-example"}
        arms = set()
        for i in range(20):
            body = {"model": "auto", "user": f"user-{i}", "messages": [{"role": "user", "content": "hi"}]}
            resp = httpx.post(server.url + "/v1/chat/completions", json=body, headers=key, timeout=30)
            assert resp.status_code == 200 and resp.headers["x-moerge-experiment"] == "router-ab"
            arms.add(resp.headers["x-moerge-arm"])
        assert arms <= {"control", "treatment", "text-only"} and len(arms) >= 2
        ro = {"authorization": "Bearer sk-moerge-readonly"}
        body = {"model": "math", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(server.url + "/v1/chat/completions", json=body, headers=ro).status_code == 403
    assert wait_for(lambda: len(db_rows(tmp_path / "ab.db")) == 20)
    shadows = {r["shadow"]["always-code"]["expert"] for r in db_rows(tmp_path / "ab.db")}
    assert shadows == {"code"}
    assert re.fullmatch(r"[0-9a-f]{64}", data["auth"]["keys"]["example"]["sha256"])
    engine = create_engine(f"sqlite:///{tmp_path / 'ab.db'}")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar() == 20
    engine.dispose()
