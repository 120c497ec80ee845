"""Quality measures of a merge: held-out perplexity per domain, and where each layer's gates send tokens."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def load_causal_lm(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int = 256, batch_size: int = 8) -> float:
    """Token-weighted perplexity of `texts` (each truncated to `max_tokens`)."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
        )
        logits = model(**enc).logits[:, :-1]
        targets = enc.input_ids[:, 1:]
        mask = enc.attention_mask[:, 1:].bool()
        nll = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))


@torch.inference_mode()
def routing_shares(
    model, tokenizer, prompts: dict[str, list[str]], max_tokens: int = 128
) -> list[dict[str, float]]:
    """Per layer: for each domain, the share of its tokens whose top-1 expert is the domain's own expert.

    `prompts` maps expert names, in the MoE's expert order, to held-out prompts of that expert's domain.
    """
    names = list(prompts)
    layers = model.config.num_hidden_layers
    hits = [dict.fromkeys(names, 0) for _ in range(layers)]
    counts = dict.fromkeys(names, 0)
    for index, name in enumerate(names):
        for text in prompts[name]:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
            out = model(**enc, output_router_logits=True)
            counts[name] += enc.input_ids.shape[1]
            for layer, logits in enumerate(out.router_logits):
                hits[layer][name] += int((logits.argmax(-1) == index).sum())
    return [{n: hits[layer][n] / max(counts[n], 1) for n in names} for layer in range(layers)]
