"""Qwen3 experts (per-head q/k RMSNorms) → `Qwen3MoeForCausalLM` (vLLM's `qwen3_moe.py`).

Per-expert tensors `mlp.experts.M.{gate,up,down}_proj`, router `mlp.gate` [E, H]; attention keeps
`self_attn.{q,k}_norm` and, with `attention_bias`, q/k/v biases (vLLM's o_proj has none, so an o_proj
bias is refused by the check). transformers' Qwen3MoeConfig has no shared expert, so moerge writes none.
Layers in `mlp_only_layers` keep one dense FFN; vLLM refuses a Qwen3-MoE with no MoE layer at all.
transformers stores `num_experts` as `num_local_experts` (its attribute_map); both are written.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3MoeConfig

from merge.outputs.base import ModelClass, MoEPlan, clean_config, common_fields


def qwen3_moe_config(dense: dict[str, Any], plan: MoEPlan) -> dict[str, Any]:
    fields = common_fields(dense)
    head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
    config = Qwen3MoeConfig(  # head_dim is no declared field of Qwen3MoeConfig; kept as an attribute
        **fields,
        **{"head_dim": head_dim},
        attention_bias=bool(dense.get("attention_bias", False)),
        use_sliding_window=bool(dense.get("use_sliding_window", False)),
        sliding_window=dense.get("sliding_window"),
        num_experts=plan.num_experts,
        num_experts_per_tok=plan.experts_per_token,
        moe_intermediate_size=dense["intermediate_size"],
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=list(plan.dense_layers),
    )
    out = clean_config(config.to_dict(), "Qwen3MoeForCausalLM", plan.dtype)
    out["num_experts"] = plan.num_experts
    return out


QWEN3_MOE = ModelClass(
    architecture="Qwen3MoeForCausalLM",
    is_moe=True,
    qk_norm=True,
    dense_inputs=("Qwen3ForCausalLM",),
    supports_dense_layers=True,
    needs_moe_layer=True,
    build_config=qwen3_moe_config,
)
