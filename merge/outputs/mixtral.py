"""Llama / Mistral experts → `MixtralForCausalLM` (vLLM's native Mixtral loader).

The loader wants one tensor per expert, `block_sparse_moe.experts.M.{w1,w2,w3}` (w1 = gate_proj,
w2 = down_proj, w3 = up_proj), and the router `block_sparse_moe.gate` [E, H]; no biases, no shared expert,
every layer an MoE layer. Routing: softmax over experts, top-k, renormalised.
"""

from __future__ import annotations

from typing import Any

from merge.outputs.base import MOE_DEFAULTS, ModelClass, MoEPlan, common_fields, moe_config

MIXTRAL_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def mixtral_config(dense: dict[str, Any], plan: MoEPlan) -> dict[str, Any]:
    """The dense model's shape with Mixtral's MoE fields: what transformers' MixtralConfig writes for them
    (tests/test_output_configs.py checks it field for field)."""
    head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
    return moe_config(
        "MixtralForCausalLM",
        "mixtral",
        plan.dtype,
        {
            **common_fields(dense),
            **MOE_DEFAULTS,
            "head_dim": head_dim,
            "sliding_window": dense.get("sliding_window"),
            "num_local_experts": plan.num_experts,
            "num_experts_per_tok": plan.experts_per_token,
            "router_jitter_noise": 0.0,
        },
    )


MIXTRAL = ModelClass(
    architecture="MixtralForCausalLM",
    is_moe=True,
    dense_inputs=("LlamaForCausalLM", "MistralForCausalLM"),
    block="block_sparse_moe",
    expert_proj=MIXTRAL_PROJ,
    experts_key="num_local_experts",
    expert_size_key="intermediate_size",
    build_config=mixtral_config,
)
