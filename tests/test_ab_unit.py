"""A/B pieces without a server: sticky assignment, config validation, keys, rate limits, the report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from scipy import stats
from sqlalchemy import insert
from typer.testing import CliRunner

from serving.ab_cli import ab_app
from serving.auth import KeyRing, RateLimiter, hash_key
from serving.cli import register_serve_commands
from serving.config import ApiKey, ConfigError, load_config, parse_config
from serving.decision_log import decisions, feedback, make_engine, metadata
from serving.errors import OpenAIError
from serving.experiments import Experiment, assignment_key, unit_interval
from serving.report import build_report, srm_check

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
USERS = [f"user-{i}" for i in range(20000)]


def experiment_config(**exp: Any) -> dict[str, Any]:
    body = {
        "arms": {"control": {"router": "r1", "weight": 1}, "treatment": {"router": "r2", "weight": 2}},
        **exp,
    }
    return {
        "experts": {"a": {"backend": "vllm", "model": "m"}, "b": {"backend": "vllm", "model": "m"}},
        "routers": {"r1": {"kind": "fixed"}, "r2": {"kind": "random"}},
        "experiments": {"ab": body},
        "routing_models": {"auto": "ab"},
    }


def fresh(data: dict[str, Any]) -> Experiment:
    """An experiment built from scratch, as a restarted gateway would."""
    config = parse_config(json.loads(json.dumps(data)))
    return Experiment("ab", config.experiments["ab"])


# -- assignment ---------------------------------------------------------------------------------------
def test_assignment_is_sticky_across_restarts() -> None:
    data = experiment_config()
    first = fresh(data)
    arms = [first.assign(u, "req-1").arm for u in USERS[:3000]]
    again = [fresh(data).assign(u, f"req-{i}").arm for i, u in enumerate(USERS[:3000])]
    assert arms == again, "the same user must get the same arm after a restart, whatever the request id"
    assert all(first.assign(u, "x").sticky for u in USERS[:10])
    # A new salt reshuffles: about half the users change arm (not all, not none).
    other = fresh(experiment_config(salt="round-2"))
    changed = sum(a != other.assign(u, "r").arm for a, u in zip(arms, USERS[:3000], strict=True))
    assert 0.2 * 3000 < changed < 0.8 * 3000


def test_assignment_respects_weights_chi_square() -> None:
    exp = fresh(experiment_config())
    counts = {"control": 0, "treatment": 0}
    for u in USERS:
        counts[exp.assign(u, "r").arm] += 1
    observed = [counts["control"], counts["treatment"]]
    expected = [len(USERS) / 3, 2 * len(USERS) / 3]
    assert stats.chisquare(observed, expected).pvalue > 0.001, observed
    # and the hash is not trivially biased the other way: 1:2 is far from 1:1
    assert stats.chisquare(observed, [len(USERS) / 2] * 2).pvalue < 1e-10


def test_three_arms_and_traffic_share() -> None:
    data = experiment_config(traffic=0.3)
    data["experiments"]["ab"]["arms"]["fixed-b"] = {"expert": "b", "weight": 1}
    exp = fresh(data)
    assigned = [exp.assign(u, "r") for u in USERS]
    inside = [a for a in assigned if a.experiment == "ab"]
    assert stats.binomtest(len(inside), len(USERS), 0.3).pvalue > 0.001
    outside = [a for a in assigned if a.experiment is None]
    assert {a.arm for a in outside} == {"control"}, "outside the traffic share: the control policy"
    counts = [sum(a.arm == arm for a in inside) for arm in ("control", "treatment", "fixed-b")]
    expected = np.asarray([1, 2, 1]) / 4 * len(inside)
    assert stats.chisquare(counts, expected).pvalue > 0.001, counts
    # Widening the traffic keeps everyone already in the experiment in their arm.
    wider = fresh({**data, "experiments": {"ab": {**data["experiments"]["ab"], "traffic": 0.6}}})
    for u, a in zip(USERS[:2000], assigned[:2000], strict=True):
        if a.experiment is not None:
            assert wider.assign(u, "r") == a


def test_disabled_experiment_and_keyless_requests() -> None:
    off = fresh(experiment_config(enabled=False))
    assert {off.assign(u, "r").arm for u in USERS[:200]} == {"control"}
    assert off.assign("u", "r").experiment is None
    exp = fresh(experiment_config())
    keyless = [exp.assign(None, f"req-{i}") for i in range(600)]
    assert not any(a.sticky for a in keyless)
    assert {a.arm for a in keyless} == {"control", "treatment"}, "assigned per request without a key"


def test_assignment_keys() -> None:
    headers = {"x-team": "blue"}
    assert assignment_key("user", "alice", headers, "k") == "alice"
    assert assignment_key("user", None, headers, "k") is None
    assert assignment_key("api_key", "alice", headers, "k") == "k"
    assert assignment_key("header:X-Team", None, headers, None) == "blue"
    assert assignment_key("header:x-missing", "a", headers, None) is None
    assert unit_interval("s", "k") == unit_interval("s", "k") != unit_interval("t", "k")


# -- config validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"arms": {"x": {"router": "nope"}}}, "experiments.ab.arms.x.router"),
        ({"arms": {"x": {"expert": "zz"}}}, "experiments.ab.arms.x.expert"),
        ({"arms": {"x": {"router": "r1", "expert": "a"}}}, "experiments.ab.arms.x"),
        ({"arms": {"x": {"router": "r1", "weight": 0}}}, "experiments.ab.arms.x.weight"),
        ({"arms": {}}, "experiments.ab.arms"),
        ({"control": "nope"}, "experiments.ab"),
        ({"assign_by": "cookie"}, "experiments.ab.assign_by"),
        ({"traffic": 1.5}, "experiments.ab.traffic"),
        ({"shadow": ["nope"]}, "experiments.ab.shadow"),
        ({"color": "red"}, "experiments.ab.color"),
    ],
)
def test_experiment_config_errors_name_the_field(patch: dict[str, Any], field: str) -> None:
    data = experiment_config(**patch)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"routing_models": {"auto": "missing"}}, "routing_models.auto"),
        (
            {"routers": {"r1": {"kind": "fixed"}, "r2": {"kind": "random"}, "ab": {"kind": "fixed"}}},
            "experiments.ab",
        ),
        ({"auth": {"keys": {"k": {"sha256": "abc"}}}}, "auth.keys.k.sha256"),
        ({"auth": {"keys": {"k": {"sha256": hash_key("x"), "models": ["gpt"]}}}}, "auth.keys.k.models"),
        (
            {"auth": {"keys": {"k": {"sha256": hash_key("x"), "requests_per_minute": 0}}}},
            "auth.keys.k.requests_per_minute",
        ),
        (
            {"auth": {"keys": {"k": {"sha256": hash_key("x")}, "j": {"sha256": hash_key("x")}}}},
            "keys.j.sha256",
        ),
        ({"decision_log": {"url": "mysql://x/y"}}, "decision_log"),
        ({"decision_log": {"url": "::not a url::"}}, "decision_log"),
        ({"decision_log": {"queue_size": 0}}, "decision_log.queue_size"),
        ({"server": {"max_concurrent_requests": 0}}, "server.max_concurrent_requests"),
        ({"server": {"log_format": "xml"}}, "server.log_format"),
        ({"tracing": {"enabled": "maybe"}}, "tracing.enabled"),
    ],
)
def test_hardening_config_errors_name_the_field(patch: dict[str, Any], field: str) -> None:
    data = experiment_config()
    data.update(patch)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)


def test_example_ab_config_and_sqlite_path(tmp_path: Path) -> None:
    config = load_config(ROOT / "examples" / "serve-ab.yaml")
    assert config.experiments and config.decision_log.enabled and config.auth.keys
    exp_name = next(iter(config.experiments))
    assert exp_name in config.routing_models.values()
    url = config.decision_log.resolved_url()
    assert url.startswith("sqlite:////"), "a relative sqlite path resolves against the config file"
    pg = parse_config({**experiment_config(), "decision_log": {"url": "postgresql://u@h:5432/d"}})
    assert pg.decision_log.resolved_url().startswith("postgresql+psycopg://")


# -- keys and rate limits -----------------------------------------------------------------------------------
def test_keyring_hashes_and_models() -> None:
    ring = KeyRing(
        {"alice": ApiKey(sha256=hash_key("sk-a"), models=["auto"]), "bob": ApiKey(sha256=hash_key("sk-b"))}
    )
    assert ring.authenticate("Bearer sk-a") == "alice" and ring.authenticate("bearer sk-b") == "bob"
    for bad in (None, "", "Bearer", "Basic sk-a", "Bearer sk-c", "Bearer sk-a "[:-2]):
        with pytest.raises(OpenAIError) as err:
            ring.authenticate(bad)
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
    ring.check_model("alice", "auto")
    ring.check_model("bob", "anything")
    with pytest.raises(OpenAIError) as err:
        ring.check_model("alice", "math")
    assert err.value.status == 403 and err.value.param == "model"
    assert KeyRing({}).authenticate(None) is None, "no keys: auth is off"


def test_rate_limits_with_retry_after() -> None:
    now = [0.0]
    limiter = RateLimiter(
        {"k": ApiKey(sha256=hash_key("a"), requests_per_minute=2, tokens_per_minute=100)},
        clock=lambda: now[0],
    )
    limiter.admit("k")
    limiter.admit("k")
    with pytest.raises(OpenAIError) as err:
        limiter.admit("k")
    assert err.value.status == 429 and err.value.headers == {"retry-after": "30"}
    now[0] = 30.0
    limiter.admit("k")  # one request refilled
    limiter.settle_tokens("k", 0, 150)  # overdraws the token bucket by 50 (+ the refill since 0)
    now[0] = 90.0  # requests are full again; tokens: -50 + 100 = 50 > 0
    limiter.admit("k")
    limiter.settle_tokens("k", 0, 200)  # now at -150
    with pytest.raises(OpenAIError) as err:
        limiter.admit("k")
    assert err.value.code == "rate_limit_tokens" and err.value.headers == {"retry-after": "90"}
    limiter.admit(None)  # no key (auth off): never limited


def test_token_budget_is_reserved_at_admission_and_refunded() -> None:
    """20 concurrent requests that may each use 11 tokens, on a 100-tokens-a-minute key: only what the
    budget holds is admitted (9), never all 20; what a finished request did not use goes back."""
    now = [0.0]
    limiter = RateLimiter({"k": ApiKey(sha256=hash_key("a"), tokens_per_minute=100)}, clock=lambda: now[0])
    admitted, refused = [], 0
    for _ in range(20):
        try:
            admitted.append(limiter.reserve_tokens("k", 11))
        except OpenAIError as err:
            assert err.status == 429 and err.code == "rate_limit_tokens" and err.headers
            refused += 1
    assert (len(admitted), refused) == (9, 11)
    for reserved in admitted:
        limiter.settle_tokens("k", reserved, 2)  # each used 2 of its 11
    assert limiter.reserve_tokens("k", 80) == 80, "the unused 81 tokens came back"


def test_a_reservation_larger_than_the_budget_needs_a_full_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter({"k": ApiKey(sha256=hash_key("a"), tokens_per_minute=100)}, clock=lambda: now[0])
    assert limiter.reserve_tokens("k", 5000) == 100, "cut to the whole budget, admitted when it is full"
    with pytest.raises(OpenAIError):
        limiter.reserve_tokens("k", 5000)
    now[0] = 60.0
    assert limiter.reserve_tokens("k", 5000) == 100
    assert limiter.reserve_tokens(None, 5000) == 0, "auth off: no budget"


def test_keys_hash_cli() -> None:
    app = typer.Typer()
    register_serve_commands(app)
    result = CliRunner().invoke(app, ["keys", "hash", "sk-test"])
    assert result.exit_code == 0 and result.output.strip() == hash_key("sk-test")
    result = CliRunner().invoke(app, ["keys", "hash", "--generate"])
    key = result.output.split("key:")[1].split()[0]
    assert hash_key(key) in result.output


# -- the report on a seeded experiment ------------------------------------------------------------------------
def seed(url: str, arms: dict[str, int], *, experiment: str = "exp") -> dict[str, list[float]]:
    """Known rows: arm i has latency 0.1*(i+1) + j/1000 s; feedback on every other request."""
    engine = make_engine(url)
    metadata.create_all(engine)
    scores: dict[str, list[float]] = {}
    rows, fb = [], []
    for i, (arm, n) in enumerate(arms.items()):
        scores[arm] = []
        for j in range(n):
            rid = f"{arm}-{j}"
            rows.append(
                {
                    "request_id": rid,
                    "ts": datetime.now(UTC),
                    "endpoint": "chat",
                    "model": "auto",
                    "experiment": experiment,
                    "arm": arm,
                    "router": arm,
                    "expert": "math" if j % 4 else "code",
                    "served_expert": "math" if j % 4 else "code",
                    "status": 503 if j % 50 == 0 else 200,
                    "latency_s": 0.1 * (i + 1) + j / 1000,
                    "ttft_s": 0.01 * (i + 1) + j / 10000,
                    "tokens_in": 10,
                    "tokens_out": 20 + i,
                    "scores": {"math": 0.7},
                    "prompt_sha256": "0" * 64,
                }
            )
            if j % 2 == 0:
                score = (j % 10) / 10 + 0.1 * i
                scores[arm].append(score)
                fb.append({"request_id": rid, "ts": datetime.now(UTC), "score": score, "label": "good"})
    rows.append({**rows[0], "request_id": "other-1", "experiment": "other"})
    with engine.begin() as conn:
        conn.execute(insert(decisions), rows)
        conn.execute(insert(feedback), fb)
    engine.dispose()
    return scores


def test_report_numbers_on_seeded_experiment(tmp_path: Path) -> None:
    from serving.report import load_experiment

    url = f"sqlite:///{tmp_path / 'd.db'}"
    scores = seed(url, {"control": 100, "treatment": 200})
    rows, fb = load_experiment(url, "exp")
    report = build_report("exp", rows, fb, {"control": 1, "treatment": 1}, "control")
    c, t = report["arms"]["control"], report["arms"]["treatment"]
    assert (c["n"], t["n"], report["requests"]) == (100, 200, 300)
    assert c["errors"] == 2 and t["errors"] == 4
    assert c["expert_mix"] == {"math": 0.75, "code": 0.25}
    lat = [0.1 + j / 1000 for j in range(100)]
    assert c["latency_s"]["p50"] == pytest.approx(np.percentile(lat, 50))
    assert c["latency_s"]["p95"] == pytest.approx(np.percentile(lat, 95))
    assert t["tokens_out"] == pytest.approx(21)
    sc = scores["control"]
    half = stats.t.ppf(0.975, len(sc) - 1) * np.std(sc, ddof=1) / np.sqrt(len(sc))
    assert c["feedback"]["n"] == 50 and c["feedback"]["mean"] == pytest.approx(np.mean(sc))
    assert c["feedback"]["low"] == pytest.approx(np.mean(sc) - half)
    assert c["feedback"]["labels"] == {"good": 50}
    diff = report["vs_control"]["treatment"]
    welch = stats.ttest_ind(scores["treatment"], sc, equal_var=False)
    assert diff["feedback_score"]["p"] == pytest.approx(welch.pvalue)
    assert diff["feedback_score"]["mean_diff"] == pytest.approx(0.1)
    assert diff["latency_s"]["p"] < 1e-6 and diff["latency_s"]["median_diff"] > 0
    # 100 vs 200 requests where 1:1 was configured: a sample ratio mismatch
    assert report["srm"]["mismatch"] and report["srm"]["p"] < 0.001
    ok = build_report("exp", rows, fb, {"control": 1, "treatment": 2}, "control")
    assert not ok["srm"]["mismatch"] and ok["srm"]["p"] == pytest.approx(1.0)


def test_srm_counts_units_not_requests(tmp_path: Path) -> None:
    """Sticky users who send many requests are one unit each: 50 vs 50 users is no mismatch."""
    from serving.report import load_experiment

    url = f"sqlite:///{tmp_path / 'd.db'}"
    seed(url, {"control": 100, "treatment": 200})
    engine = make_engine(url)
    with engine.begin() as conn:
        for arm, per_user in (("control", 2), ("treatment", 4)):
            for j in range(100 if arm == "control" else 200):
                conn.execute(
                    decisions.update()
                    .where(decisions.c.request_id == f"{arm}-{j}")
                    .values(unit=f"{arm}-user-{j // per_user}")
                )
    engine.dispose()
    rows, fb = load_experiment(url, "exp")
    report = build_report("exp", rows, fb, {"control": 1, "treatment": 1}, "control")
    assert report["arms"]["control"]["units"] == 50 and report["arms"]["treatment"]["units"] == 50
    assert report["srm"]["p"] == pytest.approx(1.0) and not report["srm"]["mismatch"]


def test_srm_check_edge_cases() -> None:
    assert srm_check({"a": 0, "b": 0}, {"a": 1, "b": 1})["p"] is None
    assert not srm_check({"a": 510, "b": 490}, {"a": 1, "b": 1})["mismatch"]
    assert srm_check({"a": 600, "b": 400}, {"a": 1, "b": 1})["mismatch"]


def test_ab_report_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    seed(url, {"control": 100, "treatment": 200})
    runner = CliRunner()
    app = typer.Typer()
    app.add_typer(ab_app, name="ab")

    @app.callback()
    def main() -> None: ...

    out = runner.invoke(app, ["ab", "report", "exp", "--db", url, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["arms"]["treatment"]["n"] == 200 and data["srm"]["mismatch"] is True
    png = tmp_path / "ab.png"
    out = runner.invoke(
        app, ["ab", "report", "exp", "--db", url, "--weights", "control=1,treatment=1", "--plot", str(png)]
    )
    assert out.exit_code == 0, out.output
    assert "SAMPLE RATIO MISMATCH" in out.output and "treatment" in out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = runner.invoke(app, ["ab", "report", "exp", "--db", url, "--weights", "control=1,treatment=2"])
    assert "sample ratio check: ok" in out.output
    bad = runner.invoke(app, ["ab", "report", "exp", "--db", url, "--weights", "control"])
    assert bad.exit_code != 0 and "--weights" in bad.output
