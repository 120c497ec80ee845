"""`ModelClass`: what moerge knows about one vLLM model class, as data plus a few rules derived from it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
# vLLM 0.32 stacks these checkpoint tensors into one parameter (its `stacked_params_mapping` /
# `hf_to_vllm_mapper.orig_to_new_stacked`): q/k/v → qkv_proj, a dense FFN's gate/up → gate_up_proj.
STACKED = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj."),
    (".self_attn.k_proj.", ".self_attn.qkv_proj."),
    (".self_attn.v_proj.", ".self_attn.qkv_proj."),
    (".mlp.gate_proj.", ".mlp.gate_up_proj."),
    (".mlp.up_proj.", ".mlp.gate_up_proj."),
    (".shared_expert.gate_proj.", ".shared_expert.gate_up_proj."),
    (".shared_expert.up_proj.", ".shared_expert.gate_up_proj."),
)
EXPERT_TENSOR = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


@dataclass(frozen=True)
class MoEPlan:
    """The shape of one MoE output, decided by the merge."""

    num_experts: int
    experts_per_token: int
    dtype: str
    dense_layers: tuple[int, ...] = ()  # layers that keep one dense FFN (Qwen `mlp_only_layers`)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert


@dataclass(frozen=True)
class Dims:
    """The sizes a config implies, as vLLM's loader for the class reads them."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tie: bool


@dataclass(frozen=True)
class ModelClass:
    """One vLLM model class: its tensor names, config fields and loader rules.

    `expert_proj` maps a dense FFN projection to the per-expert tensor name (Mixtral: w1/w2/w3).
    """

    architecture: str
    is_moe: bool
    qkv_bias: bool = False  # q/k/v carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    head_dim_from_config: bool = True  # vLLM's Qwen2-MoE ignores `head_dim` and uses hidden / heads
    dense_inputs: tuple[str, ...] = ()
    block: str = "mlp"
    expert_proj: Mapping[str, str] = field(default_factory=lambda: {p: p for p in FFN_PROJS})
    experts_key: str = "num_experts"
    expert_size_key: str = "moe_intermediate_size"
    supports_shared_expert: bool = False
    shared_gate_always: bool = False  # the class has `shared_expert_gate` even without a shared expert
    supports_dense_layers: bool = False
    needs_moe_layer: bool = False  # vLLM refuses a model of this class with no MoE layer at all
    build_config: Callable[[dict[str, Any], MoEPlan], dict[str, Any]] | None = None

    # ---- names ----
    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert_proj[proj]}.weight"

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def shared_expert_name(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    @staticmethod
    def dense_ffn_name(layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.{proj}.weight"

    # ---- config ----
    def dims(self, config: Mapping[str, Any]) -> Dims:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = config.get("head_dim") if self.head_dim_from_config else None
        return Dims(
            vocab=int(config["vocab_size"]),
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            tie=bool(config.get("tie_word_embeddings", False)),
        )

    def moe_layers(self, config: Mapping[str, Any]) -> list[bool]:
        """Per layer: does vLLM build an MoE block there? (Qwen: `mlp_only_layers`, `decoder_sparse_step`.)"""
        layers = int(config["num_hidden_layers"])
        if not self.is_moe:
            return [False] * layers
        experts = int(config.get(self.experts_key) or 0)
        if self.experts_key == "num_experts" and not experts:
            experts = int(config.get("num_local_experts") or 0)  # Qwen3MoeConfig's attribute_map
        dense = set(config.get("mlp_only_layers") or []) if self.supports_dense_layers else set()
        step = int(config.get("decoder_sparse_step") or 1) if self.supports_dense_layers else 1
        return [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)]

    def num_experts(self, config: Mapping[str, Any]) -> int:
        value = config.get(self.experts_key)
        if value is None and self.experts_key == "num_experts":
            value = config.get("num_local_experts")
        return int(value or 0)

    def expected_tensors(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor (name → shape) a complete checkpoint of this class and config holds."""
        d = self.dims(config)
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (d.vocab, d.hidden)}
        out["model.norm.weight"] = (d.hidden,)
        if not d.tie:
            out["lm_head.weight"] = (d.vocab, d.hidden)
        moe = self.moe_layers(config)
        # Qwen3's q/k/v biases follow `attention_bias` (vLLM's Qwen3 o_proj never has one).
        bias = self.qkv_bias or (self.qk_norm and bool(config.get("attention_bias")))
        for layer in range(d.layers):
            p = f"model.layers.{layer}."
            out[p + "input_layernorm.weight"] = (d.hidden,)
            out[p + "post_attention_layernorm.weight"] = (d.hidden,)
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out[f"{p}self_attn.{proj}.weight"] = (rows, d.hidden)
                if bias:
                    out[f"{p}self_attn.{proj}.bias"] = (rows,)
            out[p + "self_attn.o_proj.weight"] = (d.hidden, q)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (d.head_dim,)
                out[p + "self_attn.k_norm.weight"] = (d.head_dim,)
            if moe[layer]:
                out.update(self._moe_tensors(config, layer, d))
            else:
                out.update(_ffn_tensors(partial(self.dense_ffn_name, layer), d, d.intermediate))
        return out

    def _moe_tensors(self, config: Mapping[str, Any], layer: int, d: Dims) -> dict[str, tuple[int, ...]]:
        experts, size = self.num_experts(config), int(config[self.expert_size_key])
        out: dict[str, tuple[int, ...]] = {self.gate_name(layer): (experts, d.hidden)}
        for e in range(experts):
            out.update(_ffn_tensors(partial(self.expert_name, layer, e), d, size))
        shared = int(config.get("shared_expert_intermediate_size") or 0) if self.supports_shared_expert else 0
        if shared > 0:
            out.update(_ffn_tensors(partial(self.shared_expert_name, layer), d, shared))
        if shared > 0 or self.shared_gate_always:
            out[self.shared_gate_name(layer)] = (1, d.hidden)
        return out

    # ---- vLLM's loader ----
    def vllm_param(self, name: str) -> str:
        """The vLLM parameter a checkpoint tensor is loaded into (vLLM 0.32's naming rules for this class).

        Per-expert tensors go into the layer's fused `experts.routed_experts.w13_weight` (gate and up:
        w1/w3) or `experts.routed_experts.w2_weight` (down) — vLLM 0.32's FusedMoEFactory keeps them in a
        `routed_experts` child; q/k/v and a dense FFN's gate/up are stacked.
        """
        match = EXPERT_TENSOR.match(name)
        if match and match.group("proj") in self.expert_proj.values():
            kind = "w2" if match.group("proj") == self.expert_proj["down_proj"] else "w13"
            return f"{match.group('prefix')}.routed_experts.{kind}_weight"
        for old, new in STACKED:
            if old in name:
                return name.replace(old, new)
        return name


def _ffn_tensors(name: Callable[[str], str], d: Dims, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        name("gate_proj"): (intermediate, d.hidden),
        name("up_proj"): (intermediate, d.hidden),
        name("down_proj"): (d.hidden, intermediate),
    }


# Fields every transformers MoE config class writes with these defaults (moerge does not train the model:
# initialisation, dropout and router losses are training settings, kept at the class defaults).
MOE_DEFAULTS: dict[str, Any] = {
    "initializer_range": 0.02,
    "use_cache": True,
    "attention_dropout": 0.0,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def qwen_moe_fields(dense: Mapping[str, Any], plan: MoEPlan) -> dict[str, Any]:
    """The MoE fields Qwen2-MoE and Qwen3-MoE share: every layer sparse but `mlp_only_layers`, each expert
    the dense FFN's size, Mixtral's routing (`norm_topk_prob`: softmax, top-k, renormalised)."""
    return {
        "use_sliding_window": bool(dense.get("use_sliding_window", False)),
        "decoder_sparse_step": 1,
        "moe_intermediate_size": dense["intermediate_size"],
        "num_experts_per_tok": plan.experts_per_token,
        "num_experts": plan.num_experts,
        "norm_topk_prob": True,
        "mlp_only_layers": list(plan.dense_layers),
    }


def moe_config(architecture: str, model_type: str, dtype: str, fields: dict[str, Any]) -> dict[str, Any]:
    """An output's config.json, written as data: transformers' config classes would fill the same fields,
    but importing any of them costs a merge seconds (their module pulls in generation and scikit-learn)."""
    return {"architectures": [architecture], "dtype": dtype, **fields, "model_type": model_type}


def rope_of(dense: Mapping[str, Any]) -> dict[str, Any]:
    """The dense model's RoPE settings in transformers 5's `rope_parameters` form, standardised the way its
    config classes do (`standardize_rope_params`: legacy `rope_scaling` and `type`, `rope_theta` and
    `partial_rotary_factor` moved in, the pretraining length for the scaled types). Not validated here: the
    experts' own configs carry these values, and vLLM validates them when it loads the output."""
    rope = dict(dense.get("rope_scaling") or dense.get("rope_parameters") or {})
    rope.setdefault("rope_theta", dense.get("rope_theta", 10000.0))
    if dense.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", dense["partial_rotary_factor"])
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        rope.setdefault("original_max_position_embeddings", dense.get("max_position_embeddings", 2048))
    return rope


def common_fields(dense: Mapping[str, Any]) -> dict[str, Any]:
    """Shape and token fields every output copies from its dense experts (RoPE keys kept at the top level
    where the experts have them, as transformers keeps them)."""
    top_level_rope = {
        k: dense[k] for k in ("partial_rotary_factor", "original_max_position_embeddings") if k in dense
    }
    return {
        "vocab_size": dense["vocab_size"],
        "hidden_size": dense["hidden_size"],
        "intermediate_size": dense["intermediate_size"],
        "num_hidden_layers": dense["num_hidden_layers"],
        "num_attention_heads": dense["num_attention_heads"],
        "num_key_value_heads": dense.get("num_key_value_heads") or dense["num_attention_heads"],
        "hidden_act": dense.get("hidden_act", "silu"),
        "max_position_embeddings": dense.get("max_position_embeddings", 2048),
        "rms_norm_eps": dense.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(dense.get("tie_word_embeddings", False)),
        "bos_token_id": dense.get("bos_token_id"),
        "eos_token_id": dense.get("eos_token_id"),
        "pad_token_id": dense.get("pad_token_id"),
        "rope_parameters": rope_of(dense),
        **top_level_rope,
    }
