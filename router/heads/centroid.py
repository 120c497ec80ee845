"""`centroid`: cosine to each class's mean sentence embedding. The simple baseline head.

May import: router.heads.base, numpy.
"""

from __future__ import annotations

import numpy as np

from router.heads.base import (
    Features,
    FitData,
    Head,
    HeadType,
    LoadData,
    NoOptions,
    TemperatureParams,
    register_head,
)


class CentroidHead(Head):
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


def _fit(data: FitData, options: NoOptions, variant: str) -> Head:
    return CentroidHead.fit(data.sentence[data.rows], data.y[data.rows], data.n)


def _load(data: LoadData, params: TemperatureParams) -> Head:
    return CentroidHead(data.tensors["centroid.vectors"], params.temperature)


register_head(
    HeadType(
        kind="centroid",
        summary="cosine to each class's mean sentence embedding (baseline)",
        fit=_fit,
        load=_load,
    )
)
