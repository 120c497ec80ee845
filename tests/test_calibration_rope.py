"""The calibration forward's RoPE equals transformers' LlamaRotaryEmbedding for every RoPE type a Llama,
Mistral, Qwen2 or Qwen3 checkpoint uses (it is computed without importing the modelling code)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from merge.calibration import rope_cos_sin

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-qwen": {"rope_type": "default", "rope_theta": 1000000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("length", [7, 300])
def test_rope_equals_transformers(name: str, length: int) -> None:
    dense = {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_parameters": dict(ROPES[name]),
    }
    want = LlamaRotaryEmbedding(LlamaConfig(**copy.deepcopy(dense)))(
        torch.zeros(1, 1, 64), torch.arange(length).unsqueeze(0)
    )
    got = rope_cos_sin(dense, 64, length)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (1, length, 64)
        assert torch.equal(g, w)


def test_merge_build_does_not_import_the_modelling_code() -> None:
    """Importing the merge engine stays light: no modeling_llama (and with it generation, scikit-learn)."""
    code = "import sys, merge.build; print('transformers.models.llama.modeling_llama' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
