"""Live perplexity routing on real tiny engines: each candidate's own engine scores the prompt.

A gateway of this module's own serves the tiny zoo's `math` expert in-process (a fresh engine) and its
`code` expert through the session's `vllm serve`, with a `ppl` router over both. Its own engine because
the session gateway's in-process math engine once answered NaN prompt logprobs after
tests/test_serving_e2e.py: its generations ran past the tiny checkpoints' 256-row RoPE table (then
VLLM_ALLOW_LONG_MAX_MODEL_LEN, now conftest.LONG_POSITIONS) and left NaN in reused KV cache blocks
(test_serving_e2e.py::test_long_generation_logprobs_stay_finite). The failure test adds a gateway of
remote experts only: one whose server does not know its model, one that is not there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import math_expert  # the one module pytest loaded (tests/ is on sys.path)
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from merge.tiny import domain_prompts
from serving.app import create_app
from serving.config import parse_config
from serving.decision_log import decisions, make_engine
from tests.helpers import ThreadedServer, VllmServer, free_port, wait_http_ok

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

DOMAINS = ("math", "code")  # the module gateway's experts: math in-process, code remote
HELD_OUT_SEED = 7  # the tiny zoo trains on seeds 1 and 2


def rows(db: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            found = conn.execute(select(decisions).where(decisions.c.request_id.in_(ids)))
            return {r.request_id: dict(r._mapping) for r in found}
    except OperationalError:  # the log's writer has not created its table yet
        return {}
    finally:
        engine.dispose()


def logged(db: Path, ids: set[str], timeout_s: float = 20) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while len(found := rows(db, ids)) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


@pytest.fixture(scope="module")
def ppl_gateway(
    zoo: Any, code_server: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ThreadedServer, Path]]:
    db = tmp_path_factory.mktemp("ppl-live") / "decisions.db"
    config = parse_config(
        {
            "experts": {
                "math": math_expert(zoo, 512),
                "code": {"backend": "openai", "url": code_server.url + "/v1"},
            },
            "routers": {
                "ppl": {"kind": "perplexity", "experts": ["math", "code"], "params": {"timeout_s": 60}}
            },
            "routing_models": {"ppl": "ppl"},
            "decision_log": {"enabled": True, "url": f"sqlite:///{db}", "flush_interval_s": 0.05},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        wait_http_ok(server.url + "/ready", 300)
        yield server, db


@pytest.mark.parametrize("domain", DOMAINS)
def test_perplexity_router_picks_the_domain_expert(
    ppl_gateway: tuple[ThreadedServer, Path], domain: str
) -> None:
    """Held-out prompts of each domain go to that domain's expert, chat and completions alike, and the
    headers, the `moerge` field and the decision-log row say it was the perplexity router."""
    gateway, decision_db = ppl_gateway
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids: set[str] = set()
    raw: Any
    for i, prompt in enumerate(domain_prompts(domain, 4, seed=HELD_OUT_SEED)):
        if i % 2:
            raw = client.completions.with_raw_response.create(model="ppl", prompt=prompt, max_tokens=2)
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="ppl", messages=[{"role": "user", "content": prompt}], max_tokens=2
            )
        h, ext = raw.headers, raw.http_response.json()["moerge"]
        assert h["x-moerge-expert"] == domain, (prompt, ext["scores"])
        assert h["x-moerge-router"] == "perplexity" and h["x-moerge-reason"] == "perplexity"
        assert ext["router_name"] == "ppl" and set(ext["scores"]) == set(DOMAINS)
        assert ext["scores"][domain] == max(ext["scores"].values()) == ext["confidence"]
        ids.add(h["x-moerge-request-id"])
    found = logged(decision_db, ids)
    assert set(found) == ids
    for row in found.values():
        assert row["router"] == "ppl" and row["reason"] == "perplexity" and row["status"] == 200
        assert row["expert"] == row["served_expert"] == domain and set(row["scores"]) == set(DOMAINS)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert (
        f'moerge_routing_decisions_total{{expert="{domain}",reason="perplexity",router="perplexity"}}'
        in metrics
    )


@pytest.fixture(scope="module")
def failing_gateway(code_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    db = tmp_path_factory.mktemp("ppl-decisions") / "decisions.db"
    remote = code_server.url + "/v1"
    config = parse_config(
        {
            "experts": {
                "code": {"backend": "openai", "url": remote},
                # /health answers, but the server serves no such model: every request is a 404
                "unknown": {"backend": "openai", "url": remote, "model": "no-such-model", "fallback": "code"},
                "gone": {
                    "backend": "openai",
                    "url": f"http://127.0.0.1:{free_port()}/v1",
                    "fallback": "code",
                },
            },
            "routers": {
                "ppl": {"kind": "perplexity", "params": {"timeout_s": 30}},
                "ppl-broken": {"kind": "perplexity", "experts": ["unknown", "gone"], "fallback": "code"},
            },
            "routing_models": {"auto": "ppl", "broken": "ppl-broken"},
            "decision_log": {"enabled": True, "url": f"sqlite:///{db}", "flush_interval_s": 0.05},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        wait_http_ok(server.url + "/ready", 60)
        yield server, db


def test_failing_candidates_are_skipped_and_named(failing_gateway: Any) -> None:
    """A candidate whose engine refuses the request, and one that is down (its breaker opened by the
    health probe: no request is sent), are skipped; the decision says which; with none left, the
    fallback serves."""
    server, db = failing_gateway
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt: list[Any] = [{"role": "user", "content": domain_prompts("code", 1, seed=HELD_OUT_SEED)[0]}]
    some = client.chat.completions.with_raw_response.create(model="auto", messages=prompt, max_tokens=2)
    assert some.headers["x-moerge-expert"] == "code"
    assert some.headers["x-moerge-reason"] == "perplexity;skipped=unknown,gone"
    assert some.http_response.json()["moerge"]["scores"] == {"code": 1.0}
    none = client.chat.completions.with_raw_response.create(model="broken", messages=prompt, max_tokens=2)
    assert none.headers["x-moerge-expert"] == "code" and none.headers["x-moerge-confidence"] == "0.0000"
    assert none.headers["x-moerge-reason"] == "no-candidate-scored->fallback"
    found = logged(db, {some.headers["x-moerge-request-id"], none.headers["x-moerge-request-id"]})
    reasons = sorted(row["reason"] for row in found.values())
    assert reasons == ["no-candidate-scored→fallback", "perplexity;skipped=unknown,gone"]
    assert all(row["served_expert"] == "code" and row["status"] == 200 for row in found.values())
