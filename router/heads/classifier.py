"""`classifier`: a linear classifier (logistic regression, linear SVM or ridge) on the sentence embedding.

Its options (`classifier:` in the training config) also configure the hybrid head's feature classifier.
May import: router.heads.base, router.linear, router.validation, numpy, pydantic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from router.heads.base import Features, FitData, Head, HeadType, LoadData, TemperatureParams, register_head
from router.linear import Classifier, LinearModel, fit_linear
from router.validation import Strict


class ClassifierOptions(Strict):
    model: Classifier = "logreg"
    C: float = Field(1.0, gt=0, description="inverse regularisation strength")
    class_weight: Literal["balanced", "none"] = "balanced"

    def fit(self, x: np.ndarray, y: np.ndarray, n: int, seed: int) -> LinearModel:
        weight = None if self.class_weight == "none" else "balanced"
        return fit_linear(x, y, n, model=self.model, c=self.C, class_weight=weight, seed=seed)


class LinearHead(Head):
    """A linear model on the sentence embedding; its arrays are `<kind>.coef` / `<kind>.intercept`."""

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


def _fit(data: FitData, options: ClassifierOptions, variant: str) -> Head:
    return LinearHead(options.fit(data.sentence[data.rows], data.y[data.rows], data.n, data.seed))


def _load(data: LoadData, params: TemperatureParams) -> Head:
    return LinearHead(data.linear("classifier"), params.temperature)


register_head(
    HeadType(
        kind="classifier",
        summary="linear classifier (logreg, linear-svm, ridge) on the sentence embedding, temperature-scaled",
        fit=_fit,
        load=_load,
        options=ClassifierOptions,
        options_key="classifier",
    )
)
