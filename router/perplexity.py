"""`perplexity`: MergeME's sequence-level routing, a softmax over the experts' negated prompt perplexity.

It needs every expert to score the prompt, so only serving can supply the scorer (its backends); this
module fixes the interface and the decision so that serving only plugs in `scorer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from router.base import Decision, Router, RoutingRequest, register
from router.text import routing_text

# scorer(prompt, experts) -> {expert: mean token negative log-likelihood of the prompt under that expert}
PromptNLLScorer = Callable[[str, Sequence[str]], dict[str, float]]


@register("perplexity")
class PerplexityRouter(Router):
    name = "perplexity"

    def __init__(
        self,
        experts: Sequence[str],
        scorer: PromptNLLScorer | None = None,
        temperature: float = 1.0,
        fallback: str | None = None,
    ) -> None:
        super().__init__(experts)
        if scorer is None:
            raise ValueError(
                "perplexity router needs scorer=callable(prompt, experts) from the serving backends"
            )
        if temperature <= 0:
            raise ValueError(f"perplexity router: temperature must be > 0, got {temperature}")
        self.scorer, self.temperature = scorer, temperature
        self.fallback = fallback or self.experts[0]

    def _fallback(self, reason: str, details: dict) -> Decision:
        share = 1.0 / len(self.experts)
        return Decision(
            self.fallback, {e: share for e in self.experts}, 0.0, self.name, self.version, reason, details
        )

    def decide_one(self, request: RoutingRequest) -> Decision:
        text = routing_text(request)
        if text.empty:
            return self._fallback("empty-prompt→fallback", dict(text.notes))
        try:
            nll = self.scorer(text.text, self.experts)
            logits = [-float(nll[e]) / self.temperature for e in self.experts]
        except Exception as error:  # noqa: BLE001 - a backend failure must not fail routing
            return self._fallback("scorer-error→fallback", {"error": repr(error)[:200]})
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        scores = {e: w / total for e, w in zip(self.experts, weights, strict=True)}
        expert = max(scores, key=scores.__getitem__)
        return Decision(
            expert, scores, scores[expert], self.name, self.version, "perplexity", dict(text.notes)
        )

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        return [self.decide_one(r) for r in requests]
