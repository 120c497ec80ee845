"""Qwen2-MoE and Qwen3-MoE outputs in a real vLLM CPU engine: native load, the dense reference's logits,
and the load-completeness rules checked against the parameters vLLM really builds.

One engine per checkpoint (each ~30-60 s on this machine), so the cases are chosen to cover top-1 and
top-2, with and without Qwen2's shared expert, dense (`mlp_only_layers`) layers, and a dense merge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from merge.build import merge_experts
from merge.completeness import check_checkpoint, expected_parameters
from merge.outputs import ALL_CLASSES
from merge.recipe import Recipe
from merge.tiny import TINY_DOMAINS, TinyFamily

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
# LLM.apply_model ships a function to the engine process (cloudpickle): needed to list its parameters.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
IDS = [5, 17, 42, 99, 7, 300, 12, 64, 3, 250, 31, 8]
TOP = 5  # logprobs compared per position
# (family, experts, recipe overrides, reference, dense merge)
CASES: dict[str, tuple[str, str, dict[str, Any], str, bool]] = {
    "qwen2-top1": ("qwen2", "base", {"experts_per_token": 1}, "base", False),
    "qwen2-top2-shared": (
        "qwen2",
        "base",
        {
            "experts_per_token": 2,
            "base": True,
            "shared": {"method": "ties"},
            "output": {"shared_expert": "base", "dense_unchanged_layers": False},
        },
        "base",
        False,
    ),
    "qwen2-top2-dense-layer": (
        "qwen2",
        "changed",
        {"experts_per_token": 2, "base": True, "shared": {"method": "ties"}},
        "changed",
        False,
    ),
    "qwen2-dense-merge": ("qwen2", "base", {}, "base", True),
    "qwen3-top1": ("qwen3", "base", {"experts_per_token": 1}, "base", False),
    "qwen3-top2-dense-layer": (
        "qwen3",
        "changed",
        {"experts_per_token": 2, "base": True, "shared": {"method": "ties"}},
        "changed",
        False,
    ),
    "qwen3-dense-merge": ("qwen3", "base", {}, "base", True),
}


def _recipe(fam: TinyFamily, experts: Path, overrides: dict[str, Any]) -> Recipe:
    raw: dict[str, Any] = {
        "experts": [
            {"name": d, "path": str(experts), "data": [{"path": str(fam.data[d]), "limit": 16}]}
            for d in TINY_DOMAINS
        ],
        "shared": {"method": "linear"},
        "dtype": "float32",
        **overrides,
    }
    if raw.pop("base", None):
        raw["base"] = str(fam.base)
    return Recipe.model_validate(raw)


def reference_logprobs(folder: Path) -> torch.Tensor:
    """log-softmax of the transformers model's logits at every position of IDS, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([IDS])).logits[0].float(), dim=-1)


def parameter_names(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, _ in model.named_parameters())


# In `make test`: both families, top-1 and top-2, the shared expert and dense layers. The rest (top-1
# Qwen2, dense merges: the plain Qwen2/Qwen3 classes vLLM loads anyway) with `-m slow`: an engine each.
SLOW = {"qwen2-top1", "qwen2-dense-merge", "qwen3-dense-merge"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_vllm_serves_the_dense_reference(
    case: str, tiny_families: dict[str, TinyFamily], tmp_path: Path
) -> None:
    from vllm import LLM, SamplingParams

    family, experts, overrides, reference, dense = CASES[case]
    fam = tiny_families[family]
    out = tmp_path / "out"
    report = merge_experts(_recipe(fam, getattr(fam, experts), overrides), out, dense=dense)
    config = json.loads((out / "config.json").read_text())
    cls = ALL_CLASSES[config["architectures"][0]]
    assert check_checkpoint(out).ok
    if "dense-layer" in case:
        assert report["dense_layers"] == [0]
    want = reference_logprobs(getattr(fam, reference))

    llm = LLM(model=str(out), enforce_eager=True, max_model_len=256, dtype="float32", seed=0)
    try:
        assert llm.llm_engine.model_config.hf_config.architectures == config["architectures"]
        params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=TOP, logprobs=TOP)
        result = llm.generate([{"prompt_token_ids": IDS}], params)[0]
        names = llm.apply_model(parameter_names)[0]
    finally:
        del llm

    # The class rules (merge/outputs/) name exactly the parameters vLLM builds for this config.
    assert set(names) == expected_parameters(cls, config), set(names) ^ expected_parameters(cls, config)
    assert result.prompt_logprobs is not None
    worst = 0.0
    for pos, scored in enumerate(result.prompt_logprobs[1:], start=1):
        assert scored is not None
        for token, logprob in scored.items():
            worst = max(worst, abs(logprob.logprob - float(want[pos - 1, token])))
    # float32 in both engines: vLLM's fused MoE vs transformers' dense FFN differ in summation order only.
    assert worst < 1e-3, (case, worst)
    first = result.outputs[0].token_ids[0]
    assert first == int(want[-1].argmax()), (case, first)
