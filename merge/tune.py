"""Gate tuning: train only the router weights of a merged MoE, everything else frozen (MergeME's baseline).

With top-1 routing the renormalised routing weight is always 1, so the LM loss alone gives the gates no
gradient; a cross-entropy between each layer's router logits and the token's expert label supplies it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from merge.calibration import load_calibration_prompts, tokenize_calibration
from merge.layout import gate_name
from merge.recipe import Recipe
from merge.tokenizer import load_tokenizer
from merge.writer import atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    from transformers import MixtralForCausalLM


def _load_moe(moe_dir: Path) -> tuple[MixtralForCausalLM, dict[str, Any]]:
    from transformers import MixtralForCausalLM

    config = json.loads((moe_dir / "config.json").read_text())
    if config.get("architectures") != ["MixtralForCausalLM"]:
        raise ValueError(f"{moe_dir}: not a Mixtral MoE (architectures={config.get('architectures')})")
    model = MixtralForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    return model, config


def tune_gates(
    moe_dir: Path,
    out_dir: Path,
    recipe: Recipe,
    *,
    steps: int = 50,
    lr: float = 1e-2,
    routing_weight: float = 1.0,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    moe_dir, out_dir = Path(moe_dir).resolve(), Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    model, config = _load_moe(moe_dir)
    num_experts = config["num_local_experts"]
    if len(recipe.experts) > num_experts:
        raise ValueError(f"recipe has {len(recipe.experts)} experts, the MoE only {num_experts}")
    tokenizer = load_tokenizer(moe_dir)
    prompts = [
        (label, p)
        for label, p in load_calibration_prompts(recipe.experts, recipe.gate.max_prompts)
        if label >= 0
    ]
    cal = tokenize_calibration(tokenizer, prompts, recipe.gate.max_tokens, recipe.gate.use_chat_template)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = [layer.mlp.gate.weight for layer in model.model.layers]
    for g in gates:
        g.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=lr)
    generator = torch.Generator().manual_seed(recipe.gate.seed)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(cal.labels), generator=generator)[:batch_size]
        ids, mask, labels = cal.input_ids[idx], cal.mask[idx], cal.labels[idx]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        out = model(input_ids=ids, attention_mask=mask.long(), output_router_logits=True)
        lm = F.cross_entropy(out.logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        token_labels = labels.unsqueeze(1).expand_as(mask).reshape(-1)
        flat_mask = mask.reshape(-1)
        routing = sum(F.cross_entropy(r[flat_mask], token_labels[flat_mask]) for r in out.router_logits)
        loss = lm + routing_weight * routing / len(out.router_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1)
    tuned = {gate_name(i): g.detach().clone() for i, g in enumerate(gates)}
    report = {
        "steps": steps,
        "lr": lr,
        "routing_weight": routing_weight,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_with_gates(moe_dir, out_dir, tuned, report, overwrite)
    return report


def _write_with_gates(
    moe_dir: Path, out_dir: Path, gates: dict[str, torch.Tensor], report: dict[str, Any], overwrite: bool
) -> None:
    """Copy the MoE folder, rewriting only the shards that hold gate tensors."""
    index = json.loads((moe_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards_with_gates = {index[name] for name in gates}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for item in moe_dir.iterdir():
            if item.name in shards_with_gates:
                tensors = load_file(str(item))
                for name, tensor in gates.items():
                    if index[name] == item.name:
                        tensors[name] = tensor.to(tensors[name].dtype).contiguous()
                save_file(tensors, str(tmp / item.name), metadata={"format": "pt"})
            elif item.is_file():
                shutil.copyfile(item, tmp / item.name)
        merge_report_path = tmp / "merge-report.json"
        merge_report = json.loads(merge_report_path.read_text()) if merge_report_path.exists() else {}
        merge_report["gate_tuning"] = report
        merge_report_path.write_text(json.dumps(merge_report, indent=2))
        card = tmp / "README.md"
        if card.exists():
            card.write_text(
                card.read_text()
                + f"\n## Gate tuning\n\nGates trained {report['steps']} steps (lr {report['lr']}), everything else "
                f"frozen; loss {report['loss_first']} → {report['loss_last']}.\n"
            )
