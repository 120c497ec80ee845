"""The n-gram fast path: hashed character n-grams → TF-IDF → linear model, in front of the encoder.

Why: MiniLM costs 10–20 ms per prompt on two CPU cores, hashed character n-grams well under 1 ms, and on
the shared data they are at least as accurate on the prompts they are sure of. So the router answers
from this stage when its calibrated top probability reaches `threshold` (chosen on the validation split
for a target precision) and runs the encoder and its head only on the rest: a cascade.

The hashing vectorizer is stateless, so the artifact holds only arrays (idf, coefficients) and JSON
parameters; nothing is pickled. TF-IDF is computed here (sublinear tf, smoothed idf, l2 rows, the same
formulas as scikit-learn's TfidfTransformer) so training and serving share one code path.
May import: router.linear, numpy; scikit-learn inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from router.linear import fit_temperature, softmax

Analyzer = Literal["char_wb", "char", "word"]  # the one list of n-gram analyzers
ANALYZERS: tuple[str, ...] = get_args(Analyzer)
# Thresholds tried when choosing one for a target precision, lowest first.
THRESHOLD_GRID = tuple(round(float(t), 3) for t in np.arange(0.5, 0.999, 0.01)) + (0.995, 0.999)


@dataclass
class NgramModel:
    analyzer: str
    ngram_range: tuple[int, int]
    n_features: int
    idf: np.ndarray  # (n_features,) float32
    coef: np.ndarray  # (n_experts, n_features) float32
    intercept: np.ndarray  # (n_experts,) float32
    temperature: float = 1.0
    threshold: float = 1.01  # > 1: never answers (disabled)
    _coef_t: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.analyzer not in ANALYZERS:
            raise ValueError(f"ngram analyzer must be one of {ANALYZERS}, got {self.analyzer!r}")
        if self.idf.shape != (self.n_features,) or self.coef.shape[1:] != (self.n_features,):
            raise ValueError(
                f"ngram arrays disagree with n_features={self.n_features}: idf {self.idf.shape}, "
                f"coef {self.coef.shape}"
            )
        self._vectorizer = hashing_vectorizer(self.analyzer, self.ngram_range, self.n_features)
        self._coef_t = np.ascontiguousarray(self.coef.T, dtype=np.float32)

    # -- scoring ------------------------------------------------------------------------------------
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        x = tfidf(self._vectorizer.transform(texts), self.idf)
        return np.asarray(x @ self._coef_t) + self.intercept

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.logits(texts), self.temperature)

    # -- persistence ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        return {"ngram.idf": self.idf, "ngram.coef": self.coef, "ngram.intercept": self.intercept}

    def params(self) -> dict[str, Any]:
        return {
            "analyzer": self.analyzer,
            "ngram_range": list(self.ngram_range),
            "n_features": self.n_features,
            "temperature": self.temperature,
            "threshold": self.threshold,
        }

    @classmethod
    def from_artifact(cls, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> NgramModel:
        lo, hi = (int(v) for v in params["ngram_range"])
        return cls(
            str(params["analyzer"]),
            (lo, hi),
            int(params["n_features"]),
            tensors["ngram.idf"].astype(np.float32),
            tensors["ngram.coef"].astype(np.float32),
            tensors["ngram.intercept"].astype(np.float32),
            float(params["temperature"]),
            float(params["threshold"]),
        )


def hashing_vectorizer(analyzer: str, ngram_range: tuple[int, int], n_features: int) -> Any:
    """Raw lower-cased n-gram counts in `n_features` buckets; the same at training and serving time."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        analyzer=analyzer,
        ngram_range=tuple(ngram_range),
        n_features=n_features,
        alternate_sign=False,
        norm=None,
        lowercase=True,
        dtype=np.float32,
    )


def tfidf(counts: Any, idf: np.ndarray) -> Any:
    """Raw hashed counts (CSR) → sublinear tf × idf, l2-normalised rows (in place)."""
    from sklearn.preprocessing import normalize

    counts.data = (1.0 + np.log(counts.data)) * idf[counts.indices]
    return normalize(counts, copy=False)


def fit_ngram(
    texts: Sequence[str],
    y: np.ndarray,
    n: int,
    fit_rows: np.ndarray,
    valid_rows: np.ndarray,
    *,
    analyzer: str,
    ngram_range: tuple[int, int],
    n_features: int,
    c: float,
    min_precision: float,
    threshold: float | None,
    seed: int = 0,
) -> tuple[NgramModel, dict[str, Any]]:
    """Fit on `fit_rows`, calibrate and choose the threshold on `valid_rows`, refit on both.

    The threshold is the lowest one at which the validation prompts the stage would answer are right at
    least `min_precision` of the time (unless `threshold` fixes it); without validation rows or when no
    threshold reaches the precision, the stage is disabled (threshold > 1) and the report says why.
    """
    counts = hashing_vectorizer(analyzer, ngram_range, n_features).transform(texts).tocsr()

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.svm import LinearSVC

        sub = counts[rows]
        df = np.bincount(sub.indices, minlength=n_features)
        idf = (np.log((1 + sub.shape[0]) / (1 + df)) + 1).astype(np.float32)
        model = LinearSVC(C=c, class_weight="balanced", random_state=seed)
        model.fit(tfidf(sub.copy(), idf), y[rows])
        coef, intercept = _full_classes(model, n, n_features)
        return idf, coef, intercept

    report: dict[str, Any] = {"fit_rows": int(fit_rows.sum()), "validation_rows": int(valid_rows.sum())}
    temperature, chosen = 1.0, 1.01 if threshold is None else float(threshold)
    if valid_rows.any():
        idf, coef, intercept = fit(fit_rows)
        logits = np.asarray(tfidf(counts[valid_rows].copy(), idf) @ coef.T) + intercept
        yv = y[valid_rows]
        temperature = fit_temperature(logits, yv)
        p = softmax(logits, temperature)
        top, right = p.max(1), p.argmax(1) == yv
        report["validation_accuracy"] = round(float(right.mean()), 4)
        if threshold is None:
            for t in THRESHOLD_GRID:
                answered = top >= t
                if answered.any() and right[answered].mean() >= min_precision:
                    chosen = t
                    break
            else:
                report["disabled"] = f"no threshold reaches validation precision {min_precision}"
        answered = top >= chosen
        report["validation_share"] = round(float(answered.mean()), 4)
        report["validation_precision"] = round(float(right[answered].mean()), 4) if answered.any() else None
    elif threshold is None:
        report["disabled"] = "no validation rows to choose a threshold on"
    idf, coef, intercept = fit(fit_rows | valid_rows)
    report.update(threshold=chosen, temperature=round(temperature, 4))
    model = NgramModel(
        analyzer, ngram_range, n_features, idf, coef, intercept, temperature=temperature, threshold=chosen
    )
    return model, report


def _full_classes(model: Any, n: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """LinearSVC's (coef, intercept) as one row per expert, also for two classes or a missing class."""
    coef = np.full((n, n_features), 0.0, np.float32)
    intercept = np.full(n, -1e3, np.float32)  # a class absent from training is never predicted
    classes = [int(c) for c in model.classes_]
    if len(classes) == 2:
        coef[classes[1]], intercept[classes[1]] = model.coef_[0], model.intercept_[0]
        coef[classes[0]], intercept[classes[0]] = -model.coef_[0], -model.intercept_[0]
    else:
        for row, cls in enumerate(classes):
            coef[cls], intercept[cls] = model.coef_[row], model.intercept_[row]
    return coef, intercept
