"""Qwen2 experts (q/k/v biases) → `Qwen2MoeForCausalLM` (vLLM's `qwen2_moe.py`).

Per-expert tensors `mlp.experts.M.{gate,up,down}_proj`, router `mlp.gate` [E, H]; attention keeps
Qwen2's q/k/v biases. Optionally a shared expert `mlp.shared_expert.{gate,up,down}_proj` whose output is
scaled by sigmoid(`mlp.shared_expert_gate` · x): vLLM builds `shared_expert_gate` [1, H] in every MoE layer
even without a shared expert (`shared_expert_intermediate_size: 0`), so moerge always writes it (zeros
there: nothing reads it). Layers listed in `mlp_only_layers` keep one dense `mlp.{gate,up,down}_proj`.
`norm_topk_prob: true` gives Mixtral's routing (softmax, top-k, renormalised), which the gates are fitted
for. vLLM's Qwen2-MoE attention derives head_dim as hidden_size / num_attention_heads.
"""

from __future__ import annotations

from typing import Any

from merge.outputs.base import MOE_DEFAULTS, ModelClass, MoEPlan, common_fields, moe_config, qwen_moe_fields


def qwen2_moe_config(dense: dict[str, Any], plan: MoEPlan) -> dict[str, Any]:
    """What transformers' Qwen2MoeConfig writes for these fields (checked by tests/test_output_configs.py),
    less `layer_types`: transformers derives it from use_sliding_window, and vLLM ignores it."""
    fields = common_fields(dense)
    moe = qwen_moe_fields(dense, plan)
    return moe_config(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        plan.dtype,
        {
            **fields,
            **MOE_DEFAULTS,
            **moe,
            # Qwen2MoeConfig's own rule: no window unless use_sliding_window.
            "sliding_window": dense.get("sliding_window") if moe["use_sliding_window"] else 0,
            "max_window_layers": dense.get("max_window_layers", fields["num_hidden_layers"]),
            "shared_expert_intermediate_size": plan.shared_expert_intermediate_size,
            "qkv_bias": True,
        },
    )


QWEN2_MOE = ModelClass(
    architecture="Qwen2MoeForCausalLM",
    is_moe=True,
    qkv_bias=True,
    head_dim_from_config=False,
    dense_inputs=("Qwen2ForCausalLM",),
    supports_shared_expert=True,
    shared_gate_always=True,
    supports_dense_layers=True,
    build_config=qwen2_moe_config,
)
