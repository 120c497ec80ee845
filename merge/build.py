"""The merge itself: stream N dense experts layer by layer into one Mixtral MoE (or one dense model).

Memory stays bounded by one decoder layer of every input plus the calibration hidden states: each tensor
is read lazily, merged or copied, written into the current shard, and dropped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.adapter import AdapterCheckpoint, open_expert
from merge.calibration import (
    LayerwiseForward,
    load_calibration_prompts,
    routing_shares,
    tokenize_calibration,
    tokenizer_for,
)
from merge.card import input_hashes, write_model_card
from merge.checkpoint import TOKENIZER_FILES, DenseCheckpoint, check_compatible
from merge.gates import init_gate
from merge.layout import expert_name, gate_name, is_ffn, layer_of, mixtral_config
from merge.methods import merge_task_vectors, merge_tensor, trim_threshold
from merge.recipe import Recipe
from merge.resources import PeakRSS
from merge.writer import DTYPES, ShardWriter, atomic_output_dir, check_output_dir

FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
CHUNK_ELEMENTS = 4 * 1024 * 1024  # rows of a big matrix merged at once (16 MiB per float32 copy)
UNUSED_SHARE = 0.01  # an expert getting under 1% of a layer's calibration tokens is flagged as unused
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class MergeInputs:
    """The opened checkpoints a recipe names, checked compatible."""

    base: DenseCheckpoint | None
    experts: list[DenseCheckpoint]

    @property
    def ffn_sources(self) -> list[DenseCheckpoint]:
        return self.experts + ([self.base] if self.base is not None else [])

    @property
    def reference(self) -> DenseCheckpoint:
        return self.experts[0]


def open_inputs(recipe: Recipe) -> MergeInputs:
    """Open the base and every expert (a dense folder or a LoRA adapter of the base), checked compatible."""
    base = DenseCheckpoint.open("base", recipe.base) if recipe.base is not None else None
    experts = [open_expert(e.name, e.path, base) for e in recipe.experts]
    check_compatible(([base] if base else []) + experts)
    return MergeInputs(base=base, experts=experts)


class SharedMerger:
    """Merges one named tensor across the experts with the recipe's method (a fresh float32 tensor)."""

    def __init__(self, recipe: Recipe, inputs: MergeInputs) -> None:
        self.recipe = recipe
        self.inputs = inputs
        self.weights = [e.weight for e in recipe.experts]
        self.generator = torch.Generator().manual_seed(recipe.shared.seed)

    def __call__(self, name: str) -> torch.Tensor:
        shape = self.inputs.reference.shape(name)
        if len(shape) != 2 or shape[0] * shape[1] <= CHUNK_ELEMENTS:
            return self._merge(name, None, None)
        # Big matrices (embeddings, lm_head) are merged in row chunks so that N float32 copies of them
        # never sit in memory together; TIES gets each expert's whole-tensor trim threshold first.
        thresholds = None
        if self.recipe.shared.method == "ties" and self.recipe.shared.density < 1.0:
            base = self.inputs.base
            assert base is not None, "TIES needs the base (checked by the recipe)"
            whole = base.tensor(name)
            thresholds = [
                trim_threshold(e.task_vector(name, whole), self.recipe.shared.density)
                for e in self.inputs.experts
            ]
            del whole
        step = max(1, CHUNK_ELEMENTS // shape[1])
        out = torch.empty(shape, dtype=DTYPES[self.recipe.dtype])
        for start in range(0, shape[0], step):
            rows = (start, min(start + step, shape[0]))
            out[rows[0] : rows[1]] = self._merge(name, rows, thresholds)
        return out

    def _merge(self, name: str, rows: tuple[int, int] | None, thresholds: list[float] | None) -> torch.Tensor:
        spec = self.recipe.shared
        if spec.method == "linear" or self.inputs.base is None:
            tensors = [e.tensor(name, rows) for e in self.inputs.experts]
            return merge_tensor(
                spec.method, tensors, self.weights, None, scale=spec.scale, density=spec.density
            )
        # Task vectors straight from each expert: a LoRA expert's is s·B·A, not (W + s·B·A) − W.
        base = self.inputs.base.tensor(name, rows)
        taus = [e.task_vector(name, base, rows) for e in self.inputs.experts]
        return merge_task_vectors(
            spec.method,
            taus,
            self.weights,
            base,
            scale=spec.scale,
            density=spec.density,
            generator=self.generator,
            trim_thresholds=thresholds,
        )


def _layer_names(names: list[str], layer: int) -> list[str]:
    return [n for n in names if layer_of(n) == layer]


def _short(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `q_proj`; `...input_layernorm.weight` → `input_layernorm`."""
    return name.split(".")[-2]


def merge_experts(
    recipe: Recipe,
    out_dir: Path,
    *,
    dense: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    recipe_text: str | None = None,
) -> dict[str, Any]:
    """Merge `recipe` into `out_dir` atomically; returns the merge report (also written as merge-report.json)."""
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    tick = progress or (lambda stage, done, total: None)
    with PeakRSS() as rss:
        inputs = open_inputs(recipe)
        ref = inputs.reference
        names = list(ref.weight_map)
        layers = int(ref.value("num_hidden_layers"))
        num_experts = recipe.num_experts
        expert_labels = recipe.expert_names + (["base"] if recipe.base_as_expert else [])
        merger = SharedMerger(recipe, inputs)
        forward = None
        has_data = any(e.data or e.positive_prompts for e in recipe.experts)
        if not dense and has_data:
            tokenizer = tokenizer_for(ref.path)
            prompts = load_calibration_prompts(recipe.experts, recipe.gate.max_prompts)
            calibration = tokenize_calibration(
                tokenizer, prompts, recipe.gate.max_tokens, recipe.gate.use_chat_template
            )
            compute = torch.float32 if recipe.dtype == "float32" else torch.bfloat16
            forward = LayerwiseForward(ref.config, calibration, compute)
            token_labels = calibration.token_labels
        elif not dense and recipe.gate.init not in {"random", "uniform"}:
            raise ValueError(f"gate.init={recipe.gate.init} needs calibration data")
        gate_rng = torch.Generator().manual_seed(recipe.gate.seed)
        layer_stats: list[dict[str, Any]] = []
        cheap_gate: torch.Tensor | None = None

        with atomic_output_dir(out_dir, overwrite) as tmp:
            writer = ShardWriter(tmp, recipe.dtype)
            embed_name = "model.embed_tokens.weight"
            embed = merger(embed_name)
            writer.add(embed_name, embed)
            if forward is not None:
                embed_features = forward.embed(embed)
                if recipe.gate.init == "cheap_embed":
                    cheap_gate = init_gate(
                        "cheap_embed",
                        embed_features,
                        token_labels,
                        num_experts,
                        ridge_lambda=recipe.gate.ridge_lambda,
                        generator=gate_rng,
                    )
            del embed
            for layer in range(layers):
                tick("layers", layer, layers)
                in_layer = _layer_names(names, layer)
                shared = {}
                for name in in_layer:
                    if not is_ffn(name):
                        shared[_short(name)] = merger(name)
                        writer.add(name, shared[_short(name)])
                if dense:
                    for name in in_layer:
                        if is_ffn(name):
                            writer.add(name, merger(name))
                    continue
                ffns = [
                    {p: src.tensor(f"model.layers.{layer}.mlp.{p}.weight") for p in FFN_PROJS}
                    for src in inputs.ffn_sources[:num_experts]
                ]
                if forward is not None:
                    ffn_inputs = forward.attention(shared)
                    if cheap_gate is not None:
                        gate = cheap_gate
                    else:
                        gate = init_gate(
                            recipe.gate.init,
                            ffn_inputs,
                            token_labels,
                            num_experts,
                            ridge_lambda=recipe.gate.ridge_lambda,
                            generator=gate_rng,
                        )
                    top1 = forward.route(gate, ffns, recipe.experts_per_token)
                    layer_stats.append(_layer_stat(layer, top1, token_labels, expert_labels))
                else:
                    gate = init_gate(
                        recipe.gate.init,
                        torch.zeros(1, int(ref.value("hidden_size"))),
                        torch.zeros(1, dtype=torch.long),
                        num_experts,
                        ridge_lambda=recipe.gate.ridge_lambda,
                        generator=gate_rng,
                    )
                writer.add(gate_name(layer), gate)
                for e, ffn in enumerate(ffns):
                    for proj, tensor in ffn.items():
                        writer.add(expert_name(layer, e, proj), tensor)
                del ffns, shared
            tick("layers", layers, layers)
            for name in names:
                if layer_of(name) is None and name != embed_name:
                    writer.add(name, merger(name))
            writer.close()
            layer_shared = [n for n in names if n.startswith("model.layers.") and not is_ffn(n)]
            _write_config(tmp, ref, recipe, dense, num_experts)
            _copy_tokenizer(ref.path, tmp)
            report = {
                "mode": "dense" if dense else "moe",
                "experts": expert_labels,
                "lora_experts": [e.name for e in inputs.experts if isinstance(e, AdapterCheckpoint)],
                "num_experts": 1 if dense else num_experts,
                "experts_per_token": recipe.experts_per_token,
                "shared_method": recipe.shared.method,
                "gate_init": None if dense else recipe.gate.init,
                "dtype": recipe.dtype,
                "layers": layers,
                "shared_tensors_per_layer": len(layer_shared) // max(layers, 1),
                "output_bytes": writer.total_bytes,
                "gate_stats": layer_stats,
                "unused_experts": sorted({u for s in layer_stats for u in s["unused"]}),
                "mean_own_share": _mean_own_share(layer_stats, expert_labels),
            }
            report["inputs"] = input_hashes(recipe)
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["peak_rss_mib"] = round(rss.peak_mib, 1)
            report["rss_before_mib"] = round(rss.start_mib, 1)
            (tmp / "merge-report.json").write_text(json.dumps(report, indent=2))
            write_model_card(tmp, recipe, report, recipe_text)
    report["peak_rss_mib"] = round(rss.peak_mib, 1)
    return report


def _layer_stat(layer: int, top1: torch.Tensor, labels: torch.Tensor, experts: list[str]) -> dict[str, Any]:
    shares = routing_shares(top1, labels, len(experts))
    load = torch.bincount(top1[labels >= 0], minlength=len(experts)).float()
    load = (load / load.sum().clamp_min(1)).tolist()
    return {
        "layer": layer,
        "own_share": {e: round(shares[i][i], 4) for i, e in enumerate(experts)},
        "share_matrix": [[round(v, 4) for v in row] for row in shares],
        "load": {e: round(load[i], 4) for i, e in enumerate(experts)},
        "unused": [e for i, e in enumerate(experts) if load[i] < UNUSED_SHARE],
    }


def _mean_own_share(stats: list[dict[str, Any]], experts: list[str]) -> dict[str, float]:
    if not stats:
        return {}
    return {e: round(sum(s["own_share"][e] for s in stats) / len(stats), 4) for e in experts}


def _write_config(tmp: Path, ref: DenseCheckpoint, recipe: Recipe, dense: bool, num_experts: int) -> None:
    if dense:
        config = dict(ref.config)
        config["dtype"] = recipe.dtype
        config.pop("torch_dtype", None)
    else:
        config = mixtral_config(ref.config, num_experts, recipe.experts_per_token, recipe.dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
