"""The dense classes moerge merges from (and writes for `--dense`), for the load-completeness check.

vLLM's Llama/Mistral/Qwen2/Qwen3 loaders stack q/k/v into qkv_proj and gate/up into gate_up_proj. Qwen2
always has q/k/v biases; Qwen3 has per-head q/k norms (and q/k/v biases with `attention_bias`).
"""

from __future__ import annotations

from merge.outputs.base import ModelClass

LLAMA = ModelClass(architecture="LlamaForCausalLM", is_moe=False)
MISTRAL = ModelClass(architecture="MistralForCausalLM", is_moe=False)
QWEN2 = ModelClass(architecture="Qwen2ForCausalLM", is_moe=False, qkv_bias=True, head_dim_from_config=False)
QWEN3 = ModelClass(architecture="Qwen3ForCausalLM", is_moe=False, qk_norm=True)
DENSE_CLASSES: tuple[ModelClass, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)
