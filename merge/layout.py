"""Tensor names and config of the output: Llama/Mistral dense names → vLLM's native Mixtral layout.

vLLM's Mixtral loader wants one tensor per expert (`block_sparse_moe.experts.M.{w1,w2,w3}`), not the
fused layout transformers 5 writes, so moerge names every tensor itself.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import MixtralConfig

FFN_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# Mixtral's names for Llama's FFN projections: w1 = gate_proj, w2 = down_proj, w3 = up_proj.
MIXTRAL_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LLAMA_PROJ = {v: k for k, v in MIXTRAL_PROJ.items()}


def is_ffn(name: str) -> bool:
    return FFN_PATTERN.match(name) is not None


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, the final norm and lm_head."""
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_PROJ[proj]}.weight"


def gate_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def mixtral_config(
    dense: dict[str, Any], num_experts: int, experts_per_token: int, dtype: str
) -> dict[str, Any]:
    """The output config: the dense model's shape with MoE fields, validated by transformers' MixtralConfig."""
    head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
    rope = dense.get("rope_parameters") or {
        "rope_type": "default",
        "rope_theta": dense.get("rope_theta", 10000.0),
        **(dense.get("rope_scaling") or {}),
    }
    config = MixtralConfig(
        vocab_size=dense["vocab_size"],
        hidden_size=dense["hidden_size"],
        intermediate_size=dense["intermediate_size"],
        num_hidden_layers=dense["num_hidden_layers"],
        num_attention_heads=dense["num_attention_heads"],
        num_key_value_heads=dense.get("num_key_value_heads", dense["num_attention_heads"]),
        head_dim=head_dim,
        hidden_act=dense.get("hidden_act", "silu"),
        max_position_embeddings=dense.get("max_position_embeddings", 2048),
        rms_norm_eps=dense.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(dense.get("tie_word_embeddings", False)),
        bos_token_id=dense.get("bos_token_id"),
        eos_token_id=dense.get("eos_token_id"),
        pad_token_id=dense.get("pad_token_id"),
        sliding_window=dense.get("sliding_window"),
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        rope_parameters=rope,
    )
    out = config.to_dict()
    for generic in (
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "output_hidden_states",
        "return_dict",
        "is_encoder_decoder",
        "transformers_version",
    ):
        out.pop(generic, None)
    out["architectures"] = ["MixtralForCausalLM"]
    out["dtype"] = dtype
    return out
