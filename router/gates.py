"""Token-level gate heuristics (PHATGOOSE / Arrow style) over the encoder's token states.

Each expert gets one gate vector: the direction in which its prompts' token states differ from all
experts' tokens (the per-expert mean of unit token states minus the class-balanced global mean). A token's
affinity to an expert is the cosine between its centred state and that gate — a normalised dot product as
in PHATGOOSE/Arrow. A prompt is summarised by aggregating those per-token affinities three ways: the mean,
the max, and top-k votes (the share of tokens that rank the expert among their k best). Fitting needs
only per-expert sums of token states, so it streams over any amount of training data.
May import: numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Aggregate = Literal["mean", "max", "votes"]  # the one list of token-gate aggregates, in feature order
AGGREGATES: tuple[str, ...] = get_args(Aggregate)


@dataclass(frozen=True)
class TokenGates:
    center: np.ndarray  # (d,) class-balanced mean of unit token states
    vectors: np.ndarray  # (E, d) unit gate vectors
    top_k: int = 1

    @classmethod
    def fit(cls, sums: np.ndarray, counts: np.ndarray, top_k: int = 1) -> TokenGates:
        """sums: (E, d) per-expert sums of unit token states; counts: (E,) their token counts."""
        if np.any(counts <= 0):
            raise ValueError("token gates: every expert needs at least one token")
        means = sums / counts[:, None]
        center = means.mean(0)
        directions = means - center
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        vectors = directions / np.maximum(norms, 1e-12)
        top_k = max(1, min(int(top_k), len(vectors)))
        return cls(center.astype(np.float32), vectors.astype(np.float32), top_k)

    def affinities(self, tokens: np.ndarray) -> np.ndarray:
        """(…, d) unit token states → (…, E) cosine affinities of the centred states to each gate."""
        centred = tokens.astype(np.float32, copy=False) - self.center
        centred /= np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-6)
        return centred @ self.vectors.T

    def aggregate(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(b, t, d) tokens with (b, t) mask → (b, 3E) features: [mean | max | votes] affinities."""
        aff = self.affinities(tokens)  # (b, t, E)
        m = mask[..., None].astype(np.float32)
        n = np.maximum(m.sum(1), 1.0)  # (b, 1)
        mean = (aff * m).sum(1) / n
        top = np.where(mask[..., None], aff, -np.inf).max(1)
        top = np.where(np.isfinite(top), top, 0.0)
        n_experts = aff.shape[-1]
        if self.top_k >= n_experts:
            chosen = np.ones_like(aff)
        else:
            kth = -np.partition(-aff, self.top_k - 1, axis=-1)[..., self.top_k - 1 : self.top_k]
            chosen = (aff >= kth).astype(np.float32)
        votes = (chosen * m).sum(1) / n
        return np.concatenate([mean, top, votes], axis=1).astype(np.float32)


def select_aggregate(features: np.ndarray, aggregate: str, n_experts: int) -> np.ndarray:
    """Pick one aggregate's (b, E) block out of the (b, 3E) features."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    i = AGGREGATES.index(aggregate)
    return features[:, i * n_experts : (i + 1) * n_experts]
