"""`knn`: class-balanced votes of the k nearest training prompts (cosine of sentence embeddings).

May import: router.heads.base, router.validation, numpy, pydantic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from router.heads.base import Features, FitData, Head, HeadType, LoadData, register_head
from router.validation import Strict


class KnnOptions(Strict):
    k: int = Field(10, ge=1, description="neighbours that vote")
    max_examples: int = Field(20000, ge=1, description="training prompts kept in the bank (sampled)")


class KnnParams(Strict):
    temperature: float
    k: int = Field(ge=1)


class KnnHead(Head):
    """Class-balanced votes, so a small class (`general`'s 140 rows) still counts."""

    kind = "knn"

    def __init__(
        self, bank: np.ndarray, labels: np.ndarray, n: int, k: int = 10, temperature: float = 1.0
    ) -> None:
        super().__init__(temperature)
        self.bank, self.labels, self.n, self.k = bank.astype(np.float16), labels.astype(np.int32), n, k
        counts = np.bincount(self.labels, minlength=n).astype(np.float32)
        self.class_weight = counts.sum() / (n * np.maximum(counts, 1.0))
        self._bank32 = self.bank.astype(np.float32)

    def logits(self, f: Features) -> np.ndarray:
        sims = f.sentence @ self._bank32.T
        k = min(self.k, sims.shape[1])
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), self.n), dtype=np.float32)
        for row, idx in enumerate(nearest):
            np.add.at(votes[row], self.labels[idx], self.class_weight[self.labels[idx]])
        return np.log(votes / votes.sum(1, keepdims=True) + 0.05)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"knn.bank": self.bank, "knn.labels": self.labels}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k}


def _fit(data: FitData, options: KnnOptions, variant: str) -> Head:
    bank = np.flatnonzero(data.rows)
    if len(bank) > options.max_examples:
        bank = np.random.default_rng(data.seed).choice(bank, options.max_examples, replace=False)
    return KnnHead(data.sentence[bank], data.y[bank], data.n, options.k)


def _load(data: LoadData, params: KnnParams) -> Head:
    return KnnHead(data.tensors["knn.bank"], data.tensors["knn.labels"], data.n, params.k, params.temperature)


register_head(
    HeadType(
        kind="knn",
        summary="class-balanced votes of the k nearest training prompts",
        fit=_fit,
        load=_load,
        params=KnnParams,
        options=KnnOptions,
        options_key="knn",
    )
)
