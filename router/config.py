"""The training config (`moerge router train CONFIG.yaml`), validated by pydantic with extra fields forbidden.

Errors name the field path and what was expected, e.g.
`experts.math.holdout.fraction: Input should be less than 1 (got 1.5)`.
Each head's own section (`classifier:`, `knn:` …) comes from its registration (router/heads/).
Relative paths (`files`, a local `encoder.model`) are relative to the config file, as in every moerge
config (moerge/config_base.py, which also owns `ConfigError` and the error wording).
May import: router.heads, router.encoder / router.ngram (constants), router.policy, router.validation,
moerge.config_base, pydantic.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator, model_validator

from moerge.config_base import ConfigError as ConfigError  # the one ConfigError, raised here too
from moerge.config_base import ConfigPath, base_dir, read_yaml_mapping, resolve_path, validate_config
from router.encoder import Precision, Truncation
from router.heads import DEFAULT_KIND, check_head_kind, head_kinds, head_types
from router.heads.base import with_needs
from router.ngram import Analyzer
from router.policy import PolicySettings, serve_as_problem
from router.validation import Strict


class GroupHoldout(Strict):
    """Hold out whole groups: every row whose `field` takes one of the chosen values."""

    field: str = Field(description="row field naming the group, e.g. subject, dataset, source")
    fraction: float = Field(gt=0, lt=1, description="share of the group values held out whole")


class Holdout(Strict):
    groups: list[GroupHoldout] = Field(default_factory=list, description="applied in order")
    fraction: float = Field(0.1, ge=0, lt=1, description="share of the remaining rows held out at random")


class ExpertData(Strict):
    files: list[ConfigPath] = Field(min_length=1, description="JSONL files with a `prompt` field")
    where: dict[str, str | int | bool] = Field(
        default_factory=dict, description="keep rows with these values"
    )
    holdout: Holdout = Holdout()
    max_train: int | None = Field(None, ge=1, description="cap on training rows (deterministic sample)")
    balance_field: str | None = Field(
        None, description="share max_train evenly across this field's values (e.g. `domain`)"
    )


class EncoderConfig(Strict):
    model: str = Field(
        "bundled", description="'bundled' (all-MiniLM-L6-v2) or a local sentence-transformers path"
    )
    max_seq_length: int = Field(128, ge=8, le=512)
    precision: Precision = "auto"
    batch_size: int = Field(64, ge=1, le=4096)
    layers: int | None = Field(None, ge=1, description="use only the first N transformer layers (faster)")
    truncation: Truncation = Field(
        "head+tail", description="which tokens of a long prompt are kept: first and last, or first only"
    )
    pool_layers: list[int] | Literal["all"] | None = Field(
        None,
        description="sentence vector = concatenated mean-pooled states of these layers (0 = embeddings, "
        "'all' = every kept layer); default: the last layer only",
    )

    @field_validator("model")
    @classmethod
    def _local_model(cls, model: str, info: ValidationInfo) -> str:
        """`bundled` / `bundled:NAME` name the packaged encoder; anything else is a folder."""
        if model == "bundled" or model.startswith("bundled:"):
            return model
        return str(resolve_path(model, base_dir(info)))

    @field_validator("pool_layers")
    @classmethod
    def _pool_layers(cls, value: list[int] | str | None) -> list[int] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("name at least one layer, or leave pool_layers out")
            if min(value) < 0:
                raise ValueError(f"layer numbers start at 0 (the embeddings), got {value}")
        return value


class FastPathConfig(Strict):
    """The n-gram stage in front of the encoder (router/ngram.py): answers the prompts it is sure of."""

    enabled: bool = True
    analyzer: Analyzer = "char_wb"
    ngram_range: tuple[int, int] = Field((2, 4), description="shortest and longest n-gram, e.g. [2, 4]")
    n_features: int = Field(2**18, ge=2**10, le=2**22, description="hash buckets (rows of the weights)")
    C: float = Field(0.1, gt=0, description="LinearSVC regularisation (smaller: stronger)")
    min_precision: float = Field(
        0.995, gt=0, le=1, description="the threshold is the lowest whose validation answers are this right"
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="a fixed confidence threshold instead of choosing by min_precision"
    )

    @field_validator("ngram_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 8:
            raise ValueError(f"expected 1 ≤ shortest ≤ longest ≤ 8, got {list(value)}")
        return value


class NoveltyConfig(Strict):
    """The novelty check (router/novelty.py): prompts far from the picked expert's training prompts go to
    the fallback."""

    enabled: bool = False
    quantile: float = Field(
        0.05, gt=0, lt=1, description="share of each expert's validation prompts that would fall back"
    )
    k: int = Field(5, ge=1, description="nearest training prompts averaged into the similarity")
    max_examples: int = Field(20000, ge=1, description="training prompts kept in the bank (sampled)")
    classes: list[str] | None = Field(
        None, description="the classes checked (e.g. a narrow specialist's); default: all but the fallback"
    )


class PolicyConfig(PolicySettings):
    fallback: str | None = Field(None, description="the catch-all class; default: the largest class")


class TrainConfig(Strict):
    """Every setting of `moerge router train` but the heads' own sections (`classifier:`, `knn:` …),
    which each registered head brings (router/heads/): `parse_config` validates with
    `train_config_model()`, this class plus one field per head, and `head_options()` reads them."""

    kind: str = Field(DEFAULT_KIND, description="the head `load_router` uses by default")
    experts: dict[str, ExpertData]
    encoder: EncoderConfig = EncoderConfig()
    fast_path: FastPathConfig = FastPathConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    policy: PolicyConfig = PolicyConfig()
    seed: int = 0
    min_examples: int = Field(20, ge=1, description="fewest training rows an expert may have")
    validation_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of training rows (plus the hold-out's groups) used for calibration",
    )
    on_bad_rows: Literal["error", "skip"] = "error"
    all_heads: bool = Field(True, description="also train every other kind's head (for ablations)")
    label_field: str = Field("domain", description="the eval data's field naming the true class")
    label_map: dict[str, str] | None = Field(
        None, description="label value → expert; default: expert names and their `where` on label_field"
    )
    serve_as: dict[str, str] | None = Field(
        None,
        description="class (a key of `experts`) → the served expert that answers it, when one expert "
        "serves several classes (e.g. an MoE of math, code and text experts); default: each class is served "
        "under its own name",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return check_head_kind(kind)

    @field_validator("experts")
    @classmethod
    def _two_experts(cls, experts: dict[str, ExpertData]) -> dict[str, ExpertData]:
        if len(experts) < 2:
            raise ValueError(f"a learned router needs at least 2 experts, got {len(experts)}")
        for name in experts:
            if not name.strip():
                raise ValueError("expert names must not be empty")
        return experts

    @model_validator(mode="after")
    def _names_known(self) -> TrainConfig:
        if self.policy.fallback is not None and self.policy.fallback not in self.experts:
            raise ValueError(f"policy.fallback {self.policy.fallback!r} is not one of {list(self.experts)}")
        unknown = sorted(set(self.novelty.classes or []) - set(self.experts))
        if unknown:
            raise ValueError(
                f"novelty.classes: {unknown} are not classes (keys of experts: {list(self.experts)})"
            )
        if self.policy.fallback is not None and self.policy.fallback in (self.novelty.classes or []):
            raise ValueError(
                f"novelty.classes: {self.policy.fallback!r} is the fallback, which is never checked"
            )
        if self.novelty.enabled and self.validation_fraction <= 0:
            raise ValueError(
                "novelty.enabled needs validation rows for its thresholds: validation_fraction > 0"
            )
        problem = serve_as_problem(list(self.experts), self.serve_as or {})
        if problem:
            raise ValueError(f"serve_as: {problem}")
        for label, expert in (self.label_map or {}).items():
            if expert not in self.experts:
                raise ValueError(f"label_map[{label!r}] = {expert!r} is not one of {list(self.experts)}")
        return self

    def head_options(self) -> dict[str, BaseModel]:
        """Every registered head's options by kind (its defaults when the config has no section)."""
        out: dict[str, BaseModel] = {}
        for spec in head_types():
            value = getattr(self, spec.options_key, None) if spec.options_key else None
            out[spec.kind] = value if isinstance(value, spec.options) else spec.options()
        return out

    def trained_kinds(self) -> list[str]:
        """The heads training fits: every registered one (`all_heads`), else `kind` and what it needs."""
        return with_needs(head_kinds() if self.all_heads else [self.kind])

    def served_label_map(self) -> dict[str, str]:
        """label value → the served expert that answers it (through `serve_as`)."""
        served = self.serve_as or {}
        return {label: served.get(c, c) for label, c in self.resolved_label_map().items()}

    def resolved_label_map(self) -> dict[str, str]:
        if self.label_map is not None:
            return dict(self.label_map)
        mapping = {name: name for name in self.experts}
        for name, spec in self.experts.items():
            if self.label_field in spec.where:
                mapping[str(spec.where[self.label_field])] = name
        return mapping


def train_config_model() -> type[TrainConfig]:
    """TrainConfig with one optional section per registered head that has options (e.g. `knn:`)."""
    return _train_config_model(tuple(head_kinds()))


@cache
def _train_config_model(kinds: tuple[str, ...]) -> type[TrainConfig]:
    sections: dict[str, Any] = {}
    for spec in head_types():
        if spec.options_key is not None:
            sections[spec.options_key] = (
                spec.options,
                Field(default_factory=spec.options, description=f"options of the {spec.kind!r} head"),
            )
    return create_model("TrainConfig", __base__=TrainConfig, __module__=__name__, **sections)


def parse_config(data: object, base_dir: Path | None = None, source: Path | str | None = None) -> TrainConfig:
    """Validate a parsed YAML mapping; file paths are taken relative to `base_dir` (the config's folder;
    default: that of `source`, else the current folder)."""
    return validate_config(train_config_model(), data, what="router config", source=source, base=base_dir)


def load_config(path: Path) -> TrainConfig:
    return parse_config(read_yaml_mapping(path, what="router config"), source=Path(path))
