"""The `perplexity` router's scorer: a prompt's mean token NLL under each candidate expert, from its own engine.

One short completions request per candidate, all at once: `prompt_logprobs: 0` (vLLM's extension to the
completions API: the logprob of each prompt token given the tokens before it, in-process and through
`vllm serve` alike), `max_tokens: 1`, greedy. The first prompt token has no logprob (nothing precedes
it), so the mean is over the others, each expert in its own tokenization: experts with different
tokenizers are compared per token of their own. A candidate that is unavailable (circuit open, withdrawn
adapter), times out, or answers with an error or without prompt logprobs is skipped, with the reason.
May import: router.perplexity, serving.backends.base.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from router.perplexity import PromptNLL
from serving.backends.base import Backend, JSONResult

log = logging.getLogger("moerge.serving")

DEFAULT_TIMEOUT_S = 10.0


class ScoreError(Exception):
    """A candidate could not score the prompt (its message says why, for the decision's details)."""


def mean_prompt_nll(body: Any) -> tuple[float, int]:
    """(mean NLL, tokens scored) of a completions answer's `prompt_logprobs` (with `prompt_token_ids`)."""
    try:
        choice = body["choices"][0]
        logprobs = choice["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ScoreError("the answer has no prompt_logprobs") from None
    if not isinstance(logprobs, list):
        raise ScoreError("the answer has no prompt_logprobs")
    ids = choice.get("prompt_token_ids")
    total, n = 0.0, 0
    for i, entry in enumerate(logprobs):
        if not entry:  # the first token: nothing before it to predict it from
            continue
        value = _token_logprob(entry, ids[i] if isinstance(ids, list) and i < len(ids) else None)
        total, n = total - value, n + 1
    if n == 0:
        raise ScoreError("the prompt has no token with a logprob (one token only?)")
    return total / n, n


def _token_logprob(entry: Mapping[Any, Any], token_id: int | None) -> float:
    """The prompt token's own logprob in one position's {token id: Logprob} (JSON: string keys)."""
    item = None
    if token_id is not None:
        item = entry.get(token_id, entry.get(str(token_id)))
    if item is None:
        if len(entry) != 1:
            raise ScoreError("cannot tell the prompt token among the position's logprobs")
        item = next(iter(entry.values()))
    value = item.get("logprob") if isinstance(item, Mapping) else getattr(item, "logprob", None)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ScoreError(f"invalid logprob {value!r}"[:80])
    return float(value)


class BackendScorer:
    """scorer(prompt, experts) for `PerplexityRouter`, over the gateway's backends, concurrently.

    `unusable(expert)` says why an expert must not be asked now (None: it may): the gateway's circuit
    breakers, so a dead candidate costs no timeout. Scoring gives no verdict to the breakers: it is not
    the client's request.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        unusable: Callable[[str], str | None] | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.backends = backends
        self.timeout_s = timeout_s
        self.unusable = unusable or (lambda expert: None)
        self.max_prompt_tokens = max_prompt_tokens

    def payload(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        }
        if self.max_prompt_tokens is not None:  # keeps the prompt's last tokens (vLLM's truncation)
            body["truncate_prompt_tokens"] = self.max_prompt_tokens
        return body

    async def score_one(self, expert: str, prompt: str) -> tuple[float, int]:
        backend = self.backends.get(expert)
        if backend is None:
            raise ScoreError("not served")
        if (why := self.unusable(expert)) is not None:
            raise ScoreError(why)
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await backend.request(
                    "completions",
                    self.payload(prompt),
                    None,
                    first_token_s=self.timeout_s,
                    total_s=self.timeout_s,
                )
        except TimeoutError:
            raise ScoreError(f"timed out after {self.timeout_s:g} s") from None
        if not isinstance(result, JSONResult):  # a stream: the backend ignored `stream: false`
            await result.close()
            raise ScoreError("the backend streamed its answer")
        if result.status != 200:
            raise ScoreError(f"HTTP {result.status}: {_error_message(result.body)}")
        return mean_prompt_nll(result.body)

    async def __call__(self, prompt: str, experts: Sequence[str]) -> PromptNLL:
        outcomes = await asyncio.gather(*(self.score_one(e, prompt) for e in experts), return_exceptions=True)
        nll: dict[str, float] = {}
        tokens: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for expert, outcome in zip(experts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                skipped[expert] = _why(outcome)
                log.warning("perplexity router: expert %s skipped: %s", expert, skipped[expert])
            else:
                nll[expert], tokens[expert] = outcome
        return PromptNLL(nll, tokens, skipped)


def _why(error: BaseException) -> str:
    text = str(error) if isinstance(error, ScoreError) else f"{type(error).__name__}: {error}"
    return text[:200]


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", ""))[:160]
    return str(body)[:160]
