"""`perplexity`: MergeME's sequence-level routing, a softmax over the experts' negated prompt perplexity.

It needs every candidate expert to score the prompt, so only serving can supply the scorer (its backends:
serving/perplexity.py); this module fixes the interface and the decision, so that serving only plugs in
`scorer`. A candidate the scorer could not score (down, timed out, refused the prompt) is skipped and the
decision's reason names it; when none could, the fallback expert serves.
May import: router.base, router.text.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.base import AsyncRouter, Decision, RoutingRequest, register
from router.text import RoutingText, routing_text

# Prompts are cut (middle out) to this many characters: each candidate scores the whole prompt.
DEFAULT_MAX_CHARS = 4096


@dataclass(frozen=True)
class PromptNLL:
    """One prompt's scores: mean token NLL for each expert that scored it, and why the others did not."""

    nll: dict[str, float]
    tokens: dict[str, int] = field(default_factory=dict)  # how many prompt tokens each expert scored
    skipped: dict[str, str] = field(default_factory=dict)  # expert → why it has no score


ScorerResult = Mapping[str, float] | PromptNLL
# scorer(prompt, experts) -> {expert: mean token NLL of the prompt under it} (or a PromptNLL), or its awaitable
PromptNLLScorer = Callable[[str, Sequence[str]], ScorerResult | Awaitable[ScorerResult]]


def as_prompt_nll(result: ScorerResult, experts: Sequence[str]) -> PromptNLL:
    """A scorer's answer with every candidate either scored (a finite NLL) or skipped with a reason."""
    given = result.nll if isinstance(result, PromptNLL) else dict(result)
    skipped = dict(result.skipped) if isinstance(result, PromptNLL) else {}
    nll: dict[str, float] = {}
    for e in experts:
        value = given.get(e)
        if isinstance(value, int | float) and math.isfinite(value):
            nll[e] = float(value)
        else:
            skipped.setdefault(e, "no score" if value is None else f"invalid score {value!r}"[:80])
    tokens = dict(result.tokens) if isinstance(result, PromptNLL) else {}
    return PromptNLL(nll, {e: n for e, n in tokens.items() if e in nll}, skipped)


@register("perplexity")
class PerplexityRouter(AsyncRouter):
    name = "perplexity"

    def __init__(
        self,
        experts: Sequence[str],
        scorer: PromptNLLScorer | None = None,
        temperature: float = 1.0,
        fallback: str | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        super().__init__(experts)
        if scorer is None:
            raise ValueError(
                "perplexity router needs scorer=callable(prompt, experts) from the serving backends"
            )
        if temperature <= 0:
            raise ValueError(f"perplexity router: temperature must be > 0, got {temperature}")
        if max_chars < 1:
            raise ValueError(f"perplexity router: max_chars must be >= 1, got {max_chars}")
        self.scorer, self.temperature, self.max_chars = scorer, temperature, max_chars
        self.fallback = fallback or self.experts[0]

    def _fallback(self, reason: str, details: dict[str, Any]) -> Decision:
        share = 1.0 / len(self.experts)
        return Decision(
            self.fallback, {e: share for e in self.experts}, 0.0, self.name, self.version, reason, details
        )

    def _decide(self, text: RoutingText, result: ScorerResult) -> Decision:
        scored = as_prompt_nll(result, self.experts)
        details: dict[str, Any] = {**text.notes, "nll": scored.nll, "tokens": scored.tokens}
        if scored.skipped:
            details["skipped"] = scored.skipped
        if not scored.nll:
            return self._fallback("no-candidate-scored→fallback", details)
        logits = {e: -v / self.temperature for e, v in scored.nll.items()}
        top = max(logits.values())
        weights = {e: math.exp(x - top) for e, x in logits.items()}
        total = sum(weights.values())
        scores = {e: w / total for e, w in weights.items()}
        expert = max(scores, key=scores.__getitem__)
        reason = "perplexity" + (f";skipped={','.join(scored.skipped)}" if scored.skipped else "")
        return Decision(expert, scores, scores[expert], self.name, self.version, reason, details)

    def _error(self, error: Exception) -> Decision:  # a backend failure must not fail routing
        return self._fallback("scorer-error→fallback", {"error": repr(error)[:200]})

    async def decide_async(self, request: RoutingRequest) -> Decision:
        text = routing_text(request, self.max_chars)
        if text.empty:
            return self._fallback("empty-prompt→fallback", dict(text.notes))
        try:
            result = self.scorer(text.text, self.experts)
            if inspect.isawaitable(result):
                result = await result
            return self._decide(text, result)
        except Exception as error:  # noqa: BLE001
            return self._error(error)

    def decide_one(self, request: RoutingRequest) -> Decision:
        """The synchronous path, for a synchronous scorer (an async one is serving's: `decide_async`)."""
        text = routing_text(request, self.max_chars)
        if text.empty:
            return self._fallback("empty-prompt→fallback", dict(text.notes))
        try:
            result = self.scorer(text.text, self.experts)
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()  # never awaited: the scorer's engines live on serving's event loop
                raise TypeError("the scorer is asynchronous: use decide_async")
            return self._decide(text, result)
        except Exception as error:  # noqa: BLE001
            return self._error(error)

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        return [self.decide_one(r) for r in requests]
