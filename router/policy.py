"""From calibrated probabilities to a Decision: the multi-turn prior, the confidence floor, fallbacks.

Multi-turn policy (the router applies steps 1–2, this module 3–4):
1. Score the latest user turn alone.
2. If that is not decisive (top probability < `context_threshold`, or the top expert is the fallback,
   i.e. the catch-all) and the conversation has earlier user turns, score the latest turn followed by up
   to `context_turns` earlier user turns instead: a short follow-up such as "and in Java?" or "say more"
   inherits its conversation's topic (the reason gains `+context`).
3. If the conversation's previous expert is known, mix in a point mass on it,
   p' = (1 − s)·p + s·onehot(previous), s = `stickiness`: the conversation switches expert only when
   the new turn clearly belongs elsewhere (p_new − p_prev > s / (1 − s)).
4. Below the confidence floor, or when the novelty check (router/novelty.py) finds the prompt unlike the
   picked expert's training prompts, the previous expert keeps the conversation; without one, the
   configured fallback expert serves. Empty turns behave the same way.
Every deviation from the plain argmax is named in the decision's reason.

With `serve_as`, the router's classes are not the served experts themselves (a router trained on
domains, several of which one MoE serves): the policy decides a class, the decision names the expert
serving it (the class stays in `details["class"]`, scores are summed per expert), and a previous expert
stands for the most probable of its classes.
May import: router.base, router.validation, numpy, pydantic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from router.base import Decision
from router.validation import Strict


class PolicySettings(Strict):
    """The policy's tunables, their defaults and ranges: the one place they are defined. The training
    config's `policy:` section and router.json's `policy` (with the fallback resolved) both extend it."""

    confidence_floor: float = Field(0.0, ge=0, le=1, description="below it → previous expert, else fallback")
    stickiness: float = Field(0.25, ge=0, lt=1, description="weight of the previous expert as a prior")
    context_threshold: float = Field(
        0.8, ge=0, le=1, description="below this top probability, re-score with earlier user turns appended"
    )
    context_turns: int = Field(1, ge=0, description="earlier user turns appended when re-scoring (0: never)")


def serve_as_problem(classes: Sequence[str], serve_as: dict[str, str]) -> str | None:
    """What is wrong with a class → served expert map, or None: keys must be classes, and a served name
    that is also a class must be served under its own name (else a previous expert would be ambiguous)."""
    unknown = sorted(set(serve_as) - set(classes))
    if unknown:
        return f"{unknown} are not classes: the router does not have them (its classes: {list(classes)})"
    clashing = sorted(e for e in set(serve_as.values()) if e in classes and serve_as.get(e, e) != e)
    if clashing:
        return f"{clashing} name both a class served by another expert and an expert"
    return None


@dataclass(frozen=True)
class Policy:
    """The classes (`experts`, the heads' label order), the catch-all class, the tunables, and which
    served expert answers each class (`serve_as`; absent: the class itself)."""

    experts: Sequence[str]
    fallback: str
    settings: PolicySettings = field(default_factory=PolicySettings)
    serve_as: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fallback not in self.experts:
            raise ValueError(f"fallback {self.fallback!r} is not one of the experts {list(self.experts)}")
        problem = serve_as_problem(self.experts, self.serve_as)
        if problem:
            raise ValueError(f"serve_as: {problem}")

    def served(self, cls: str) -> str:
        return self.serve_as.get(cls, cls)

    @property
    def served_experts(self) -> list[str]:
        """The experts decisions can name, in class order."""
        return list(dict.fromkeys(self.served(c) for c in self.experts))


@dataclass
class DecisionMaker:
    """Turns one row of probabilities into a Decision under a Policy, for one router name/version."""

    policy: Policy
    router: str
    version: str
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {e: i for i, e in enumerate(self.policy.experts)}

    def _make(self, cls: str, p: np.ndarray, confidence: float, reason: str, details: dict) -> Decision:
        policy = self.policy
        scores: dict[str, float] = {}
        for c, x in zip(policy.experts, p, strict=True):
            scores[policy.served(c)] = scores.get(policy.served(c), 0.0) + float(x)
        if policy.serve_as:
            details = {**details, "class": cls}
        return Decision(
            policy.served(cls),
            {e: round(x, 6) for e, x in scores.items()},
            round(float(confidence), 6),
            self.router,
            self.version,
            reason,
            details,
        )

    def _as_class(self, previous: str | None, p: np.ndarray) -> str | None:
        """The class a previous (served) expert stands for: itself, or the most probable of its classes."""
        if previous is None or previous in self.index:
            return previous
        mine = [i for i, c in enumerate(self.policy.experts) if self.policy.served(c) == previous]
        return self.policy.experts[max(mine, key=lambda i: p[i])] if mine else None

    def no_text(self, previous: str | None, details: dict[str, Any], why: str = "empty-prompt") -> Decision:
        """No usable text: keep the conversation's expert, else the fallback."""
        n = len(self.policy.experts)
        p = np.full(n, 1.0 / n)
        kept = self._as_class(previous, p)
        if kept is not None:
            return self._make(kept, p, 0.0, f"{why}→previous-expert", details)
        return self._make(self.policy.fallback, p, 0.0, f"{why}→fallback", details)

    def decide(
        self,
        p: np.ndarray,
        previous: str | None,
        base_reason: str,
        details: dict[str, Any],
        novel: tuple[str, float] | None = None,
    ) -> Decision:
        """`novel`: (expert, similarity) when the novelty check found the prompt unlike that expert's
        training prompts; it matters only if that expert is still the pick after the prior."""
        policy = self.policy
        previous = self._as_class(previous, p)
        reason = base_reason
        stickiness = policy.settings.stickiness
        if previous in self.index and stickiness > 0:
            prior = np.zeros_like(p)
            prior[self.index[previous]] = 1.0
            unbiased = int(np.argmax(p))
            p = (1.0 - stickiness) * p + stickiness * prior
            details = {**details, "prior": previous}
            if int(np.argmax(p)) != unbiased:
                reason = f"{base_reason}+previous-expert-prior"
        best = int(np.argmax(p))
        confidence = float(p[best])
        if confidence < policy.settings.confidence_floor:
            details = {**details, "would_be": policy.experts[best]}
            if previous in self.index:
                return self._make(previous, p, confidence, "below-floor→previous-expert", details)
            return self._make(policy.fallback, p, confidence, "below-floor→fallback", details)
        if novel is not None and novel[0] == policy.experts[best]:
            details = {**details, "would_be": novel[0], "similarity": round(float(novel[1]), 4)}
            if previous in self.index:
                return self._make(previous, p, confidence, "novel→previous-expert", details)
            return self._make(policy.fallback, p, confidence, "novel→fallback", details)
        return self._make(policy.experts[best], p, confidence, reason, details)
