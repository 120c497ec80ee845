"""Qwen3 experts (per-head q/k RMSNorms) → `Qwen3MoeForCausalLM` (vLLM's `qwen3_moe.py`).

Per-expert tensors `mlp.experts.M.{gate,up,down}_proj`, router `mlp.gate` [E, H]; attention keeps
`self_attn.{q,k}_norm` and, with `attention_bias`, q/k/v biases (vLLM's o_proj has none, so an o_proj
bias is refused by the check). transformers' Qwen3MoeConfig has no shared expert, so moerge writes none.
Layers in `mlp_only_layers` keep one dense FFN; vLLM refuses a Qwen3-MoE with no MoE layer at all.
transformers stores `num_experts` as `num_local_experts` (its attribute_map); both are written.
"""

from __future__ import annotations

from typing import Any

from merge.outputs.base import MOE_DEFAULTS, ModelClass, MoEPlan, common_fields, moe_config, qwen_moe_fields


def qwen3_moe_config(dense: dict[str, Any], plan: MoEPlan) -> dict[str, Any]:
    """What transformers' Qwen3MoeConfig writes for these fields (checked by tests/test_output_configs.py),
    with `num_experts` beside its `num_local_experts` and `head_dim`, which it keeps as an attribute."""
    head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
    moe = qwen_moe_fields(dense, plan)
    return moe_config(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        plan.dtype,
        {
            **common_fields(dense),
            **MOE_DEFAULTS,
            **moe,
            "head_dim": head_dim,
            "attention_bias": bool(dense.get("attention_bias", False)),
            # Qwen3MoeConfig's own rule: no window unless use_sliding_window.
            "sliding_window": dense.get("sliding_window") if moe["use_sliding_window"] else None,
            "num_local_experts": plan.num_experts,
        },
    )


QWEN3_MOE = ModelClass(
    architecture="Qwen3MoeForCausalLM",
    is_moe=True,
    qk_norm=True,
    dense_inputs=("Qwen3ForCausalLM",),
    supports_dense_layers=True,
    needs_moe_layer=True,
    build_config=qwen3_moe_config,
)
