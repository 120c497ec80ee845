"""router.json's schema, versioned: what `moerge router train` writes and `load_router` reads.

`FORMAT` is the version this moerge writes. An older version it still reads is migrated on load (each
step fills in what that version's writers left implicit, as that version's readers did); anything else
is refused with the command that retrains it. The readers keep no defaults of their own: every value an
artifact is loaded with is in its router.json (or set by a named migration step).

  moerge-router/1  every field of /2, except that keys added during its life may be absent:
                   policy.context_threshold / context_turns (absent: no multi-turn re-scoring),
                   encoder.truncation ("head"), encoder.layers / pool_layers (all layers, last-layer
                   pooling), encoder.sentence_dim (= dim), fast_path, novelty, serve_as, label_field,
                   label_map, and a head's temperature (1.0).
  moerge-router/2  every field explicit and validated; each head's parameters by its head type
                   (router/heads/), at load.

May import: router.policy, router.encoder, router.ngram, router.validation (constants and models only), pydantic.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from router.encoder import Precision, Truncation
from router.ngram import Analyzer
from router.policy import PolicySettings
from router.validation import Strict, format_errors

FORMAT = "moerge-router/2"
V1 = "moerge-router/1"
READABLE = (V1, FORMAT)
SHA256_HEX = r"^[0-9a-f]{64}$"


class SpecError(ValueError):
    """router.json is not an artifact this moerge can read; the message says why and how to retrain."""


class EncoderRef(Strict):
    """How to re-create the encoder, and the sha256 of its files (checked before it is loaded)."""

    model: str = Field(description="'bundled:all-MiniLM-L6-v2' or the absolute path of a local folder")
    sha256: str = Field(pattern=SHA256_HEX, description="encoder.hash_model_dir of the folder")
    max_seq_length: int = Field(ge=8)
    precision: Precision
    dim: int = Field(ge=1)
    pooling: Literal["mean", "cls", "max"]
    layers: int | None = Field(ge=1, description="first N transformer layers kept; None: all")
    truncation: Truncation
    pool_layers: list[int] | None = Field(description="layers mean-pooled into the sentence vector")
    sentence_dim: int = Field(ge=1)


class GatesRef(Strict):
    top_k: int = Field(ge=1)
    method: str


class FastPathSpec(Strict):
    """The n-gram stage's parameters (its arrays are ngram.* in weights.safetensors)."""

    analyzer: Analyzer
    ngram_range: tuple[int, int]
    n_features: int = Field(ge=1)
    temperature: float = Field(gt=0)
    threshold: float
    report: dict[str, Any] = Field(description="the validation report the threshold was chosen on")


class NoveltySpec(Strict):
    k: int = Field(ge=1)
    quantile: float = Field(gt=0, lt=1)
    thresholds: dict[int, float] = Field(description="class index → similarity threshold")


class ArtifactPolicy(PolicySettings):
    fallback: str


class RouterSpec(Strict):
    format: Literal["moerge-router/2"]
    kind: str = Field(description="the head served by default")
    experts: list[str] = Field(min_length=1, description="the classes, in the heads' label order")
    heads: dict[str, dict[str, Any]] = Field(description="kind → parameters, checked by the head type")
    gates: GatesRef | None
    fast_path: FastPathSpec | None
    novelty: NoveltySpec | None
    policy: ArtifactPolicy
    encoder: EncoderRef
    label_field: str
    label_map: dict[str, str]
    serve_as: dict[str, str]
    training: dict[str, Any] = Field(description="a record of how it was trained; not read when serving")

    @model_validator(mode="after")
    def _consistent(self) -> RouterSpec:
        if self.kind not in self.heads:
            raise ValueError(f"kind {self.kind!r} is not one of its heads {sorted(self.heads)}")
        if self.policy.fallback not in self.experts:
            raise ValueError(f"policy.fallback {self.policy.fallback!r} is not one of {self.experts}")
        return self

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """moerge-router/1 → /2: the values v1's reader assumed for keys its early writers did not write."""
    out = copy.deepcopy(raw)
    out["format"] = FORMAT
    if isinstance(out.get("policy"), dict):
        out["policy"] = {"context_threshold": 0.0, "context_turns": 0, **out["policy"]}
    if isinstance(out.get("encoder"), dict):
        encoder = {"truncation": "head", "layers": None, "pool_layers": None, **out["encoder"]}
        encoder.setdefault("sentence_dim", encoder.get("dim"))
        out["encoder"] = encoder
    for key, value in (("fast_path", None), ("novelty", None), ("label_field", "domain")):
        out.setdefault(key, value)
    out["serve_as"] = out.get("serve_as") or {}
    out["label_map"] = out.get("label_map") or {}
    out.setdefault("training", {})
    heads = out.get("heads")
    for params in heads.values() if isinstance(heads, dict) else ():
        if isinstance(params, dict) and params.get("combine") != "tiebreak":
            params.setdefault("temperature", 1.0)
    return out


def parse_spec(raw: Any) -> RouterSpec:
    """router.json's parsed JSON → RouterSpec, migrating a readable older version; SpecError otherwise."""
    if not isinstance(raw, dict):
        raise SpecError(f"router.json must be a JSON object, got {type(raw).__name__}")
    version = raw.get("format")
    if version not in READABLE:
        raise SpecError(
            f"router.json has format {version!r}; this moerge reads {', '.join(READABLE)}. Retrain it with "
            "`moerge router train CONFIG OUT_DIR --overwrite` (the config it was trained with is in "
            "router.json under training.config), or load it with the moerge that wrote it"
        )
    data = _from_v1(raw) if version == V1 else raw
    try:
        return RouterSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"router.json ({version}) does not validate:\n{format_errors(error)}") from None
