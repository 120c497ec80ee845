"""Linear classifiers fit with scikit-learn, kept as plain arrays and scored with numpy.

Storing coef/intercept (safetensors) instead of a pickled estimator keeps artifacts safe to load, and a
(b, f) @ (f, E) product is faster than any estimator's predict. Temperature scaling, fit on a held-out
validation split and stored as one number, turns the logits into calibrated probabilities.
May import: numpy; scikit-learn and scipy inside the fitting functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Classifier = Literal["logreg", "linear-svm", "ridge"]  # the one list of classifier models
CLASSIFIERS: tuple[str, ...] = get_args(Classifier)


@dataclass(frozen=True)
class LinearModel:
    coef: np.ndarray  # (E, f)
    intercept: np.ndarray  # (E,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef.T + self.intercept


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    model: str = "logreg",
    c: float = 1.0,
    class_weight: str | None = "balanced",
    seed: int = 0,
) -> LinearModel:
    """Fit on standardised features, then fold the standardisation into coef/intercept."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.svm import LinearSVC

    if model not in CLASSIFIERS:
        raise ValueError(f"classifier model must be one of {CLASSIFIERS}, got {model!r}")
    present = np.unique(y)
    if len(present) != n_classes:
        raise ValueError(f"every class needs training examples; present: {present.tolist()} of {n_classes}")
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    z = (x - mu) / sd
    weight = class_weight if class_weight == "balanced" else None
    if model == "logreg":
        estimator = LogisticRegression(C=c, max_iter=3000, class_weight=weight, random_state=seed)
    elif model == "linear-svm":
        estimator = LinearSVC(C=c, class_weight=weight, random_state=seed, max_iter=5000)
    else:
        estimator = RidgeClassifier(alpha=1.0 / c, class_weight=weight)
    estimator.fit(z, y)
    coef = np.asarray(estimator.coef_, dtype=np.float64)
    intercept = np.asarray(estimator.intercept_, dtype=np.float64).reshape(-1)
    if n_classes == 2 and coef.shape[0] == 1:  # binary: sklearn keeps one row for the positive class
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    folded = coef / sd
    return LinearModel(folded.astype(np.float32), (intercept - folded @ mu).astype(np.float32))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising validation NLL of softmax(logits / T): calibration as a single stored number."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(logits, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    result = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded")
    return float(np.exp(result.x))
