"""`token-gates`: per-token cosine affinity to per-class gate vectors, one aggregate over the prompt.

The gate vectors themselves (router/gates.py) are shared by every head that reads token features and
stored once in the artifact (`gates.*`); `token_gates.top_k` configures them, `aggregate` this head.
May import: router.heads.base, router.gates, router.validation, numpy, pydantic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from router.gates import Aggregate, select_aggregate
from router.heads.base import Features, FitData, Head, HeadType, LoadData, register_head
from router.validation import Strict


class TokenGatesOptions(Strict):
    aggregate: Aggregate = Field("mean", description="the aggregate the token-gates head scores with")
    top_k: int = Field(1, ge=1, description="a token votes for its k best gates (the `votes` aggregate)")


class TokenGateParams(Strict):
    temperature: float
    aggregate: Aggregate


class TokenGateHead(Head):
    kind = "token-gates"
    needs_tokens = True

    def __init__(self, n: int, aggregate: str = "mean", temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.n, self.aggregate = n, aggregate

    def logits(self, f: Features) -> np.ndarray:
        assert f.tokens is not None
        return select_aggregate(f.tokens, self.aggregate, self.n)

    def tensors(self) -> dict[str, np.ndarray]:
        return {}  # the gate vectors are shared by the router (gates.*)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "aggregate": self.aggregate}


def _fit(data: FitData, options: TokenGatesOptions, variant: str) -> Head:
    return TokenGateHead(data.n, options.aggregate)


def _load(data: LoadData, params: TokenGateParams) -> Head:
    return TokenGateHead(data.n, params.aggregate, params.temperature)


register_head(
    HeadType(
        kind="token-gates",
        summary="per-token cosine affinity to per-class gate vectors, aggregated (mean, max, top-k votes)",
        fit=_fit,
        load=_load,
        params=TokenGateParams,
        options=TokenGatesOptions,
        options_key="token_gates",
    )
)
