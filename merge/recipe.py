"""The merge recipe: a YAML file validated by pydantic, in the spirit of mergekit's configs.

Relative paths are resolved against the recipe's own folder, so a recipe can travel with its experts
(moerge/config_base.py: the rule, the error wording and `ConfigError`, shared by every config).
May import: moerge.config_base, pydantic, yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from moerge.config_base import ConfigError, ConfigModel, ConfigPath, read_yaml_mapping, validate_config

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
GateInit = Literal["hidden", "ridge", "cheap_embed", "arrow", "random", "uniform"]
DType = Literal["float32", "bfloat16", "float16"]
TASK_VECTOR_METHODS = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}
CALIBRATED_GATES = {"hidden", "ridge", "cheap_embed"}  # fitted on the experts' calibration prompts


class RecipeError(ConfigError):
    """A recipe that cannot be merged; the message names the field or expert at fault."""


class _Strict(ConfigModel):
    model_config = ConfigDict(allow_inf_nan=False)  # `weight: .inf` is no weight


class DataSource(_Strict):
    """Prompts read from a JSONL file, optionally filtered on other fields (e.g. `domain: math`)."""

    path: ConfigPath
    field: str = "prompt"
    response_field: str | None = Field(
        default=None,
        description="field holding a reference answer: the gates are then also fitted on the answer's "
        "tokens given the prompt, the kind of tokens a served model generates; rows without one count "
        "as prompts alone",
    )
    where: dict[str, str] = Field(default_factory=dict)
    limit: int | None = Field(default=None, gt=0)


class ExpertSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: ConfigPath
    weight: float = Field(default=1.0, gt=0)
    data: list[DataSource] = Field(default_factory=list)
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)


class SharedMerge(_Strict):
    """How attention, embeddings and norms (everything but the FFN) become one shared copy."""

    method: MergeMethod = "ties"
    scale: float | None = Field(
        default=None,
        gt=0,
        description="λ on the merged task vector; default 1/N for sums, 1/3 (MergeME) for TIES",
    )
    density: float = Field(
        default=0.8, gt=0, le=1, description="share of task-vector entries kept (TIES/DARE)"
    )
    seed: int = 0


class GateSpec(_Strict):
    init: GateInit = "ridge"
    max_prompts: int = Field(default=64, gt=0, description="calibration prompts per expert")
    max_tokens: int = Field(default=128, gt=1, description="tokens per calibration prompt")
    ridge_lambda: float = Field(
        default=0.1,
        gt=0,
        description="ridge penalty, relative to the mean feature power (0.1–0.3 was best on the demo zoo; "
        "1e-3 overfits 64 prompts)",
    )
    use_chat_template: bool = Field(
        default=True, description="wrap calibration prompts as the model sees them"
    )
    arrow_temperature: float = Field(
        default=1.0,
        gt=0,
        description="gate.init=arrow: logits are |<x, v_i>| / temperature (PEFT Arrow's default is 1.0)",
    )
    arrow_mirror: bool = Field(
        default=True,
        description="gate.init=arrow: write each expert twice, with gate rows +v and -v, so a linear gate's "
        "top-k is exactly Arrow's top-k of |<x, v>| (twice the routed experts' storage); false: one row per "
        "expert with the sign fixed (largest entry positive), an approximation",
    )
    seed: int = 0


class OutputSpec(_Strict):
    """Options of the output class (which class: chosen from the experts' architecture)."""

    shared_expert: Literal["none", "base"] = Field(
        default="none",
        description="Qwen2-MoE output only: `base` adds the base's own FFN as the shared expert",
    )
    shared_expert_weight: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="β: each token's FFN output starts as (1-β)·routed experts + β·shared expert "
        "(shared_expert_gate = 0, so sigmoid = 1/2; the down projections carry the scales)",
    )
    dense_unchanged_layers: bool = Field(
        default=True,
        description="Qwen outputs: a layer where every expert's FFN equals the base's stays one dense FFN "
        "(`mlp_only_layers`)",
    )


class Recipe(_Strict):
    base: ConfigPath | None = None
    experts: list[ExpertSpec] = Field(min_length=1)
    shared: SharedMerge = Field(default_factory=SharedMerge)
    gate: GateSpec = Field(default_factory=GateSpec)
    experts_per_token: int = Field(default=1, ge=1)
    dtype: DType = "bfloat16"
    base_as_expert: bool = False
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        return experts

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.shared.method in TASK_VECTOR_METHODS and self.base is None:
            raise ValueError(f"shared.method={self.shared.method} works on task vectors and needs `base`")
        if self.output.shared_expert == "base" and self.base is None:
            raise ValueError("output.shared_expert=base needs `base`")
        if self.base_as_expert and self.base is None:
            raise ValueError("base_as_expert=true needs `base`")
        if "base" in self.expert_names and self.base_as_expert:
            raise ValueError("an expert is named 'base', which base_as_expert=true reserves")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} exceeds the {self.num_experts} experts"
            )
        if self.gate.init == "arrow" and self.base is None:
            raise ValueError(
                "gate.init=arrow needs `base`: each expert's prototype comes from its FFN's change from the base"
            )
        if self.gate.init in CALIBRATED_GATES:
            missing = [e.name for e in self.experts if not (e.data or e.positive_prompts)]
            if missing:
                raise ValueError(
                    f"gate.init={self.gate.init} needs data or positive_prompts for every expert (the gate "
                    f"is fitted on their calibration prompts); missing for: {', '.join(missing)}. "
                    "random, uniform and arrow need none"
                )
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def num_experts(self) -> int:
        return len(self.experts) + int(self.base_as_expert)


def parse_recipe(data: object, base: Path | None = None, source: Path | str | None = None) -> Recipe:
    """A recipe from parsed data; relative paths are taken from `base` (default: the current folder)."""
    try:
        return validate_config(Recipe, data, what="merge recipe", source=source, base=base)
    except ConfigError as err:
        raise RecipeError(err.message, field=err.field, source=err.source) from None


def load_recipe(path: Path) -> Recipe:
    """The recipe at `path`; its relative paths are taken from the recipe's own folder."""
    try:
        raw = read_yaml_mapping(path, what="recipe")
    except ConfigError as err:
        raise RecipeError(err.message, source=err.source) from None
    return parse_recipe(raw, source=Path(path))
