"""PEFT LoRA adapters as merge inputs: an adapter folder reads like the dense expert it makes of its base.

Why: most published fine-tunes are LoRA adapters of a common base. An adapter expert's weight is
materialised tensor by tensor, as W + s·B·A (s = α/r, or α/√r with rsLoRA), while the merge streams, so no
dense copy of the expert is ever held or written; its task vector for TIES/DARE is s·B·A itself, never a
difference of two rounded tensors. Only what peft's own `merge_and_unload` reproduces exactly is accepted:
anything else (DoRA and other variants, LoRA biases, modules_to_save, trained embeddings, pickle weights,
NaN/Inf, shapes that do not fit the base) is refused before the merge writes anything, with a message
naming the adapter and the config field or tensor at fault. Only JSON and safetensors are read.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merge.checkpoint import CheckpointError, DenseCheckpoint

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # peft's prefix for a causal LM's own parameter names
FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# init_lora_weights values that leave the base untouched (the others rewrite W at init: PiSSA, OLoRA,
# CorDA, LoRA-GA, LoftQ; peft saves a converted adapter with init_lora_weights=true) or no variant (MiCA).
PLAIN_INITS: tuple[bool | str, ...] = (True, False, "gaussian", "eva", "orthogonal")
# Fields read here, or whose value does not change what merging computes (training-time or targeting
# options: the saved tensors say which modules were adapted).
KNOWN_FIELDS = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "base_model_name_or_path",
    "init_lora_weights",
    "task_type",
    "peft_version",
    "auto_mapping",
    "revision",
    "inference_mode",
    "lora_dropout",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",  # ties adapters of tied embeddings: such factors are refused as embeddings
}
# Fields that must be falsy: each changes the weight peft would merge, or adds tensors moerge cannot place.
REFUSED_FIELDS = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude",
    "lora_bias": "LoRA bias terms have no place in Llama/Mixtral layers, which have no biases",
    "modules_to_save": "modules_to_save stores fully trained copies of modules beside the LoRA factors",
    "trainable_token_indices": "trainable tokens are trained embedding rows",
    "target_parameters": "LoRA on bare parameters is not a LoRA of a Linear layer",
    "layer_replication": "layer replication changes the base's layer stack",
    "use_qalora": "QALoRA pools inputs of a quantized base",
    "megatron_config": "Megatron parallel layers are not Llama layers",
    "velora_config": "VeLoRA is a LoRA variant",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot be merged",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "use_bdlora": "block-diagonal LoRA is a LoRA variant",
    "arrow_config": "Arrow routing is a LoRA variant",
    "kasa_config": "KaSA rewrites the base weight",
}


def is_adapter(path: Path) -> bool:
    """A folder is a PEFT adapter if it holds an adapter config or adapter weights (detected by its files)."""
    path = Path(path)
    return any((path / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_WEIGHTS))


def open_expert(name: str, path: Path, base: DenseCheckpoint | None) -> DenseCheckpoint:
    """Open a recipe's expert: a dense model folder, or a LoRA adapter of the recipe's `base`."""
    if not is_adapter(path):
        return DenseCheckpoint.open(name, path)
    if base is None:
        raise CheckpointError(
            f"{name}: {path} is a PEFT LoRA adapter; set the recipe's `base` to the model it adapts"
        )
    return AdapterCheckpoint.open_adapter(name, Path(path), base)


@dataclass(frozen=True)
class LoraFactor:
    """Where one adapted module's A [r, in] and B [out, r] live, and its scale s."""

    a_key: str
    b_key: str
    scale: float


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key matching the end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(kw_only=True)
class AdapterCheckpoint(DenseCheckpoint):
    """A LoRA adapter seen as the dense expert W + s·B·A; `path`, config and tokenizer are the base's."""

    base: DenseCheckpoint
    adapter_path: Path
    weights_file: Path
    factors: dict[str, LoraFactor] = field(default_factory=dict)

    @classmethod
    def open_adapter(cls, name: str, path: Path, base: DenseCheckpoint) -> AdapterCheckpoint:
        """Read and check the adapter against `base`; raise CheckpointError naming the field at fault."""
        config = _read_config(name, path)
        _check_config(name, path, config, base)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            hint = (
                f" (found {PICKLE_WEIGHTS}: pickle, which moerge refuses to load)"
                if (path / PICKLE_WEIGHTS).exists()
                else ""
            )
            raise CheckpointError(f"{name}: no {ADAPTER_WEIGHTS} in {path}{hint}")
        factors = _read_factors(name, weights, config, base)
        _check_targets(name, config, factors, base)
        return cls(
            name=name,
            path=base.path,
            config=base.config,
            weight_map=dict(base.weight_map),
            base=base,
            adapter_path=path,
            weights_file=weights,
            factors=factors,
        )

    def delta(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """s·B·A for tensor `key` (rows [start, stop) of it), float32; None where the adapter does not touch it."""
        factor = self.factors.get(key)
        if factor is None:
            return None
        with safe_open(str(self.weights_file), framework="pt") as handle:
            a = handle.get_tensor(factor.a_key).float()
            b = (
                handle.get_tensor(factor.b_key)
                if rows is None
                else handle.get_slice(factor.b_key)[rows[0] : rows[1]]
            )
        # The order of peft's get_delta_weight ((B @ A) * s), so a float32 merge matches peft's bit for bit.
        return (b.float() @ a) * factor.scale

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        weight = self.base.tensor(key, rows)
        delta = self.delta(key, rows)
        return weight if delta is None else weight.add_(delta)

    def task_vector(self, key: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        delta = self.delta(key, rows)
        return torch.zeros_like(base, dtype=torch.float32) if delta is None else delta


def _read_config(name: str, path: Path) -> dict[str, Any]:
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{name}: no {ADAPTER_CONFIG} in {path} (adapter weights without a config)"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} in {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} in {path} is not a JSON object")
    return config


def _positive_number(name: str, key: str, value: Any, *, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if integer else "a positive finite number"
        raise CheckpointError(f"{name}: adapter config {key}={value!r} is not {what}")


def _check_config(name: str, path: Path, config: dict[str, Any], base: DenseCheckpoint) -> None:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{name}: adapter config peft_type={config.get('peft_type')!r}; only LORA is supported"
        )
    for key, why in REFUSED_FIELDS.items():
        if config.get(key):
            raise CheckpointError(f"{name}: adapter config {key}={config[key]!r} is not supported: {why}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{name}: adapter config bias={config['bias']!r} is not supported: only 'none' (no trained biases)"
        )
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise CheckpointError(
            f"{name}: adapter config init_lora_weights={init!r} is not supported: that initialisation rewrites "
            "the base weight (save the adapter converted, with path_initial_model_for_weight_conversion)"
        )
    unknown = sorted(
        k for k, v in config.items() if k not in KNOWN_FIELDS | set(REFUSED_FIELDS) | {"bias"} and v
    )
    if unknown:
        raise CheckpointError(
            f"{name}: adapter config field {unknown[0]}={config[unknown[0]]!r} is not understood by moerge "
            "(peft 0.21 LoRA fields); refusing rather than guessing what it changes"
        )
    _positive_number(name, "r", config.get("r"), integer=True)
    _positive_number(name, "lora_alpha", config.get("lora_alpha"), integer=False)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{name}: adapter config {key} is not a mapping")
        for pattern, value in patterns.items():
            _positive_number(name, f"{key}[{pattern!r}]", value, integer=integer)
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise CheckpointError(f"{name}: adapter config {key}={config[key]!r} is not true or false")
    if config.get("fan_in_fan_out"):
        # Llama/Mistral Linear weights are stored [out, in]; peft resets the flag to false for nn.Linear
        # (tuners/lora/layer.py dispatch_default) and merges B·A untransposed, and so does moerge.
        log.warning(
            "%s: adapter config fan_in_fan_out=true does not apply to %s's nn.Linear layers; "
            "merged as peft does, with fan_in_fan_out=false",
            name,
            base.config["architectures"][0],
        )
    claimed = config.get("base_model_name_or_path")
    if claimed and not _same_base(str(claimed), base):
        log.warning(
            "%s: adapter config base_model_name_or_path=%r differs from the recipe's base %s",
            name,
            claimed,
            base.path,
        )


def _same_base(claimed: str, base: DenseCheckpoint) -> bool:
    """Same folder, or the same name (a hub id `org/name` for a local copy in a folder called `name`)."""
    try:
        if Path(claimed).resolve() == base.path.resolve():
            return True
    except OSError:
        pass
    return claimed == base.config.get("_name_or_path") or claimed.rstrip("/").split("/")[-1] == base.path.name


def _read_factors(
    name: str, weights: Path, config: dict[str, Any], base: DenseCheckpoint
) -> dict[str, LoraFactor]:
    """Check every tensor of the adapter (a LoRA factor of a 2-D base weight, shapes, rank, finite)."""
    pairs: dict[str, dict[str, str]] = {}
    shapes: dict[str, list[int]] = {}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                _classify(name, key, pairs)
                tensor = handle.get_tensor(key)
                if not torch.isfinite(tensor.float()).all():
                    raise CheckpointError(f"{name}: adapter tensor {key} contains NaN or Inf values")
                shapes[key] = list(tensor.shape)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{name}: cannot read {weights.name}: {err}") from err
    if not pairs:
        raise CheckpointError(f"{name}: {weights.name} holds no LoRA weights")
    factors: dict[str, LoraFactor] = {}
    for module, keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise CheckpointError(f"{name}: adapter has no {missing} for module {module}")
        target = f"{module}.weight"
        if target not in base.weight_map:
            raise CheckpointError(f"{name}: target module {module} is not in the base ({base.path})")
        out_f, in_f = _base_shape(name, base, target)
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        a_shape, b_shape = shapes[keys["A"]], shapes[keys["B"]]
        field_r = "rank_pattern" if (config.get("rank_pattern") and r != config["r"]) else "r"
        if a_shape != [r, in_f] or b_shape != [out_f, r]:
            raise CheckpointError(
                f"{name}: module {module}: lora_A {a_shape} / lora_B {b_shape} do not fit the base weight "
                f"[{out_f}, {in_f}] at {field_r}={r} (expected lora_A [{r}, {in_f}], lora_B [{out_f}, {r}])"
            )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[target] = LoraFactor(a_key=keys["A"], b_key=keys["B"], scale=scale)
    return factors


def _classify(name: str, key: str, pairs: dict[str, dict[str, str]]) -> None:
    """File `key` as module's lora_A/lora_B, or refuse it naming what it is."""
    local = key.removeprefix(KEY_PREFIX)
    match = FACTOR.match(local)
    if match:
        pairs.setdefault(match["module"], {})[match["which"]] = key
        return
    if "lora_embedding_" in key or "embed_tokens" in key or "lm_head" in key:
        why = "trained embeddings (LoRA on an embedding layer, or saved embedding weights) are not supported"
    elif "lora_magnitude_vector" in key:
        why = "a DoRA magnitude vector (use_dora) is not supported"
    elif key.endswith(".bias"):
        why = "a bias (lora_bias) is not supported"
    elif "modules_to_save" in key:
        why = "a modules_to_save copy is not supported"
    else:
        why = "it is not a LoRA factor (`<module>.lora_A.weight` / `.lora_B.weight`)"
    raise CheckpointError(f"{name}: adapter tensor {key}: {why}")


def _base_shape(name: str, base: DenseCheckpoint, target: str) -> tuple[int, int]:
    shape = base.shape(target)
    if len(shape) != 2:
        raise CheckpointError(f"{name}: target module weight {target} has shape {shape}, not a Linear weight")
    return shape[0], shape[1]


def _check_targets(
    name: str, config: dict[str, Any], factors: dict[str, LoraFactor], base: DenseCheckpoint
) -> None:
    """Every listed target module exists in the base and is adapted (a regex or 'all-linear' is not checked)."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return
    base_modules = {k.removesuffix(".weight") for k in base.weight_map}
    adapted = {k.removesuffix(".weight") for k in factors}
    for target in targets:

        def hits(modules: set[str], target: str = target) -> bool:
            return any(m == target or m.endswith(f".{target}") for m in modules)

        if not hits(base_modules):
            raise CheckpointError(
                f"{name}: adapter config target_modules names {target!r}, which is not in the base"
            )
        if not hits(adapted):
            raise CheckpointError(
                f"{name}: adapter config target_modules names {target!r}, but {ADAPTER_WEIGHTS} has no factors for it"
            )
