"""The trivial routers: always one expert (`fixed`), or a seeded coin (`random`). Baselines and A/B arms."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.base import Decision, Router, RoutingRequest, register


@register("fixed")
class FixedRouter(Router):
    name = "fixed"

    def __init__(self, experts: Sequence[str], expert: str | None = None) -> None:
        super().__init__(experts)
        self.expert = expert or self.experts[0]
        if self.expert not in self.experts:
            raise ValueError(f"fixed router: expert {self.expert!r} is not one of {self.experts}")

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        scores = {e: float(e == self.expert) for e in self.experts}
        return [Decision(self.expert, dict(scores), 1.0, self.name, self.version, "fixed") for _ in requests]


@register("random")
class RandomRouter(Router):
    name = "random"

    def __init__(self, experts: Sequence[str], seed: int = 0) -> None:
        super().__init__(experts)
        self._rng = random.Random(seed)

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        share = 1.0 / len(self.experts)
        out = []
        for _ in requests:
            expert = self._rng.choice(self.experts)
            out.append(
                Decision(expert, {e: share for e in self.experts}, share, self.name, self.version, "random")
            )
        return out
