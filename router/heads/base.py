"""The head interface and the registry of head kinds: every learned router kind is one registered head.

A head scores encoder `Features` into per-class logits. A `HeadType` says everything the rest of router/
needs to know about one kind, so nothing else lists kinds: its options (a section of the training
config, with their defaults), how to fit it on training rows, its parameters in router.json (validated
at load) and how to rebuild it from them and the artifact's arrays. Training, loading, the config's
`kind` field, CLI help and the zoo config all read `head_kinds()`.

May import: numpy, pydantic, router.linear, router.validation. No torch or scikit-learn at import time (CLI help imports this).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ValidationError

from router.linear import LinearModel, softmax
from router.validation import Strict, format_errors


class NoOptions(Strict):
    """The options of a head that has none."""


class TemperatureParams(Strict):
    """router.json parameters of a head whose only parameter is its calibration temperature."""

    temperature: float


@dataclass(frozen=True)
class Features:
    sentence: np.ndarray  # (b, d) unit sentence embeddings
    tokens: np.ndarray | None = None  # (b, 3E) token-gate aggregates [mean | max | votes]


class Head(ABC):
    kind: ClassVar[str]
    needs_tokens: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True  # False: its probabilities ignore `temperature` (none is fit)

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


@dataclass(frozen=True)
class FitData:
    """What a head is fit on in one training pass (the validation pass, then the final one)."""

    sentence: np.ndarray  # (N, d) sentence embeddings of every training row
    tokens: np.ndarray  # (N, 3E) token-gate aggregates of every row, under this pass's gates
    y: np.ndarray  # (N,) class indices
    rows: np.ndarray  # (N,) bool: the rows this pass fits on
    n: int  # classes
    seed: int
    options: Mapping[str, BaseModel]  # every head's options by kind (a head may read a sibling's)
    fitted: Mapping[str, Head] = field(default_factory=dict)  # this pass's heads so far (its `needs`)


@dataclass(frozen=True)
class LoadData:
    """What a head is rebuilt from: the artifact's arrays and the heads loaded before it (its `needs`)."""

    tensors: Mapping[str, np.ndarray]
    n: int
    loaded: Mapping[str, Head]

    def linear(self, prefix: str) -> LinearModel:
        return LinearModel(self.tensors[f"{prefix}.coef"], self.tensors[f"{prefix}.intercept"])


@dataclass(frozen=True)
class HeadType:
    """One learned router kind. `fit(data, options, variant)` builds the head on `data.rows`;
    `load(data, params)` rebuilds it from router.json's validated `params` and the artifact's arrays.

    `variants(options)` names the forms training compares on the validation split (the most accurate is
    kept; e.g. the hybrid's `combine: auto`); without it a head has one form. `needs` are kinds fit and
    loaded before this one (and kept in the artifact with it)."""

    kind: str
    summary: str
    fit: Callable[[FitData, Any, str], Head]
    load: Callable[[LoadData, Any], Head]
    params: type[BaseModel] = TemperatureParams
    options: type[BaseModel] = NoOptions
    options_key: str | None = None  # its section of the training config (None: it has no options)
    needs: tuple[str, ...] = ()
    variants: Callable[[Any], tuple[str, ...]] | None = None

    def forms(self, options: BaseModel) -> tuple[str, ...]:
        return self.variants(options) if self.variants is not None else ("",)

    def key(self, variant: str) -> str:
        """The name a form's validation accuracy and temperature are recorded under."""
        return f"{self.kind}:{variant}" if variant else self.kind


_HEADS: dict[str, HeadType] = {}


def register_head(head: HeadType) -> HeadType:
    """Make a head kind known to training, loading, configs and the CLI (call it at import time)."""
    if head.kind in _HEADS:
        raise ValueError(f"router head {head.kind!r} is registered twice")
    unknown = [k for k in head.needs if k not in _HEADS]
    if unknown:
        raise ValueError(f"router head {head.kind!r} needs {unknown}: register those first")
    if head.options_key is None and head.options is not NoOptions:
        raise ValueError(f"router head {head.kind!r} has options but no options_key")
    _HEADS[head.kind] = head
    return head


def head_kinds() -> list[str]:
    """Every registered head kind, in registration order (the heads a trained artifact can hold)."""
    return list(_HEADS)


def head_type(kind: str) -> HeadType:
    if kind not in _HEADS:
        raise ValueError(f"unknown router head {kind!r}; known heads: {', '.join(_HEADS)}")
    return _HEADS[kind]


def head_types() -> list[HeadType]:
    return list(_HEADS.values())


def with_needs(kinds: Iterable[str]) -> list[str]:
    """The kinds and every kind they need, in registration order (so each comes after its needs)."""
    wanted: set[str] = set()
    stack = list(kinds)
    while stack:
        kind = stack.pop()
        if kind not in wanted:
            wanted.add(kind)
            stack.extend(head_type(kind).needs)
    return [k for k in _HEADS if k in wanted]


def check_head_kind(kind: str) -> str:
    """A pydantic validator: `kind` must name a registered head."""
    if kind not in _HEADS:
        raise ValueError(f"expected a trained router head, one of {head_kinds()}; got {kind!r}")
    return kind


def load_heads(tensors: Mapping[str, np.ndarray], params: Mapping[str, Any], n: int) -> dict[str, Head]:
    """Rebuild the heads router.json lists (`params`: kind → its JSON parameters) from the arrays."""
    unknown = sorted(set(params) - set(_HEADS))
    if unknown:
        raise ValueError(f"heads {unknown} are not known to this moerge (it knows {head_kinds()})")
    loaded: dict[str, Head] = {}
    for head in _HEADS.values():  # registration order: a head after the heads it needs
        if head.kind in params:
            try:
                checked = head.params.model_validate(params[head.kind])
            except ValidationError as error:
                raise ValueError(format_errors(error, prefix=f"heads.{head.kind}")) from None
            loaded[head.kind] = head.load(LoadData(tensors, n, loaded), checked)
    return loaded
