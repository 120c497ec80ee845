"""The main job until the real demo zoo exists: tiny experts → MoE → real vLLM engine → answers.

Builds the tiny experts (cached under .cache/tiny-zoo), merges them with examples/merge-tiny.yaml,
loads the MoE with vLLM's native Mixtral loader and generates for one prompt per domain.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {"math": "If we compute 21 + 14 we get", "code": "def total_fn(items):", "text": "The quiet river"}


def run_demo(console: Console) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from merge.build import merge_experts
    from merge.recipe import load_recipe
    from merge.tiny import build_tiny_zoo

    console.rule("1. tiny homogeneous experts (cached)")
    zoo = build_tiny_zoo(ROOT / ".cache" / "tiny-zoo")
    console.print(f"base and experts {sorted(zoo.experts)} under {zoo.root}")
    console.rule("2. moerge merge examples/merge-tiny.yaml")
    out = ROOT / ".cache" / "tiny-moe"
    report = merge_experts(load_recipe(ROOT / "examples" / "merge-tiny.yaml"), out, overwrite=True)
    console.print(
        f"MoE of {report['num_experts']} experts in {report['seconds']} s, peak RSS {report['peak_rss_mib']} MiB; "
        f"share of each expert's calibration tokens routed to it: {report['mean_own_share']}"
    )
    console.rule("3. load in vLLM (native Mixtral loader) and generate")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out), enforce_eager=True, max_model_len=256, dtype="float32")
    outputs = llm.generate(list(PROMPTS.values()), SamplingParams(max_tokens=16, temperature=0.0))
    table = Table("domain", "prompt", "MoE continuation")
    for (domain, prompt), result in zip(PROMPTS.items(), outputs, strict=True):
        table.add_row(domain, prompt, result.outputs[0].text)
    console.print(table)
