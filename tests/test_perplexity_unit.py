"""The perplexity router's pieces without an engine: the decision, the scorer over backends, the config.

Backends here are fakes of one piece (the `Backend` interface); tests/test_serving_perplexity.py runs the
same scorer on real tiny engines, in-process and remote.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from router.base import RoutingRequest, create_router
from router.perplexity import PerplexityRouter, PromptNLL
from serving.backends.base import Backend, BackendUnavailable, JSONResult
from serving.config import ConfigError, parse_config
from serving.perplexity import BackendScorer, ScoreError, mean_prompt_nll
from serving.routing import MicroBatcher, RouterOverloaded, load_router

pytestmark = pytest.mark.timeout(60)
EXPERTS = ["math", "code", "text"]


def answer(logprobs: list[float | None], ids: list[int] | None = None, str_keys: bool = True) -> dict:
    """A completions answer as vLLM writes it with `prompt_logprobs: 0` (JSON: string token ids)."""
    ids = ids or list(range(100, 100 + len(logprobs)))
    entries: list[dict | None] = [
        None if lp is None else {(str(t) if str_keys else t): {"logprob": lp, "rank": 1}}
        for t, lp in zip(ids, logprobs, strict=True)
    ]
    return {"choices": [{"text": "x", "prompt_logprobs": entries, "prompt_token_ids": ids}]}


# -- the decision --------------------------------------------------------------------------------------
def test_async_scorer_lowest_nll_wins_and_skips_are_named() -> None:
    async def scorer(text: str, experts: Any) -> PromptNLL:
        assert text == "2+2" and list(experts) == EXPERTS
        return PromptNLL({"math": 1.0, "code": 3.0}, {"math": 4, "code": 5}, {"text": "timed out after 1 s"})

    router = create_router("perplexity", experts=EXPERTS, scorer=scorer, temperature=0.5)
    assert isinstance(router, PerplexityRouter)
    d = asyncio.run(router.decide_async(RoutingRequest.from_prompt("2+2")))
    assert d.expert == "math" and d.reason == "perplexity;skipped=text"
    assert set(d.scores) == {"math", "code"}, "a skipped candidate has no score"
    assert math.isclose(d.scores["math"], 1 / (1 + math.exp(-4.0)))  # softmax of -nll/T
    assert d.details["skipped"] == {"text": "timed out after 1 s"} and d.details["nll"]["code"] == 3.0


def test_no_candidate_scored_empty_prompt_and_async_scorer_on_the_sync_path() -> None:
    async def nothing(text: str, experts: Any) -> PromptNLL:
        return PromptNLL({}, {}, {e: "HTTP 400" for e in experts})

    router = PerplexityRouter(EXPERTS, scorer=nothing, fallback="text")
    d = asyncio.run(router.decide_async(RoutingRequest.from_prompt("x")))
    assert d.expert == "text" and d.reason == "no-candidate-scored→fallback"
    assert set(d.details["skipped"]) == set(EXPERTS)
    empty = asyncio.run(router.decide_async(RoutingRequest(messages=[{"role": "system", "content": "s"}])))
    assert empty.expert == "text" and empty.reason == "empty-prompt→fallback"
    sync = router.decide(RoutingRequest.from_prompt("x"))  # the engines live on serving's loop only
    assert sync.expert == "text" and sync.reason == "scorer-error→fallback"
    assert "decide_async" in sync.details["error"]


def test_a_plain_mapping_scorer_with_a_missing_or_nan_expert() -> None:
    router = create_router(
        "perplexity", experts=EXPERTS, scorer=lambda t, e: {"math": 2.0, "code": float("nan")}
    )
    d = router.decide(RoutingRequest.from_prompt("x"))
    assert d.expert == "math" and d.reason == "perplexity;skipped=code,text"


# -- reading prompt logprobs -----------------------------------------------------------------------------
def test_mean_prompt_nll_skips_the_first_token_and_reads_both_key_kinds() -> None:
    assert mean_prompt_nll(answer([None, -1.0, -3.0])) == (2.0, 2)
    assert mean_prompt_nll(answer([None, -1.0, -3.0], str_keys=False)) == (2.0, 2)  # in-process dump
    with pytest.raises(ScoreError, match="no token with a logprob"):
        mean_prompt_nll(answer([None]))
    with pytest.raises(ScoreError, match="no prompt_logprobs"):
        mean_prompt_nll({"choices": [{"text": "x", "prompt_logprobs": None}]})
    top2 = answer([None, -1.0])
    top2["choices"][0]["prompt_logprobs"][1]["7"] = {"logprob": -0.1}  # a top-k entry beside the token
    assert mean_prompt_nll(top2) == (1.0, 1), "the prompt token's own logprob, not the best one"


class FakeBackend(Backend):
    """One piece's fake: answers a completions request with a fixed result, an error, or silence."""

    kind = "fake"

    def __init__(self, name: str, outcome: Any, delay_s: float = 0.0) -> None:
        super().__init__(name)
        self.outcome, self.delay_s = outcome, delay_s
        self.payloads: list[dict[str, Any]] = []

    async def health(self) -> bool:
        return True

    async def request(self, endpoint: Any, payload: Any, raw: Any, **kw: Any) -> JSONResult:
        assert endpoint == "completions"
        self.payloads.append(payload)
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_backend_scorer_asks_each_candidate_concurrently_and_skips_failures() -> None:
    backends: dict[str, Backend] = {
        "math": FakeBackend("math", JSONResult(200, answer([None, -0.5, -0.5])), delay_s=0.3),
        "code": FakeBackend("code", JSONResult(200, answer([None, -2.0])), delay_s=0.3),
        "down": FakeBackend("down", BackendUnavailable("down: connection refused")),
        "slow": FakeBackend("slow", JSONResult(200, answer([None, -0.1])), delay_s=30),
        "refuses": FakeBackend("refuses", JSONResult(400, {"error": {"message": "prompt too long"}})),
        "open": FakeBackend("open", JSONResult(200, answer([None, -0.1]))),
    }
    scorer = BackendScorer(
        backends, timeout_s=1.0, unusable=lambda e: "circuit open" if e == "open" else None
    )
    result = asyncio.run(scorer("2+2", [*backends, "ghost"]))
    assert result.nll == {"math": 0.5, "code": 2.0} and result.tokens == {"math": 2, "code": 1}
    assert result.skipped == {
        "down": "BackendUnavailable: down: connection refused",
        "slow": "timed out after 1 s",
        "refuses": "HTTP 400: prompt too long",
        "open": "circuit open",
        "ghost": "not served",
    }
    sent = backends["math"].payloads[0]  # type: ignore[attr-defined]
    assert sent["prompt_logprobs"] == 0 and sent["max_tokens"] == 1 and sent["prompt"] == "2+2"
    assert not backends["open"].payloads  # type: ignore[attr-defined]  # an open breaker costs nothing


# -- serving: config and the awaited (not batched) path ----------------------------------------------------
def serve_config(router: dict[str, Any]) -> dict[str, Any]:
    experts = {e: {"backend": "openai", "url": f"http://127.0.0.1:9/{e}/v1"} for e in EXPERTS}
    return {"experts": experts, "routers": {"ppl": router}}


@pytest.mark.parametrize(
    ("router", "message"),
    [
        (
            {"kind": "perplexity", "experts": ["math", "nope"]},
            r"routers\.ppl\.experts: unknown expert 'nope'",
        ),
        ({"kind": "perplexity", "fallback": "nope"}, r"routers\.ppl\.fallback: unknown expert 'nope'"),
        ({"kind": "perplexity", "params": {"temperature": 0}}, r"params\.temperature: .*greater than 0"),
        ({"kind": "perplexity", "params": {"timeout": 3}}, r"params\.timeout: Extra inputs .*timeout_s"),
        ({"kind": "perplexity", "params": {"max_chars": "x"}}, r"params\.max_chars: .*integer"),
    ],
)
def test_perplexity_config_errors_name_the_field(router: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(serve_config(router))


def test_a_serve_config_builds_the_router_over_its_candidates() -> None:
    cfg = parse_config(
        serve_config(
            {
                "kind": "perplexity",
                "experts": ["math", "code"],
                "fallback": "text",
                "params": {"timeout_s": 2},
            }
        )
    )
    rcfg = cfg.routers["ppl"]
    assert rcfg.perplexity_params().timeout_s == 2
    with pytest.raises(ValueError, match="needs the gateway's scorer"):
        load_router("ppl", rcfg, EXPERTS)
    router = load_router("ppl", rcfg, EXPERTS, scorer=lambda t, e: {"code": 1.0, "math": 2.0})
    assert isinstance(router, PerplexityRouter) and router.experts == ["math", "code"]
    assert router.fallback == "text"


def test_micro_batcher_awaits_an_async_router_concurrently_and_bounds_it() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        seen: list[str] = []

        async def scorer(text: str, experts: Any) -> dict[str, float]:
            seen.append(text)
            await gate.wait()
            return {"math": 1.0, "code": 2.0} if text.startswith("m") else {"math": 2.0, "code": 1.0}

        router = create_router("perplexity", experts=["math", "code"], scorer=scorer)
        shed: list[str] = []
        batcher = MicroBatcher("ppl", router, fallback="code", max_queue=2, on_shed=shed.append)
        first = asyncio.ensure_future(batcher.decide(RoutingRequest.from_prompt("m1")))
        second = asyncio.ensure_future(batcher.decide(RoutingRequest.from_prompt("c1")))
        await asyncio.sleep(0.05)
        assert seen == ["m1", "c1"] and batcher.queued() == 2, "both are scored at once, none waits"
        third = await batcher.decide(RoutingRequest.from_prompt("m2"))
        assert third.expert == "code" and third.reason == "router-overloaded→fallback" and shed == ["serving"]
        with pytest.raises(RouterOverloaded):
            await batcher.decide(RoutingRequest.from_prompt("m3"), shadow=True)
        gate.set()
        assert (await first).expert == "math" and (await second).expert == "code"
        assert batcher.queued() == 0
        batcher.close()

    asyncio.run(main())
