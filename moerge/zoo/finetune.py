"""Zoo experts: fine-tune the top decoder layers of the base on one domain's train split.

Two recipes (`finetune.kind`):
- `lora` (default): PEFT LoRA adapters (the `peft` library) on the attention projections (q, k, v, o)
  and the FFN (gate, up, down) of the top `layers` layers, saved in PEFT format. This is what most
  recycled experts look like: they change attention as well as FFNs, so the MoE's shared-weight merge
  (TIES, DARE, ...) has real interference to resolve, and the same adapters can be served unmerged as a
  LoRA family on one base engine.
- `ffn`: full fine-tunes of the top layers' FFNs only (the zoo's first recipe, kept for comparison):
  experts then differ from the base only where the MoE keeps one copy per expert, so the merge is lossless.

Why only the top layers: on a 2-core CPU a full fine-tune runs at ≈100 tokens/s, far too slow for a
15-minute zoo. The backward pass stops at the lowest trained layer (the frozen bottom runs without
autograd) and the vocabulary projection is computed only on response tokens. Trained weights are fp32
under bf16 autocast.
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
LORA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_FFN = ("gate_proj", "up_proj", "down_proj")


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


def training_batches(
    tokenizer: Any, rows: list[dict[str, Any]], spec: FinetuneStage, seed: int
) -> tuple[list[Example], list[list[Example]]]:
    """The encoded examples and exactly `spec.steps` batches of them (another epoch when rows run out)."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    examples = encode_rows(tokenizer, order, spec.max_tokens, spec.steps * spec.batch_size)
    if len(examples) < spec.batch_size:
        raise ValueError(
            f"only {len(examples)} training rows fit in finetune.max_tokens={spec.max_tokens}; "
            f"need at least batch_size={spec.batch_size}"
        )
    batches = plan_batches(examples, spec.batch_size, seed)
    while len(batches) < spec.steps:
        batches += plan_batches(examples, spec.batch_size, seed + len(batches))
    return examples, batches[: spec.steps]


def trainable_ffns(model: Any, start: int) -> list[torch.nn.Parameter]:
    """`ffn` recipe: the FFNs of layers [start:] in fp32, everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in model.model.layers[start:]:
        layer.mlp.float()
        for p in layer.mlp.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def attach_lora(model: Any, start: int, spec: FinetuneStage) -> tuple[Any, list[torch.nn.Parameter]]:
    """`lora` recipe: peft LoRA on attention + FFN projections of layers [start:]; (peft model, params)."""
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; it only scales by it
        lora_dropout=0.0,
        bias="none",
        target_modules=[*LORA_ATTENTION, *LORA_FFN] if spec.lora.attention else list(LORA_FFN),
        layers_to_transform=list(range(start, layers)),
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return peft_model, params


def learning_rate(spec: FinetuneStage) -> float:
    if spec.lr is not None:
        return spec.lr
    return spec.lora.lr if spec.kind == "lora" else 5e-4


def train_steps(
    model: Any,
    start: int,
    batches: list[list[Example]],
    params: list[torch.nn.Parameter],
    spec: FinetuneStage,
    pad: int,
    on_step: StepCallback | None,
) -> tuple[list[float], int]:
    """AdamW with warm-up and cosine decay to 10 %; the frozen bottom [0:start) runs without autograd."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate(spec), weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    tokens = 0
    model.train()
    for step, batch in enumerate(batches):
        ids, mask, labels = collate(batch, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if start:
                with torch.no_grad():
                    hidden = hidden_before(model, [start], ids, mask, stop=True)[0][start]
                final = suffix_hidden(model, start, hidden, mask)
            else:
                final = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
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
    model.eval()
    return losses, tokens


def finetune_expert(
    base_dir: Path,
    rows: list[dict[str, Any]],
    out: Path,
    spec: FinetuneStage,
    seed_offset: int = 0,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train an expert on `rows` (prompt → response) and save it to `out`: a PEFT adapter folder
    (`lora`, as published adapters are: no tokenizer) or a full bf16 checkpoint with tokenizer (`ffn`)."""
    from transformers import AutoTokenizer, GenerationConfig

    torch.set_num_threads(spec.threads)
    seed = spec.seed + seed_offset
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = load_model(base_dir)
    stored = model.model.embed_tokens.weight.dtype
    layers = model.config.num_hidden_layers
    start = max(0, layers - spec.layers)
    examples, batches = training_batches(tokenizer, rows, spec, seed)
    if spec.kind == "lora":
        peft_model, params = attach_lora(model, start, spec)
    else:
        params = trainable_ffns(model, start)
    started = time.perf_counter()
    losses, tokens = train_steps(model, start, batches, params, spec, pad_id(tokenizer), on_step)
    seconds = time.perf_counter() - started
    if spec.kind == "lora":
        peft_model.save_pretrained(out, safe_serialization=True)  # adapter_config.json + safetensors
    else:
        for layer in model.model.layers[start:]:
            layer.mlp.to(stored)
        model.save_pretrained(out, safe_serialization=True)
        if (Path(base_dir) / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    window = max(1, min(10, len(losses) // 4))
    return {
        "kind": spec.kind,
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
