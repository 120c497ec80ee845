"""Qwen2 and Qwen3 experts → Qwen2-MoE / Qwen3-MoE, checked in transformers (cheap; the vLLM side is
tests/test_merge_qwen_vllm.py), and the load-completeness check on good and broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from merge.build import merge_experts
from merge.calibration import CalibrationText, LayerwiseForward, tokenize_calibration
from merge.checkpoint import CheckpointError, DenseCheckpoint
from merge.completeness import check_checkpoint
from merge.recipe import Recipe, RecipeError
from merge.tiny import TINY_DOMAINS, TINY_FAMILIES, TinyFamily, TinyZoo
from merge.tokenizer import load_tokenizer
from moerge.cli import app

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 3, 250]])
MOE_CLASS = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
runner = CliRunner()


def family_recipe(fam: TinyFamily, experts: Path, **overrides: Any) -> Recipe:
    """Three experts, all the model at `experts`, each with its own domain's prompts."""
    raw: dict[str, Any] = {
        "experts": [
            {"name": d, "path": str(experts), "data": [{"path": str(fam.data[d]), "limit": 16}]}
            for d in TINY_DOMAINS
        ],
        "shared": {"method": "linear"},
        "dtype": "float32",
    }
    raw.update(overrides)
    return Recipe.model_validate(raw)


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(IDS).logits


def assert_same_logits(got: Path, want: Path) -> None:
    a, b = logits(got), logits(want)
    # float32 end to end: N identical experts with renormalised routing weights (summing to 1) give the
    # dense FFN up to rounding; the logits' spread is ~0.2, so a lost bias or norm shows far above this.
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def weight_names(folder: Path) -> set[str]:
    return set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_identical_experts_give_the_dense_base(
    tiny_families: dict[str, TinyFamily], tmp_path: Path, family: str, top_k: int
) -> None:
    from transformers import AutoModelForCausalLM

    fam = tiny_families[family]
    out = tmp_path / "moe"
    report = merge_experts(family_recipe(fam, fam.base, experts_per_token=top_k), out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [MOE_CLASS[family]] == [report["architecture"]]
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == top_k
    assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == []
    assert config["moe_intermediate_size"] == 256 and config["decoder_sparse_step"] == 1
    assert report["load_check"]["complete"] and report["load_check"]["moe_layers"] == [0, 1]
    names = weight_names(out)
    for e in range(3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in names
    assert not any(".mlp.gate_proj." in n for n in names), "no dense FFN left in MoE layers"
    if family == "qwen2":
        assert config["shared_expert_intermediate_size"] == 0
        assert "model.layers.0.self_attn.q_proj.bias" in names
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names  # vLLM builds it in every MoE layer
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in names
    _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    # transformers' Qwen2-MoE always builds a shared expert; with size 0 its projections are empty.
    assert all(".shared_expert." in k for k in info["missing_keys"]), info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_logits(out, fam.base)


def test_base_as_shared_expert_keeps_the_base(tiny_families: dict[str, TinyFamily], tmp_path: Path) -> None:
    """Shared expert = the base's FFN, gate 0 (sigmoid 1/2): each token gets (1-β)·experts + β·base."""
    fam = tiny_families["qwen2"]
    out = tmp_path / "shared"
    recipe = family_recipe(
        fam,
        fam.base,
        base=str(fam.base),
        shared={"method": "ties"},
        experts_per_token=2,
        output={"shared_expert": "base", "shared_expert_weight": 0.25, "dense_unchanged_layers": False},
    )
    report = merge_experts(recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 256 and report["shared_expert"] == "base"
    tensors = load_file(str(out / "model-00001.safetensors"))
    base = load_file(str(fam.base / "model.safetensors"))
    down = base["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(tensors["model.layers.1.mlp.shared_expert_gate.weight"], torch.zeros(1, 128))
    assert torch.allclose(tensors["model.layers.1.mlp.shared_expert.down_proj.weight"], down * 0.5)
    assert torch.allclose(tensors["model.layers.1.mlp.experts.2.down_proj.weight"], down * 0.75)
    assert_same_logits(out, fam.base)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layers_where_experts_equal_the_base_stay_dense(
    tiny_families: dict[str, TinyFamily], tmp_path: Path, family: str
) -> None:
    fam = tiny_families[family]
    out = tmp_path / "moe"
    recipe = family_recipe(
        fam, fam.changed, base=str(fam.base), shared={"method": "ties"}, experts_per_token=2
    )
    report = merge_experts(recipe, out)
    assert report["dense_layers"] == [0] and len(report["gate_stats"]) == 1
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [0]
    names = weight_names(out)
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in names
    assert_same_logits(out, fam.changed)


def test_an_moe_with_nothing_to_route_is_refused(
    tiny_families: dict[str, TinyFamily], tmp_path: Path
) -> None:
    fam = tiny_families["qwen3"]
    recipe = family_recipe(fam, fam.base, base=str(fam.base), shared={"method": "ties"})
    with pytest.raises(RecipeError, match="every layer's expert FFNs equal the base's"):
        merge_experts(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_merge_of_identical_experts_is_the_base(
    tiny_families: dict[str, TinyFamily], tmp_path: Path, family: str
) -> None:
    fam = tiny_families[family]
    report = merge_experts(family_recipe(fam, fam.base), tmp_path / "dense", dense=True)
    assert report["load_check"]["complete"]
    assert report["architecture"] == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert_same_logits(tmp_path / "dense", fam.base)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_calibration_forward_is_the_models_forward(tiny_families: dict[str, TinyFamily], family: str) -> None:
    """The layer-by-layer pass that fits the gates sees the hidden states transformers computes (biases,
    q/k norms included): else the gates would be fitted on states the served model never produces."""
    from transformers import AutoModelForCausalLM

    fam = tiny_families[family]
    ckpt = DenseCheckpoint.open("base", fam.base)
    tok = load_tokenizer(fam.base)
    texts = [CalibrationText(p) for p in ("If we compute 3 + 4 we get 7.", "def f(x):\n    return x")]
    cal = tokenize_calibration(tok, list(enumerate(texts)), 32, use_chat_template=True)
    forward = LayerwiseForward(ckpt.config, cal, torch.float32)
    forward.embed(ckpt.tensor("model.embed_tokens.weight"))
    model = AutoModelForCausalLM.from_pretrained(str(fam.base), dtype=torch.float32).eval()
    with torch.inference_mode():
        states = model(cal.input_ids, attention_mask=cal.mask.long(), output_hidden_states=True).hidden_states
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        shared = {n[len(prefix) :]: ckpt.tensor(n) for n in ckpt.weight_map if n.startswith(prefix)}
        forward.attention(shared)
        forward.dense({p: shared[f"mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")})
        if layer == 0:
            assert forward.hidden is not None
            got, want = forward.hidden[cal.mask], states[1][cal.mask]
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_shared_expert_needs_a_class_that_has_one(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    raw = {
        "base": str(tiny_zoo.base),
        "experts": [{"name": d, "path": str(tiny_zoo.experts[d])} for d in TINY_DOMAINS],
        "gate": {"init": "uniform"},
        "output": {"shared_expert": "base"},
    }
    with pytest.raises(RecipeError, match="MixtralForCausalLM .* has no shared expert"):
        merge_experts(Recipe.model_validate(raw), tmp_path / "out")
    with pytest.raises(ValueError, match="output.shared_expert=base needs `base`"):
        Recipe.model_validate({**raw, "base": None, "shared": {"method": "linear"}})


def test_qwen3_with_attention_bias_is_refused(tiny_families: dict[str, TinyFamily], tmp_path: Path) -> None:
    broken = tmp_path / "biased"
    shutil.copytree(tiny_families["qwen3"].base, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(CheckpointError, match="attention_bias=true; vLLM's Qwen3-MoE has no o_proj bias"):
        DenseCheckpoint.open("biased", broken)


# ---- the load-completeness check ----


@pytest.fixture(scope="module")
def qwen2_moe(tiny_families: dict[str, TinyFamily], tmp_path_factory: pytest.TempPathFactory) -> Path:
    fam = tiny_families["qwen2"]
    out = tmp_path_factory.mktemp("check") / "moe"
    merge_experts(family_recipe(fam, fam.changed, base=str(fam.base), shared={"method": "ties"}), out)
    return out


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    """Copy a one-shard checkpoint, editing its tensors (and dropping the index, rebuilt from the shard)."""
    shutil.copytree(src, dst)
    shard = dst / "model-00001.safetensors"
    tensors = edit(load_file(str(shard)))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(tensors), shard.name)}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_check_passes_every_written_and_input_checkpoint(
    qwen2_moe: Path, tiny_families: dict[str, TinyFamily], tiny_zoo: TinyZoo
) -> None:
    for folder in (qwen2_moe, tiny_families["qwen3"].base, tiny_families["qwen2"].base, tiny_zoo.base):
        result = check_checkpoint(folder)
        assert result.ok, (folder, result.problems)


def test_check_names_the_unloaded_parameter(qwen2_moe: Path, tmp_path: Path) -> None:
    def drop(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        del t["model.layers.1.self_attn.k_proj.bias"], t["model.layers.1.mlp.experts.0.up_proj.weight"]
        return t

    problems = check_checkpoint(_rewrite(qwen2_moe, tmp_path / "x", drop)).problems
    assert problems == [
        "parameter model.layers.1.mlp.experts.routed_experts.w13_weight not (fully) loaded: "
        "no tensor model.layers.1.mlp.experts.0.up_proj.weight",
        "parameter model.layers.1.self_attn.qkv_proj.bias not (fully) loaded: "
        "no tensor model.layers.1.self_attn.k_proj.bias",
    ]


def test_check_refuses_a_fused_layout_and_says_why(qwen2_moe: Path, tmp_path: Path) -> None:
    def fuse(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = "model.layers.1.mlp.experts."
        gate_up = [
            torch.cat([t.pop(f"{p}{e}.gate_proj.weight"), t.pop(f"{p}{e}.up_proj.weight")]) for e in range(3)
        ]
        t[p + "gate_up_proj"] = torch.stack(gate_up)
        t[p + "down_proj"] = torch.stack([t.pop(f"{p}{e}.down_proj.weight") for e in range(3)])
        return t

    problems = check_checkpoint(_rewrite(qwen2_moe, tmp_path / "fused", fuse)).problems
    assert problems[0].startswith("fused expert tensors (one [E, ...] tensor for all experts")
    assert "model.layers.1.mlp.experts.gate_up_proj" in problems[0]
    assert any(
        "not (fully) loaded: no tensor model.layers.1.mlp.experts.0.gate_proj.weight" in p for p in problems
    )


def test_check_catches_a_transposed_gate_and_a_stray_tensor(qwen2_moe: Path, tmp_path: Path) -> None:
    def mangle(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t["model.layers.1.mlp.gate.weight"] = t["model.layers.1.mlp.gate.weight"].T.contiguous()
        t["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(256, 128)  # layer 0 is dense
        return t

    problems = check_checkpoint(_rewrite(qwen2_moe, tmp_path / "m", mangle)).problems
    assert problems == [
        "model.layers.0.mlp.experts.0.gate_proj.weight: not mapped by Qwen2MoeForCausalLM's loader with this "
        "config (no parameter model.layers.0.mlp.experts.routed_experts.w13_weight)",
        "model.layers.1.mlp.gate.weight: shape [128, 3], Qwen2MoeForCausalLM with this config expects [3, 128]",
    ]


def test_cli_check(qwen2_moe: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["merge", "--check", str(qwen2_moe)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["complete"] and summary["architecture"] == "Qwen2MoeForCausalLM"
    assert summary["dense_layers"] == [0] and summary["moe_layers"] == [1]

    def drop(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        del t["model.norm.weight"]
        return t

    broken = runner.invoke(app, ["merge", "--check", str(_rewrite(qwen2_moe, tmp_path / "b", drop))])
    assert broken.exit_code == 1
    assert "would not load completely" in broken.output and "no tensor model.norm.weight" in broken.output
