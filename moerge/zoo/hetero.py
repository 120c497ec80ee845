"""The heterogeneous expert: a small GPT-2 with its own tokenizer, trained from scratch for exact arithmetic.

Another architecture (GPT-2: learned positions, LayerNorm, GELU) and another tokenizer (byte-level BPE
trained here, digits always split one per token so numbers are read digit by digit) — nothing about it
can be merged with SmolLM2, so the router sends it the prompts it is good at. head_dim is 64 because
vLLM's CPU attention rejects smaller heads; the chat template makes vLLM's chat endpoint work.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moerge.zoo.arithmetic import exact_match
from moerge.zoo.config import HeteroStage
from moerge.zoo.lm import chat_prefix, collate, encode_rows, training_loss

END, USER, ASSISTANT, SYSTEM = "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
StepCallback = Callable[[int, int, float], None]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE over the training prompts; digits are pre-split so no merge spans two digits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END, SYSTEM, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, bos_token=END, pad_token=END)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def gpt2_config(spec: HeteroStage, tokenizer: Any) -> Any:
    from transformers import GPT2Config

    end = tokenizer.convert_tokens_to_ids(END)
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_embd // 64,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def train_hetero(
    rows: list[dict[str, Any]], out: Path, spec: HeteroStage, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Train the tokenizer and the model on `rows` and save both (safetensors) with a chat template."""
    from transformers import GenerationConfig, GPT2LMHeadModel

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer([r["prompt"] + " " + r["response"] for r in rows[:20000]], spec.vocab_size)
    model = GPT2LMHeadModel(gpt2_config(spec, tokenizer))
    order = list(rows)
    random.Random(spec.seed).shuffle(order)
    examples = encode_rows(tokenizer, order, spec.n_positions, None)
    if len(examples) < spec.batch_size:
        raise ValueError(f"hetero: only {len(examples)} rows fit in n_positions={spec.n_positions}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(100, spec.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    end = tokenizer.convert_tokens_to_ids(END)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(spec.steps):
        first = (step * spec.batch_size) % len(examples)
        batch = [examples[(first + i) % len(examples)] for i in range(spec.batch_size)]
        ids, mask, labels = collate(batch, end)
        final = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = training_loss(model, final, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, spec.steps, losses[-1])
    seconds = time.perf_counter() - started
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=end, pad_token_id=end)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    window = max(1, min(20, len(losses) // 4))
    return {
        "architecture": "GPT2LMHeadModel",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": spec.steps,
        "examples_seen": spec.steps * spec.batch_size,
        "train_seconds": round(seconds, 1),
        "loss_first": round(sum(losses[:window]) / window, 4),
        "loss_last": round(sum(losses[-window:]) / window, 4),
    }


@torch.inference_mode()
def greedy_replies(
    model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy chat replies with transformers (left-padded batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, trust_remote_code=False
    )
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    for begin in range(0, len(prompts), batch_size):
        texts = [chat_prefix(tokenizer, p) for p in prompts[begin : begin + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc.input_ids.shape[1] :]
        replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    return replies


def arithmetic_accuracy(model_dir: Path, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    replies = greedy_replies(model_dir, [r["prompt"] for r in rows], max_new_tokens)
    return {
        "exact_match": round(exact_match(replies, rows), 4),
        "rows": len(rows),
        "examples": [
            {"prompt": r["prompt"], "reply": t, "answer": r["answer"]}
            for r, t in zip(rows[:3], replies[:3], strict=True)
        ],
    }
