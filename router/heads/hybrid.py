"""`hybrid` (the default kind): the sentence classifier combined with the token gates, in one of two forms.

`features`: a linear classifier on [sentence embedding | token-gate aggregates]. `tiebreak`: the
`classifier` head decides unless its top-2 margin is below `tie_margin`, then its probabilities are
multiplied with the `token-gates` head's (a product of experts). `combine: auto` fits both and keeps the
more accurate on the validation split.
May import: router.heads.base, router.heads.classifier, router.heads.token_gates, router.validation,
numpy, pydantic.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from router.heads.base import Features, FitData, Head, HeadType, LoadData, register_head
from router.heads.classifier import ClassifierOptions, LinearHead
from router.heads.token_gates import TokenGateHead
from router.validation import Strict


class HybridOptions(Strict):
    combine: Literal["features", "tiebreak", "auto"] = Field(
        "auto", description="auto: the better of the two on the validation split"
    )
    tie_margin: float = Field(0.2, ge=0, le=1, description="tiebreak: top-2 margin below which gates vote")


class HybridParams(Strict):
    combine: Literal["features", "tiebreak"]
    temperature: float | None = Field(None, description="the features form's calibration temperature")
    tie_margin: float | None = Field(None, ge=0, le=1, description="the tiebreak form's margin")

    @model_validator(mode="after")
    def _form_complete(self) -> HybridParams:
        needed = "temperature" if self.combine == "features" else "tie_margin"
        if getattr(self, needed) is None:
            raise ValueError(f"combine {self.combine!r} needs {needed}")
        return self


class HybridFeaturesHead(LinearHead):
    kind = "hybrid"
    needs_tokens = True

    def inputs(self, f: Features) -> np.ndarray:
        assert f.tokens is not None
        return np.concatenate([f.sentence, f.tokens], axis=1)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "combine": "features"}


class HybridTiebreakHead(Head):
    kind = "hybrid"
    needs_tokens = True
    calibrated = False  # it composes two calibrated heads

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


def _parts(heads: Any) -> tuple[LinearHead, TokenGateHead]:
    classifier, gates = heads.get("classifier"), heads.get("token-gates")
    if not isinstance(classifier, LinearHead) or not isinstance(gates, TokenGateHead):
        raise ValueError("hybrid tiebreak needs the classifier and token-gates heads")
    return classifier, gates


def _fit(data: FitData, options: HybridOptions, variant: str) -> Head:
    if variant == "tiebreak":
        return HybridTiebreakHead(*_parts(data.fitted), options.tie_margin)
    classifier = data.options["classifier"]
    assert isinstance(classifier, ClassifierOptions)
    both = np.concatenate([data.sentence, data.tokens], axis=1)[data.rows]
    return HybridFeaturesHead(classifier.fit(both, data.y[data.rows], data.n, data.seed))


def _load(data: LoadData, params: HybridParams) -> Head:
    if params.combine == "features":
        assert params.temperature is not None
        return HybridFeaturesHead(data.linear("hybrid"), params.temperature)
    assert params.tie_margin is not None
    return HybridTiebreakHead(*_parts(data.loaded), params.tie_margin)


def _variants(options: HybridOptions) -> tuple[str, ...]:
    return ("features", "tiebreak") if options.combine == "auto" else (options.combine,)


register_head(
    HeadType(
        kind="hybrid",
        summary="classifier on [sentence embedding | token-gate aggregates], or the classifier with the "
        "gates as tie-breaker",
        fit=_fit,
        load=_load,
        params=HybridParams,
        options=HybridOptions,
        options_key="hybrid",
        needs=("classifier", "token-gates"),
        variants=_variants,
    )
)
