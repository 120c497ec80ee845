"""Each output class's config.json, written as data, is what transformers' own config class writes.

moerge builds the MoE configs without importing transformers' config classes (seconds of every merge); this
is the check that nothing is lost by that: the class's to_dict() for the same inputs, field for field.
"""

from __future__ import annotations

from typing import Any

import pytest
from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from merge.outputs import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from merge.outputs.base import ModelClass, MoEPlan, common_fields, rope_of

# Keys transformers adds to every config that describe no model (not written by moerge).
GENERIC_KEYS = {
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "is_encoder_decoder",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
}
BASE = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
DENSE_VARIANTS: dict[str, dict[str, Any]] = {
    "minimal": {},
    "head_dim": {"head_dim": 64, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama3_rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
    },
    "rope_parameters": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
    "legacy_rope": {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "longrope_top_level_length": {
        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32},
        "original_max_position_embeddings": 4096,
        "max_position_embeddings": 16384,
    },
    "partial_rotary": {"partial_rotary_factor": 0.5, "head_dim": 64},
    "sliding": {
        "use_sliding_window": True,
        "sliding_window": 4096,
        "max_window_layers": 2,
        "pad_token_id": 3,
    },
    "sliding_off": {"use_sliding_window": False, "sliding_window": 4096, "attention_bias": True},
    "no_kv_heads": {"num_key_value_heads": None, "hidden_act": "gelu", "eos_token_id": [0, 1]},
}
RAW_ROPE_KEYS = (
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "original_max_position_embeddings",
)
PLANS = {
    "plain": MoEPlan(num_experts=3, experts_per_token=2, dtype="bfloat16"),
    "dense_layers_shared": MoEPlan(
        num_experts=4,
        experts_per_token=1,
        dtype="float32",
        dense_layers=(0, 2),
        shared_expert_intermediate_size=256,
    ),
}


def clean(config: Any, architecture: str, dtype: str) -> dict[str, Any]:
    out = {k: v for k, v in config.to_dict().items() if k not in GENERIC_KEYS}
    out["architectures"] = [architecture]
    out["dtype"] = dtype
    return out


def reference(cls: ModelClass, dense: dict[str, Any], plan: MoEPlan) -> dict[str, Any]:
    """What the transformers class writes for the fields moerge sets, RoPE standardised by transformers
    from the dense config's own (raw) RoPE keys."""
    fields = {k: v for k, v in common_fields(dense).items() if k != "rope_parameters"}
    fields |= {k: v for k, v in dense.items() if k in RAW_ROPE_KEYS}
    # Without one, the dense model's theta is its own class's default (Llama's 10000), not the MoE class's.
    fields.setdefault("rope_theta", 10000.0)
    head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
    moe = {
        "num_experts_per_tok": plan.experts_per_token,
        "use_sliding_window": bool(dense.get("use_sliding_window", False)),
        "sliding_window": dense.get("sliding_window"),
        "moe_intermediate_size": dense["intermediate_size"],
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(plan.dense_layers),
    }
    if cls is MIXTRAL:
        config = MixtralConfig(
            **fields,
            head_dim=head_dim,
            sliding_window=dense.get("sliding_window"),
            num_local_experts=plan.num_experts,
            num_experts_per_tok=plan.experts_per_token,
        )
        return clean(config, "MixtralForCausalLM", plan.dtype)
    if cls is QWEN2_MOE:
        config = Qwen2MoeConfig(
            **fields,
            **moe,
            max_window_layers=dense.get("max_window_layers", fields["num_hidden_layers"]),
            num_experts=plan.num_experts,
            shared_expert_intermediate_size=plan.shared_expert_intermediate_size,
            qkv_bias=True,
        )
        out = clean(config, "Qwen2MoeForCausalLM", plan.dtype)
        out.pop("layer_types")
        return out
    config = Qwen3MoeConfig(
        **fields,
        **moe,
        head_dim=head_dim,
        attention_bias=bool(dense.get("attention_bias", False)),
        num_experts=plan.num_experts,
    )
    out = clean(config, "Qwen3MoeForCausalLM", plan.dtype)
    out["num_experts"] = plan.num_experts
    return out


@pytest.mark.parametrize("cls", [MIXTRAL, QWEN2_MOE, QWEN3_MOE], ids=lambda c: c.architecture)
@pytest.mark.parametrize("variant", sorted(DENSE_VARIANTS))
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_config_equals_transformers_class(cls: ModelClass, variant: str, plan: str) -> None:
    dense = {**BASE, **DENSE_VARIANTS[variant]}
    assert cls.build_config is not None
    written = cls.build_config(dense, PLANS[plan])
    assert written == reference(cls, dense, PLANS[plan])


@pytest.mark.parametrize("variant", sorted(DENSE_VARIANTS))
def test_rope_is_the_dense_models(variant: str) -> None:
    """The RoPE written is the one transformers gives the dense experts themselves."""
    dense = {**BASE, **DENSE_VARIANTS[variant]}
    assert rope_of(dense) == LlamaConfig.from_dict(dense).rope_parameters
