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


# The gate calibration the zoo used until 2026-11-23: 64 prompts per expert, no answers, ridge λ 0.001.
OLD_GATE = {"ridge_lambda": 0.001}
DENSE_METHODS = (("linear", "linear"), ("TIES", "ties"), ("DARE-TIES", "dare_ties"))


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


def variants(zoo: Path, with_mergekit: bool, with_tuned: bool = True) -> list[Variant]:
    """Table 1's merges. "MoE ridge gates" is the zoo's own recipe; each other row changes one thing."""
    recipe = base_recipe(zoo)

    def vary(gate: dict | None = None, prompts: int | None = None) -> dict:
        return varied_recipe(recipe, gate=gate, prompts=prompts)

    def old(shared: dict | None = None, gate: dict | None = None, prompts: int = 64) -> dict:
        """The zoo's earlier calibration (prompts only, λ 0.001), with `shared`, `gate`, `prompts` changed."""
        return varied_recipe(
            recipe, shared=shared, gate={**OLD_GATE, **(gate or {})}, prompts=prompts, answers=False
        )

    found = [
        # Dense merges and random or uniform gates read no calibration data, so the calibration they
        # are built with does not matter: they keep the earlier one, and with it their cached builds.
        *[Variant(f"dense {label}", "dense", old({"method": m})) for label, m in DENSE_METHODS],
        *[Variant(f"MoE {g} gates", "moe", old(gate={"init": g})) for g in ("random", "uniform")],
        Variant("MoE hidden gates", "moe", vary(gate={"init": "hidden"})),
        Variant("MoE ridge gates", "moe", vary(gate={"init": "ridge"})),
        Variant("MoE ridge gates, 64 prompts + answers", "moe", vary(gate={"init": "ridge"}, prompts=64)),
        *[
            Variant(f"MoE ridge gates, {n} prompts, λ 0.001", "moe", old(gate={"init": "ridge"}, prompts=n))
            for n in (64, 256, 1024)
        ],
        Variant(  # as many prompts, a quarter of the tokens each
            "MoE ridge gates, 1024 prompts × 32 tokens, λ 0.001",
            "moe",
            old(gate={"init": "ridge", "max_tokens": 32}, prompts=1024),
        ),
    ]
    if with_tuned:
        found.append(
            Variant(
                "MoE ridge + tuned gates", "moe", vary(gate={"init": "ridge"}), tune_from="MoE ridge gates"
            )
        )
    if with_mergekit:
        found.append(Variant("mergekit-moe (hidden gates)", "moe", mergekit_config(recipe), mergekit=True))
    return found


def mergekit_config(recipe: dict, prompts_per_expert: int = 16) -> dict:
    """mergekit-moe's config for the same base and experts, with the experts' first calibration prompts."""
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
        experts.append({"source_model": expert["path"], "positive_prompts": prompts[:prompts_per_expert]})
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
