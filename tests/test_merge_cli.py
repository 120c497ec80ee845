"""`moerge merge` and `moerge tune-gates` through the real command line, and the example recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge.evaluate import load_causal_lm, routing_shares
from merge.recipe import load_recipe
from merge.tiny import TINY_DOMAINS, TinyFamily, TinyZoo, domain_prompts
from moerge.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _write_recipe(zoo: TinyZoo, path: Path, **overrides) -> Path:
    raw = {
        "base": str(zoo.base),
        "experts": [
            {"name": d, "path": str(zoo.experts[d]), "data": [{"path": str(zoo.data[d]), "limit": 32}]}
            for d in TINY_DOMAINS
        ],
        "dtype": "float32",
        **overrides,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_explains_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("merge", "tune-gates", "router", "demo"):
        assert command in result.output
    merge_help = runner.invoke(app, ["merge", "--help"]).output
    assert "--dense" in merge_help and "--overwrite" in merge_help and "--check" in merge_help


def test_cli_merge_moe_and_dense(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    recipe = _write_recipe(tiny_zoo, tmp_path / "r.yaml")
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "moe")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["mode"] == "moe" and summary["gate_init"] == "ridge"
    again = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "moe")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    dense = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "dense"), "--dense"])
    assert dense.exit_code == 0, dense.output
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_cli_reports_recipe_errors_by_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experts: []\nshared: {method: nope}\n")
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "experts" in result.output and "shared.method" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_cheap_embed_gates_without_data(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    experts = [{"name": d, "path": str(tiny_zoo.experts[d])} for d in TINY_DOMAINS]
    recipe = _write_recipe(tiny_zoo, tmp_path / "r.yaml", experts=experts, gate={"init": "cheap_embed"})
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "moe")])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "gate.init=cheap_embed needs data or positive_prompts for every expert" in output
    assert "missing for: math, code, text" in output and "Traceback" not in output
    assert not (tmp_path / "moe").exists()


def test_tune_gates_improves_routing_of_random_gates(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    recipe = _write_recipe(tiny_zoo, tmp_path / "r.yaml", gate={"init": "random"})
    assert runner.invoke(app, ["merge", str(recipe), str(tmp_path / "moe")]).exit_code == 0
    result = runner.invoke(
        app,
        [
            "tune-gates",
            str(tmp_path / "moe"),
            str(tmp_path / "tuned"),
            "--recipe",
            str(recipe),
            "--steps",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    held_out = {d: domain_prompts(d, 10, seed=777) for d in TINY_DOMAINS}

    def mean_own_share(folder: Path) -> float:
        model, tok = load_causal_lm(folder)
        shares = routing_shares(model, tok, held_out)
        return sum(sum(s.values()) for s in shares) / (len(shares) * len(TINY_DOMAINS))

    before, after = mean_own_share(tmp_path / "moe"), mean_own_share(tmp_path / "tuned")
    assert after > before + 0.2, (before, after)
    report = json.loads((tmp_path / "tuned" / "merge-report.json").read_text())
    assert report["gate_tuning"]["steps"] == 40
    # only the gates changed
    a, _ = load_causal_lm(tmp_path / "moe")
    b, _ = load_causal_lm(tmp_path / "tuned")
    sa, sb = a.state_dict(), b.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed), changed


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("merge-*.yaml")), ids=lambda p: p.name)
def test_example_recipes_merge(
    example: Path, tiny_zoo: TinyZoo, tiny_families: dict[str, TinyFamily], tmp_path: Path
) -> None:
    """Every example recipe validates and, with the tiny zoo (or tiny Qwen2 family) where it expects it, merges."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny-zoo").symlink_to(tiny_zoo.root)
    (tmp_path / ".cache" / "tiny-qwen2").symlink_to(tiny_families["qwen2"].root)
    recipe = load_recipe(tmp_path / "examples" / example.name)
    result = runner.invoke(app, ["merge", str(tmp_path / "examples" / example.name), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists() and recipe.experts
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    check = runner.invoke(app, ["merge", "--check", str(tmp_path / "out")])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout[check.stdout.index("{") :])["architecture"] == summary["architecture"]
