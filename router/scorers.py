"""The per-kind scoring heads over encoder features: every learned router kind is one of these.

All heads read the same `Features` (sentence embedding, and token-gate aggregates where the kind needs
them), so one artifact can hold several heads and the eval harness can compare them on one encoding
pass. Each head saves as named arrays (safetensors) plus JSON parameters; nothing is pickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from router.gates import select_aggregate
from router.linear import LinearModel, softmax

LEARNED_KINDS = ("hybrid", "classifier", "token-gates", "centroid", "knn")
COMBINES = ("features", "tiebreak")


@dataclass(frozen=True)
class Features:
    sentence: np.ndarray  # (b, d) unit sentence embeddings
    tokens: np.ndarray | None = None  # (b, 3E) token-gate aggregates [mean | max | votes]


class Head(ABC):
    kind: ClassVar[str]
    needs_tokens: ClassVar[bool] = False

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    @abstractmethod
    def logits(self, f: Features) -> np.ndarray: ...

    def proba(self, f: Features) -> np.ndarray:
        return softmax(self.logits(f), self.temperature)

    @abstractmethod
    def tensors(self) -> dict[str, np.ndarray]: ...

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class CentroidHead(Head):
    """Nearest centroid: cosine to each expert's mean sentence embedding. The simple baseline."""

    kind = "centroid"

    def __init__(self, centroids: np.ndarray, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.centroids = centroids.astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n: int) -> CentroidHead:
        c = np.stack([x[y == i].mean(0) for i in range(n)])
        return cls(c / np.linalg.norm(c, axis=1, keepdims=True))

    def logits(self, f: Features) -> np.ndarray:
        return f.sentence @ self.centroids.T

    def tensors(self) -> dict[str, np.ndarray]:
        return {"centroid.vectors": self.centroids}


class KnnHead(Head):
    """k nearest training prompts by cosine, class-balanced votes (so `general`'s 140 rows still count)."""

    kind = "knn"

    def __init__(self, bank: np.ndarray, labels: np.ndarray, n: int, k: int = 10, temperature: float = 1.0):
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


class LinearHead(Head):
    """A linear classifier on the sentence embedding (logistic regression by default)."""

    kind = "classifier"

    def __init__(self, model: LinearModel, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.model = model

    def inputs(self, f: Features) -> np.ndarray:
        return f.sentence

    def logits(self, f: Features) -> np.ndarray:
        return self.model.logits(self.inputs(f))

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"{self.kind}.coef": self.model.coef, f"{self.kind}.intercept": self.model.intercept}


class TokenGateHead(Head):
    """Token gates alone: one aggregate of the per-token affinities, as logits."""

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


class HybridFeaturesHead(LinearHead):
    """Hybrid as features: a linear classifier on [sentence embedding | token-gate aggregates]."""

    kind = "hybrid"
    needs_tokens = True

    def inputs(self, f: Features) -> np.ndarray:
        assert f.tokens is not None
        return np.concatenate([f.sentence, f.tokens], axis=1)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "combine": "features"}


class HybridTiebreakHead(Head):
    """Hybrid as tie-breaker: the classifier decides unless its top-2 margin is below `tie_margin`;
    then classifier and token-gate probabilities are multiplied (a product of experts)."""

    kind = "hybrid"
    needs_tokens = True

    def __init__(self, classifier: LinearHead, gates: TokenGateHead, tie_margin: float = 0.2) -> None:
        super().__init__(1.0)
        self.classifier, self.gates, self.tie_margin = classifier, gates, float(tie_margin)

    def proba(self, f: Features) -> np.ndarray:
        p = self.classifier.proba(f)
        top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.stack([p[:, 0] * 0, p[:, 0]], 1)
        tie = (top2[:, 1] - top2[:, 0]) < self.tie_margin
        if tie.any():
            q = p[tie] * self.gates.proba(
                Features(f.sentence[tie], None if f.tokens is None else f.tokens[tie])
            )
            p = p.copy()
            p[tie] = q / np.maximum(q.sum(1, keepdims=True), 1e-12)
        return p

    def logits(self, f: Features) -> np.ndarray:
        return np.log(np.clip(self.proba(f), 1e-12, None))

    def tensors(self) -> dict[str, np.ndarray]:
        return {}

    def params(self) -> dict[str, Any]:
        return {"combine": "tiebreak", "tie_margin": self.tie_margin}


def build_heads(tensors: dict[str, np.ndarray], params: dict[str, dict[str, Any]], n: int) -> dict[str, Head]:
    """Re-materialise the heads an artifact holds from its arrays and JSON parameters."""
    heads: dict[str, Head] = {}

    def linear(prefix: str) -> LinearModel:
        return LinearModel(tensors[f"{prefix}.coef"], tensors[f"{prefix}.intercept"])

    for kind in ("centroid", "knn", "classifier", "token-gates", "hybrid"):  # hybrid last: it may reuse
        if kind not in params:
            continue
        p = params[kind]
        t = float(p.get("temperature", 1.0))
        if kind == "centroid":
            heads[kind] = CentroidHead(tensors["centroid.vectors"], t)
        elif kind == "knn":
            heads[kind] = KnnHead(tensors["knn.bank"], tensors["knn.labels"], n, int(p["k"]), t)
        elif kind == "classifier":
            heads[kind] = LinearHead(linear("classifier"), t)
        elif kind == "token-gates":
            heads[kind] = TokenGateHead(n, str(p["aggregate"]), t)
        elif p.get("combine") == "features":
            heads[kind] = HybridFeaturesHead(linear("hybrid"), t)
        else:
            clf, tok = heads.get("classifier"), heads.get("token-gates")
            if not isinstance(clf, LinearHead) or not isinstance(tok, TokenGateHead):
                raise ValueError("hybrid tiebreak needs the classifier and token-gates heads in the artifact")
            heads[kind] = HybridTiebreakHead(clf, tok, float(p["tie_margin"]))
    return heads
