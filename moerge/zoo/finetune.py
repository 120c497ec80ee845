"""Dense SmolLM2 experts: fine-tune only the FFNs of the top decoder layers on one domain's train split.

Why this recipe: on a 2-core CPU a full fine-tune runs at ≈100 tokens/s, far too slow for a 15-minute
zoo. Training only the top layers' FFNs stops the backward pass at the lowest trained layer (the frozen
bottom runs without autograd), and the vocabulary projection is computed only on response tokens.
It also fits the MoE exactly: experts differ from the base only in FFN weights, which the MoE keeps per
expert, so its shared-weight merge is lossless. Trained weights stay fp32 under bf16 autocast.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moerge.zoo.config import FinetuneStage
from moerge.zoo.lm import (
    Example,
    collate,
    encode_rows,
    hidden_before,
    load_model,
    pad_id,
    suffix_hidden,
    training_loss,
)

StepCallback = Callable[[int, int, float], None]  # (step done, total, loss)


def plan_batches(examples: list[Example], batch_size: int, seed: int) -> list[list[Example]]:
    """Batches of similar length (less padding), in a seeded random order."""
    rng = random.Random(seed)
    chunk = batch_size * 16
    batches: list[list[Example]] = []
    for start in range(0, len(examples), chunk):
        group = sorted(examples[start : start + chunk], key=lambda e: len(e.ids))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune_expert(
    base_dir: Path,
    rows: list[dict[str, Any]],
    out: Path,
    spec: FinetuneStage,
    seed_offset: int = 0,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train a copy of the base on `rows` (prompt → response) and save it to `out` (bf16 safetensors)."""
    from transformers import AutoTokenizer, GenerationConfig

    torch.set_num_threads(spec.threads)
    seed = spec.seed + seed_offset
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = load_model(base_dir)
    stored = model.model.embed_tokens.weight.dtype
    layers = model.config.num_hidden_layers
    start = max(0, layers - spec.layers)
    order = list(rows)
    random.Random(seed).shuffle(order)
    examples = encode_rows(tokenizer, order, spec.max_tokens, spec.steps * spec.batch_size)
    if len(examples) < spec.batch_size:
        raise ValueError(
            f"only {len(examples)} training rows fit in finetune.max_tokens={spec.max_tokens}; "
            f"need at least batch_size={spec.batch_size}"
        )
    batches = plan_batches(examples, spec.batch_size, seed)
    while len(batches) < spec.steps:  # fewer rows than steps × batch: another epoch
        batches += plan_batches(examples, spec.batch_size, seed + len(batches))
    batches = batches[: spec.steps]

    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.model.layers[i].mlp for i in range(start, layers)]
    params = []
    for mlp in trained:
        mlp.float()
        for p in mlp.parameters():
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    pad = pad_id(tokenizer)
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    model.train()
    for step, batch in enumerate(batches):
        ids, mask, labels = collate(batch, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                hidden = hidden_before(model, [start], ids, mask, stop=True)[0][start] if start else None
            if hidden is None:
                final = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                final = suffix_hidden(model, start, hidden, mask)
            loss = training_loss(model, final, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        if on_step is not None:
            on_step(step + 1, len(batches), losses[-1])
    seconds = time.perf_counter() - started
    model.eval()
    for mlp in trained:
        mlp.to(stored)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (Path(base_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(out)
    window = max(1, min(10, len(losses) // 4))
    return {
        "trained_layers": list(range(start, layers)),
        "trained_parameters": sum(p.numel() for p in params),
        "steps": len(batches),
        "examples": len(examples),
        "tokens": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "loss_first": round(sum(losses[:window]) / window, 4),
        "loss_last": round(sum(losses[-window:]) / window, 4),
    }
