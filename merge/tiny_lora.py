"""Tiny real PEFT LoRA adapters of a tiny base, made by the `peft` library, for tests and benchmarks.

Each adapter is trained briefly on one domain's synthetic sentences (merge/tiny.py), so its lora_B is
non-zero and its greedy output differs from the base's. Saved with peft's own `save_pretrained`
(adapter_config.json + adapter_model.safetensors), exactly what a user's adapter folder looks like.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from merge.tiny import domain_prompts

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_adapters(
    base: Path,
    out: Path,
    domains: dict[str, str],
    *,
    rank: int = 8,
    alpha: int = 16,
    steps: int = 30,
    seed: int = 0,
) -> dict[str, Path]:
    """One adapter per `name → domain` under `out/NAME` (reused when already built)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    paths = {name: Path(out) / name for name in domains}
    if all((p / "adapter_model.safetensors").is_file() for p in paths.values()):
        return paths
    tok = AutoTokenizer.from_pretrained(base)
    for i, (name, domain) in enumerate(domains.items()):
        path = paths[name]
        if (path / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(seed + i)
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        texts = domain_prompts(domain, 200, seed=seed + 7 + i)
        peft_model.train()
        for step in range(steps):
            batch = [texts[(step * 16 + j) % len(texts)] for j in range(16)]
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=64)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = peft_model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp))
        (tmp / "moerge_tiny.json").write_text(json.dumps({"domain": domain, "steps": steps}))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return paths
