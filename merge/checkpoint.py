"""Reading dense checkpoints lazily and checking that a set of them can be merged.

Tensors are read one at a time through safetensors' memory map, so a merge never holds a whole model.
Only safetensors is read: pickle-based `.bin` files are refused (loading them can run code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merge.outputs import SUPPORTED_INPUTS

SUPPORTED_ARCHITECTURES = SUPPORTED_INPUTS  # Llama, Mistral (→ Mixtral), Qwen2, Qwen3 (→ their MoE classes)
# Bias flags the output class cannot hold, per input family: (flag, why).
REFUSED_FLAGS = {
    "LlamaForCausalLM": (
        ("attention_bias", "Mixtral has no bias terms to hold it"),
        ("mlp_bias", "Mixtral has no bias terms to hold it"),
    ),
    "MistralForCausalLM": (
        ("attention_bias", "Mixtral has no bias terms to hold it"),
        ("mlp_bias", "Mixtral has no bias terms to hold it"),
    ),
    "Qwen3ForCausalLM": (("attention_bias", "vLLM's Qwen3-MoE has no o_proj bias to hold it"),),
}
# Config fields that must agree for the FFNs and shared weights to line up.
MUST_MATCH = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot take part in the merge; the message names the model and the field."""


@dataclass
class DenseCheckpoint:
    """One dense model folder: its config and a lazy view of its safetensors tensors."""

    name: str
    path: Path
    config: dict[str, Any]
    weight_map: dict[str, Path]
    _shapes: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, name: str, path: Path) -> DenseCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{name}: path {path} is not a model folder")
        config_path = path / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"{name}: no config.json in {path}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{name}: config.json in {path} is not valid JSON ({err})") from err
        arch = (config.get("architectures") or ["<missing>"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{name}: architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for flag, why in REFUSED_FLAGS.get(arch, ()):
            if config.get(flag):
                raise CheckpointError(f"{name}: config {flag}=true; {why}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            hint = (
                " (found pickle .bin weights, which moerge refuses to load)"
                if list(path.glob("*.bin"))
                else ""
            )
            raise CheckpointError(f"{name}: no .safetensors weights in {path}{hint}")
        weight_map: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                        weight_map[key] = file
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{name}: cannot read {file.name}: {err}") from err
        return cls(name=name, path=path, config=config, weight_map=weight_map)

    def value(self, key: str) -> Any:
        if key == "head_dim" and self.config.get("head_dim") is None:
            return self.config["hidden_size"] // self.config["num_attention_heads"]
        if key == "tie_word_embeddings":
            return bool(self.config.get(key, False))
        if key == "hidden_act":
            return self.config.get(key, "silu")
        return self.config.get(key)

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or rows [start, stop) of it, as float32; NaN/Inf are refused.

        The file is mapped only for the read: a long-lived map would keep every page already read
        resident, and peak memory would grow to the size of all inputs.
        """
        file = self.weight_map.get(key)
        if file is None:
            raise CheckpointError(f"{self.name}: tensor {key} is missing")
        with safe_open(str(file), framework="pt") as handle:
            t = (handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows[0] : rows[1]]).float()
        # A sum is finite iff every entry is (barring overflow near 3e38, which the full check catches).
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise CheckpointError(f"{self.name}: tensor {key} contains NaN or Inf values")
        return t

    def raw(self, key: str) -> torch.Tensor:
        """Read one whole tensor in its stored dtype (no float32 copy); NaN/Inf are refused.

        For tensors copied through unchanged (expert FFNs) and for merging in cache-sized blocks.
        """
        file = self.weight_map.get(key)
        if file is None:
            raise CheckpointError(f"{self.name}: tensor {key} is missing")
        with safe_open(str(file), framework="pt") as handle:
            t = handle.get_tensor(key)
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise CheckpointError(f"{self.name}: tensor {key} contains NaN or Inf values")
        return t

    def task_vector(self, key: str, base: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """τ = θ − θ_base for one tensor (rows of it), float32, given the base's `base` (same rows)."""
        return self.tensor(key, rows) - base

    def shape(self, key: str) -> list[int]:
        shape = self._shapes.get(key)
        if shape is None:
            with safe_open(str(self.weight_map[key]), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self._shapes[name] = list(handle.get_slice(name).get_shape())
            shape = self._shapes[key]
        return shape


def _same_tokenizer_files(a: Path, b: Path) -> bool:
    files = [name for name in TOKENIZER_FILES if (a / name).is_file() or (b / name).is_file()]
    return all(
        (a / name).is_file() and (b / name).is_file() and (a / name).read_bytes() == (b / name).read_bytes()
        for name in files
    )


def _vocab(path: Path, name: str) -> dict[str, int]:
    from merge.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(path)
    except Exception as err:  # tokenizer loading raises many error types
        raise CheckpointError(f"{name}: cannot load the tokenizer in {path}: {err}") from err
    return tok.get_vocab()


def check_compatible(models: list[DenseCheckpoint]) -> None:
    """Raise CheckpointError naming the first model and field that differ from the first model."""
    ref = models[0]
    for other in models[1:]:
        for key in MUST_MATCH:
            if ref.value(key) != other.value(key):
                raise CheckpointError(
                    f"{other.name}: {key}={other.value(key)} differs from {ref.name}'s {key}={ref.value(key)}"
                )
        ref_arch, other_arch = ref.config["architectures"][0], other.config["architectures"][0]
        if ref_arch != other_arch:
            raise CheckpointError(
                f"{other.name}: architecture {other_arch} differs from {ref.name}'s {ref_arch}"
            )
        missing = sorted(set(ref.weight_map) - set(other.weight_map))
        extra = sorted(set(other.weight_map) - set(ref.weight_map))
        if missing or extra:
            raise CheckpointError(
                f"{other.name}: tensor names differ from {ref.name}'s (missing {missing[:3]}, extra {extra[:3]})"
            )
        for key in ref.weight_map:
            if ref.shape(key) != other.shape(key):
                raise CheckpointError(
                    f"{other.name}: tensor {key} has shape {other.shape(key)}, {ref.name} has {ref.shape(key)}"
                )
    ref_vocab = _vocab(ref.path, ref.name)
    for other in models[1:]:
        # Fine-tunes mostly carry their base's tokenizer files unchanged: the same bytes, the same vocabulary.
        if not _same_tokenizer_files(ref.path, other.path) and _vocab(other.path, other.name) != ref_vocab:
            raise CheckpointError(f"{other.name}: tokenizer vocabulary differs from {ref.name}'s")
    layers = ref.value("num_hidden_layers")
    if not isinstance(layers, int) or layers <= 0 or not math.isfinite(layers):
        raise CheckpointError(f"{ref.name}: num_hidden_layers={layers} is not a positive integer")
