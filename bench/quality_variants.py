"""The merge variants of table 1, built from the demo zoo's own MoE recipe with one thing changed each.

Every variant is built by the real CLIs (`moerge merge`, `moerge tune-gates`, `mergekit-moe`) in its own
process, into `WORK/models/NAME`, and reused while the recipe that made it is unchanged (a hash file
beside it), so re-running the benchmark only evaluates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from merge_bench import ensure_mergekit  # one mergekit venv for both benchmarks

from merge.recipe import load_recipe


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "dense" or "moe"
    recipe: dict
    tune_from: str | None = None  # tuned gates: the MoE variant whose gates are trained
    mergekit: bool = False


def base_recipe(zoo: Path) -> dict:
    """The zoo's MoE recipe with every path made absolute, as a plain dict to vary."""
    recipe = load_recipe(zoo / "moe-recipe.yaml")
    return recipe.model_dump(mode="json", exclude_none=True)


def varied_recipe(
    recipe: dict,
    *,
    shared: dict | None = None,
    gate: dict | None = None,
    prompts: int | None = None,
    answers: bool | None = None,
    top_k: int | None = None,
    generalist: list[str] | None = None,
) -> dict:
    """A copy of `recipe` with some knobs changed: shared-merge and gate fields, calibration prompts per
    expert, reference answers on (True) or off (False), experts per token, and `generalist`: one more
    expert that is the base model itself, calibrated on these domains. None leaves a knob as it is."""
    out = json.loads(json.dumps(recipe))
    out["shared"].update(shared or {})
    out["gate"].update(gate or {})
    if top_k is not None:
        out["experts_per_token"] = top_k
    for expert in out["experts"]:
        for source in expert.get("data", []):
            if prompts is not None:
                source["limit"] = prompts
            if answers is True:
                source["response_field"] = "response"
            elif answers is False:
                source.pop("response_field", None)
    if prompts is not None:
        out["gate"]["max_prompts"] = prompts
    if generalist:
        data_dir = Path(out["experts"][0]["data"][0]["path"]).parent
        per_domain = -(-out["gate"]["max_prompts"] // len(generalist))
        template = {k: v for k, v in out["experts"][0]["data"][0].items() if k not in {"path", "limit"}}
        out["experts"].append(
            {
                "name": "generalist",
                "path": out["base"],
                "data": [
                    {**template, "path": str(data_dir / f"{d}.train.jsonl"), "limit": per_domain}
                    for d in generalist
                ],
            }
        )
    return out


SHARED_METHODS = (
    ("linear", "linear"),  # the BTX baseline: a plain average of the shared weights
    ("task arithmetic", "task_arithmetic"),
    ("TIES", "ties"),
    ("DARE-TIES", "dare_ties"),
)
GATES = ("ridge", "hidden", "arrow", "random")


def variants(
    zoo: Path, with_mergekit: bool, with_tuned: bool = True, full_experts: dict[str, Path] | None = None
) -> list[Variant]:
    """Table 1's merges: dense merges of the shared and FFN weights by each shared-weight method, and the
    MoE for every shared-weight method × gate initialisation ("MoE TIES + ridge gates" is the zoo's own
    recipe); mergekit-moe on the same experts, materialised (it reads no adapters)."""
    recipe = base_recipe(zoo)
    found = [
        *[
            Variant(f"dense {label}", "dense", varied_recipe(recipe, shared={"method": m}))
            for label, m in SHARED_METHODS
        ],
        *[
            Variant(
                f"MoE {label} + {gate} gates",
                "moe",
                varied_recipe(recipe, shared={"method": method}, gate={"init": gate}),
            )
            for label, method in SHARED_METHODS
            for gate in GATES
        ],
    ]
    if with_tuned:
        zoo_moe = "MoE TIES + ridge gates"
        found.append(
            Variant("MoE TIES + ridge + tuned gates", "moe", varied_recipe(recipe), tune_from=zoo_moe)
        )
    if with_mergekit:
        found.append(
            Variant(
                "mergekit-moe (hidden gates)",
                "moe",
                mergekit_config(recipe, paths=full_experts),
                mergekit=True,
            )
        )
    return found


def materialised(zoo: Path, work: Path, log) -> dict[str, Path]:
    """Each LoRA expert of the zoo as a full checkpoint (peft's merge_and_unload of a float32 base, saved
    in the base's dtype), for readers of full checkpoints only: mergekit-moe and the dense-expert rows.
    A full-checkpoint expert is returned as it is."""
    from merge.adapter import is_adapter

    out = {}
    for folder in sorted(p for p in (zoo / "experts").iterdir() if p.is_dir()):
        if not is_adapter(folder):
            out[folder.name] = folder
            continue
        target = work / "materialised" / folder.name
        stamp = target.parent / f"{folder.name}.sha256"
        key = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        if not (target.is_dir() and stamp.exists() and stamp.read_text() == key):
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log(f"materialising the adapter {folder.name}")
            shutil.rmtree(target, ignore_errors=True)
            base = AutoModelForCausalLM.from_pretrained(str(zoo / "base"), dtype=torch.float32)
            dtype = json.loads((zoo / "base" / "config.json").read_text()).get("dtype", "bfloat16")
            model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
            model.to(getattr(torch, dtype)).save_pretrained(str(target))
            AutoTokenizer.from_pretrained(str(zoo / "base")).save_pretrained(str(target))
            stamp.write_text(key)
        out[folder.name] = target
    return out


def mergekit_config(recipe: dict, prompts_per_expert: int = 16, paths: dict[str, Path] | None = None) -> dict:
    """mergekit-moe's config for the same base and experts (`paths`: expert name → a full checkpoint to
    read instead of the recipe's path), with the experts' first calibration prompts."""
    experts = []
    for expert in recipe["experts"]:
        prompts = list(expert.get("positive_prompts", []))
        for source in expert.get("data", []):
            with open(source["path"], encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    if all(str(row.get(k)) == str(v) for k, v in source.get("where", {}).items()):
                        prompts.append(row[source.get("field", "prompt")])
                    if len(prompts) >= prompts_per_expert:
                        break
        source = str((paths or {}).get(expert["name"], expert["path"]))
        experts.append({"source_model": source, "positive_prompts": prompts[:prompts_per_expert]})
    return {
        "base_model": recipe["base"],
        "gate_mode": "hidden",
        "dtype": recipe.get("dtype", "bfloat16"),
        "experts_per_token": recipe.get("experts_per_token", 1),
        "experts": experts,
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def digest(variant: Variant) -> str:
    """What a build is keyed by: its recipe and how it is made (results measured on it are keyed so too)."""
    spec = json.dumps(
        {"recipe": variant.recipe, "tune_from": variant.tune_from, "mergekit": variant.mergekit},
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()


def build(variant: Variant, work: Path, built: dict[str, Path], log) -> Path:
    """Build one variant unless an identical build is already there; return its folder."""
    out = work / "models" / slug(variant.name)
    key = digest(variant)
    stamp = out.parent / f"{out.name}.sha256"
    if out.is_dir() and stamp.exists() and stamp.read_text() == key:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_path = work / "recipes" / f"{out.name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(variant.recipe, sort_keys=False))
    moerge = str(Path(sys.executable).with_name("moerge"))
    if variant.mergekit:
        cmd = [str(ensure_mergekit()), str(recipe_path), str(out), "--device", "cpu"]
    elif variant.tune_from is not None:
        cmd = [moerge, "tune-gates", str(built[variant.tune_from]), str(out), "--recipe", str(recipe_path)]
    else:
        cmd = [moerge, "merge", str(recipe_path), str(out), *(["--dense"] if variant.kind == "dense" else [])]
    log(f"building {variant.name}: {' '.join(cmd)}")
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variant.name}: {' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    stamp.write_text(key)
    return out
