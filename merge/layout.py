"""Tensor names of the dense inputs, and the Mixtral names kept for callers that predate `merge/outputs/`.

Which output class a merge writes, and how it names tensors, lives in `merge/outputs/` (one module per class).
"""

from __future__ import annotations

import re
from typing import Any

from merge.outputs.base import MoEPlan
from merge.outputs.mixtral import MIXTRAL, MIXTRAL_PROJ

FFN_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LLAMA_PROJ = {v: k for k, v in MIXTRAL_PROJ.items()}


def is_ffn(name: str) -> bool:
    return FFN_PATTERN.match(name) is not None


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, the final norm and lm_head."""
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def in_layer_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.bias` → `self_attn.q_proj.bias` (the name inside its layer)."""
    return name.split(".", 3)[3]


def expert_name(layer: int, expert: int, proj: str) -> str:
    return MIXTRAL.expert_name(layer, expert, proj)


def gate_name(layer: int) -> str:
    return MIXTRAL.gate_name(layer)


def mixtral_config(
    dense: dict[str, Any], num_experts: int, experts_per_token: int, dtype: str
) -> dict[str, Any]:
    from merge.outputs.mixtral import mixtral_config as build

    return build(dense, MoEPlan(num_experts=num_experts, experts_per_token=experts_per_token, dtype=dtype))
