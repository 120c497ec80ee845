"""Load-completeness check: would vLLM's loader for this checkpoint's class map every tensor and fill every
parameter? Decided from config.json and the safetensors headers alone (no vLLM, no weights read).

The class rules in `merge/outputs/` list, from the config, every tensor a complete checkpoint holds and
the vLLM parameter each one is loaded into. A checkpoint passes when its tensors are exactly those, with
those shapes. vLLM 0.32 itself does not catch every gap: its loader marks the parameters of unquantised
linear layers as loaded whether or not the checkpoint had them, so a missing projection serves garbage.
`tests/test_merge_qwen_vllm.py` checks these rules against the parameters of the models vLLM really builds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from merge.outputs import ALL_CLASSES, ModelClass

# One tensor for all experts of a layer: transformers 5's in-memory layout (`mlp.experts.gate_up_proj`
# [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and vLLM's own parameter names.
FUSED_EXPERTS = re.compile(r"\.experts\.(?!\d+\.)[A-Za-z_0-9]+(\.weight)?$")
FUSED_WHY = (
    "fused expert tensors (one [E, ...] tensor for all experts of a layer, transformers 5's in-memory "
    "layout) are refused: vLLM's Mixtral loader has no parameter of that name, and vLLM 0.32's Qwen MoE "
    "loaders take them only through a separate fused path whose orientation the checkpoint does not "
    "record; moerge writes and verifies one tensor per expert (`experts.M.<proj>.weight`)"
)
MAX_LISTED = 8


class LoadCheckError(ValueError):
    """A checkpoint vLLM's loader would not load completely; the message lists what is wrong."""


@dataclass
class LoadCheck:
    """What the check found; `problems` empty means complete."""

    folder: Path
    architecture: str
    tensors: int = 0
    parameters: int = 0
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "complete": self.ok,
            "tensors": self.tensors,
            "vllm_parameters": self.parameters,
            "moe_layers": self.moe_layers,
            "dense_layers": self.dense_layers,
            "problems": self.problems,
        }

    def raise_if_incomplete(self) -> None:
        if self.problems:
            listed = "\n  ".join(self.problems[:MAX_LISTED])
            more = (
                f"\n  … and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
            )
            raise LoadCheckError(
                f"{self.folder}: {self.architecture} checkpoint would not load completely in vLLM:\n  {listed}{more}"
            )


def checkpoint_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Name → shape of every tensor in the folder's safetensors files (headers only), and index problems."""
    shapes: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    files = sorted(folder.glob("*.safetensors"))
    owner: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in shapes:
                    problems.append(f"{name}: in both {owner[name]} and {file.name}")
                shapes[name] = tuple(fh.get_slice(name).get_shape())
                owner[name] = file.name
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        for name, shard in sorted(weight_map.items()):
            if owner.get(name) != shard:
                problems.append(f"{name}: the index names {shard}, which does not hold it")
        problems += [f"{n}: in {owner[n]} but not in the index" for n in sorted(set(owner) - set(weight_map))]
    return shapes, problems


def expected_parameters(cls: ModelClass, config: dict[str, Any]) -> set[str]:
    """The vLLM parameter names a model of this class and config has (from the class rules)."""
    return {cls.vllm_param(name) for name in cls.expected_tensors(config)}


def check_checkpoint(folder: Path) -> LoadCheck:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as err:
        raise LoadCheckError(f"{folder}: no config.json") from err
    arch = (config.get("architectures") or ["<missing>"])[0]
    result = LoadCheck(folder=folder, architecture=arch)
    cls = ALL_CLASSES.get(arch)
    if cls is None:
        result.problems.append(f"no loader rules for {arch}; known: {', '.join(ALL_CLASSES)}")
        return result
    have, index_problems = checkpoint_tensors(folder)
    result.problems += index_problems
    result.tensors = len(have)
    if not have:
        result.problems.append("no .safetensors tensors")
        return result
    fused = sorted(n for n in have if FUSED_EXPERTS.search(n))
    if fused:
        result.problems.append(f"{FUSED_WHY}: {', '.join(fused[:3])}{' …' if len(fused) > 3 else ''}")
    try:
        want = cls.expected_tensors(config)
    except (KeyError, TypeError, ValueError) as err:
        result.problems.append(f"config.json lacks or mangles a field {arch} needs: {err}")
        return result
    moe = cls.moe_layers(config)
    result.moe_layers = [i for i, m in enumerate(moe) if m]
    result.dense_layers = [i for i, m in enumerate(moe) if not m] if cls.is_moe else []
    result.parameters = len({cls.vllm_param(n) for n in want})
    if cls.needs_moe_layer and not result.moe_layers:
        result.problems.append(f"{arch} with no MoE layer: vLLM refuses it ('No ... MoE layer found')")
    for name in sorted(set(have) - set(want) - set(fused)):
        result.problems.append(
            f"{name}: not mapped by {arch}'s loader with this config (no parameter {cls.vllm_param(name)})"
        )
    for name in sorted(set(want) - set(have)):
        result.problems.append(f"parameter {cls.vllm_param(name)} not (fully) loaded: no tensor {name}")
    for name in sorted(set(want) & set(have)):
        if have[name] != want[name]:
            result.problems.append(
                f"{name}: shape {list(have[name])}, {arch} with this config expects {list(want[name])}"
            )
    return result
