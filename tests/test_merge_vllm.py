"""The merged MoE loads in a real vLLM CPU engine (native Mixtral loader) and generates what transformers does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from merge.build import merge_experts
from merge.completeness import expected_parameters
from merge.outputs import MIXTRAL_CLASS
from merge.recipe import Recipe
from merge.tiny import TINY_DOMAINS, TinyZoo

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
PROMPTS = ["If we compute 12 + 5 we get", "def total_fn(x):", "The old river"]
# LLM.apply_model ships a function to the engine process (cloudpickle): needed to list its parameters.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def parameter_names(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, _ in model.named_parameters())


@pytest.fixture(scope="module")
def moe_for_vllm(tiny_zoo: TinyZoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm-moe") / "moe"
    recipe = Recipe.model_validate(
        {
            "base": str(tiny_zoo.base),
            "experts": [
                {
                    "name": d,
                    "path": str(tiny_zoo.experts[d]),
                    "data": [{"path": str(tiny_zoo.data[d]), "limit": 32}],
                }
                for d in TINY_DOMAINS
            ],
            "experts_per_token": 2,
            "dtype": "float32",
        }
    )
    merge_experts(recipe, out)
    return out


def test_vllm_loads_moe_natively_and_matches_transformers(moe_for_vllm: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(moe_for_vllm), enforce_eager=True, max_model_len=256, dtype="float32", seed=0)
    try:
        arch = llm.llm_engine.model_config.hf_config.architectures
        assert arch == ["MixtralForCausalLM"]
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
        chat = llm.chat(
            [{"role": "user", "content": "What is 3 + 4?"}], SamplingParams(max_tokens=6, temperature=0.0)
        )
        names = llm.apply_model(parameter_names)[0]
    finally:
        del llm
    # The load-completeness rules for Mixtral name exactly the parameters vLLM builds.
    config = json.loads((moe_for_vllm / "config.json").read_text())
    assert set(names) == expected_parameters(MIXTRAL_CLASS, config)
    assert chat[0].outputs[0].token_ids, "chat through the copied chat template produced nothing"
    model = AutoModelForCausalLM.from_pretrained(str(moe_for_vllm), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(moe_for_vllm))
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        got = list(out.outputs[0].token_ids)
        # Greedy decoding of the same float32 weights: vLLM's fused MoE must read w1/w2/w3 and the gate
        # as transformers does. Allow a late divergence on a near-tie, not an early one.
        assert got[:4] == want[:4], (prompt, got, want)
