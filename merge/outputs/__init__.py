"""Output architectures as data: one `ModelClass` per vLLM class moerge writes or checks.

A class says which dense inputs it takes, how its tensors are named, which config fields it needs, and how
vLLM 0.32's loader for it maps checkpoint names to parameters (`vllm_param`). From a config alone it can
list every tensor a complete checkpoint must hold (`expected_tensors`), which is what the load-completeness
check (`merge/completeness.py`) compares a checkpoint against, without starting vLLM.

Modules: `mixtral` (Llama/Mistral experts), `qwen2_moe` (Qwen2 experts), `qwen3_moe` (Qwen3 experts), and
`dense` (the dense classes themselves, for dense merges and for `moerge merge --check` on any checkpoint).
"""

from __future__ import annotations

from merge.outputs.base import ModelClass, MoEPlan
from merge.outputs.dense import DENSE_CLASSES
from merge.outputs.mixtral import MIXTRAL
from merge.outputs.qwen2_moe import QWEN2_MOE
from merge.outputs.qwen3_moe import QWEN3_MOE

MIXTRAL_CLASS, QWEN2_MOE_CLASS, QWEN3_MOE_CLASS = MIXTRAL, QWEN2_MOE, QWEN3_MOE
MOE_CLASSES: tuple[ModelClass, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
ALL_CLASSES: dict[str, ModelClass] = {c.architecture: c for c in (*MOE_CLASSES, *DENSE_CLASSES)}
SUPPORTED_INPUTS: tuple[str, ...] = tuple(a for c in MOE_CLASSES for a in c.dense_inputs)


def moe_class_for(dense_architecture: str) -> ModelClass:
    """The MoE class experts of `dense_architecture` are merged into; a clear error lists the supported ones."""
    for cls in MOE_CLASSES:
        if dense_architecture in cls.dense_inputs:
            return cls
    raise ValueError(
        f"architecture {dense_architecture} is not supported; supported: {', '.join(SUPPORTED_INPUTS)}"
    )


def dense_class_for(dense_architecture: str) -> ModelClass:
    cls = ALL_CLASSES.get(dense_architecture)
    if cls is None or cls.is_moe:
        raise ValueError(f"architecture {dense_architecture} is not a supported dense class")
    return cls


__all__ = [
    "ALL_CLASSES",
    "MIXTRAL_CLASS",
    "MOE_CLASSES",
    "QWEN2_MOE_CLASS",
    "QWEN3_MOE_CLASS",
    "SUPPORTED_INPUTS",
    "ModelClass",
    "MoEPlan",
    "dense_class_for",
    "moe_class_for",
]
