"""`rules`: ordered regular-expression rules. A last resort and a baseline, never applied silently.

Every decision names the rule that fired (`rule:<index>:<pattern>`) or says that none did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from router.base import Decision, Router, RoutingRequest, register
from router.text import routing_text


@register("rules")
class RulesRouter(Router):
    """First matching rule wins; no match → `default` expert with reason `no-rule→default`."""

    name = "rules"

    def __init__(
        self,
        experts: Sequence[str],
        rules: Sequence[dict[str, Any]] = (),
        default: str | None = None,
    ) -> None:
        super().__init__(experts)
        self.default = default or self.experts[0]
        if self.default not in self.experts:
            raise ValueError(f"rules router: default {self.default!r} is not one of {self.experts}")
        self.rules: list[tuple[re.Pattern[str], str]] = []
        for i, rule in enumerate(rules):
            if set(rule) != {"pattern", "expert"}:
                raise ValueError(
                    f"rules router: rule {i} must have exactly 'pattern' and 'expert', got {rule}"
                )
            if rule["expert"] not in self.experts:
                raise ValueError(f"rules router: rule {i} names unknown expert {rule['expert']!r}")
            try:
                compiled = re.compile(rule["pattern"], re.IGNORECASE)
            except re.error as error:
                raise ValueError(f"rules router: rule {i} pattern {rule['pattern']!r}: {error}") from None
            self.rules.append((compiled, rule["expert"]))

    def decide_one(self, request: RoutingRequest) -> Decision:
        text = routing_text(request).text
        for i, (pattern, expert) in enumerate(self.rules):
            if pattern.search(text):
                scores = {e: float(e == expert) for e in self.experts}
                return Decision(expert, scores, 1.0, self.name, self.version, f"rule:{i}:{pattern.pattern}")
        scores = {e: float(e == self.default) for e in self.experts}
        return Decision(self.default, scores, 0.0, self.name, self.version, "no-rule→default")

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        return [self.decide_one(r) for r in requests]
