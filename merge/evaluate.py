"""Quality measures of a merge: held-out perplexity per domain, and where each layer's gates send tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_causal_lm(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_tokens: int = 256,
    batch_size: int = 8,
) -> float:
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[str]],
    max_tokens: int = 128,
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


@dataclass(frozen=True)
class ReferenceScore:
    """Summed NLL (nats) of a reference text under a model, with its token and UTF-8 byte counts.

    Bytes make scores comparable across tokenizers (NLL per byte), tokens within one tokenizer.
    """

    nll: float
    tokens: int
    bytes: int


def _reference_ids(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_prompt_tokens: int, max_tokens: int
) -> tuple[list[int], int]:
    """Token ids of one scored example and how many leading ids are context (not scored).

    A row with a `response` is scored on the response given the chat-formatted prompt (the model sees what
    a chat client would send); a row without one is scored on its prompt as plain text.
    """
    response = row.get("response")
    if not response:
        ids = tokenizer(row["prompt"], add_special_tokens=False).input_ids[:max_tokens]
        return ids, 1
    if getattr(tokenizer, "chat_template", None):
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
    else:
        context = row["prompt"] + "\n"
    context_ids = tokenizer(context, add_special_tokens=False).input_ids[-max_prompt_tokens:]
    target_ids = tokenizer(response, add_special_tokens=False).input_ids[: max_tokens - len(context_ids)]
    return context_ids + target_ids, len(context_ids)


@torch.inference_mode()
def score_references(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    max_prompt_tokens: int = 192,
    max_tokens: int = 384,
    batch_size: int = 8,
) -> list[ReferenceScore]:
    """Per row, the NLL of its reference answer (or of its prompt when it has none); see `_reference_ids`.

    Callers that compare models with different tokenizers should cut responses to the same characters
    first, so every model scores the same text.
    """
    examples = [_reference_ids(tokenizer, row, max_prompt_tokens, max_tokens) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[ReferenceScore | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(examples[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            seq, context = examples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            scored[row, context : len(seq)] = True
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        mask = scored[:, 1:]
        for row, i in enumerate(batch):
            seq, context = examples[i]
            text = tokenizer.decode(seq[context:], skip_special_tokens=False)
            assert isinstance(text, str)  # one sequence decodes to one string
            scores[i] = ReferenceScore(
                float(nll[row][mask[row]].sum()), int(mask[row].sum()), len(text.encode("utf-8"))
            )
    return [s for s in scores if s is not None]


@torch.inference_mode()
def routing_load(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[str]],
    max_tokens: int = 128,
) -> torch.Tensor:
    """Top-1 routing counts as a tensor [layer, domain, expert] over the prompts of each domain.

    Domains are `prompts`' keys in order; a domain's own expert is the one at the same index when the MoE's
    experts were built in that order. Shares and unused experts both follow from these counts.
    """
    layers = model.config.num_hidden_layers
    experts = model.config.num_local_experts
    counts = torch.zeros((layers, len(prompts), experts))
    for d, texts in enumerate(prompts.values()):
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
            out = model(**enc, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                counts[layer, d] += torch.bincount(logits.argmax(-1).flatten(), minlength=experts).float()
    return counts
