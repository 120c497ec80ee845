"""Held-out NLL matrix: rows are models (base, dense experts, MoE variants), columns are domains.

The measure is the mean NLL per token of the reference `response` given the chat-formatted prompt
(for MMLU, which has no reference answer, the NLL of the prompt text), on the first `rows` held-out rows
of each domain that fit in `max_tokens`. Every model is scored on the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.zoo.config import EvalStage
from moerge.zoo.lm import (
    collate,
    encode_rows,
    first_differing_layer,
    hidden_before,
    load_expert,
    load_model,
    mean_nll,
    pad_id,
    scored_nll,
    set_experts_per_token,
    suffix_hidden,
)
from moerge.zoo.splits import read_rows

Tick = Callable[[int, int], None]


@dataclass
class Candidate:
    """A model scored against the base; `top_k` overrides a Mixtral's experts per token."""

    name: str
    path: Path
    top_k: int | None = None


@torch.inference_mode()
def nll_matrix(
    base_dir: Path,
    candidates: list[Candidate],
    heldout: dict[str, Path],
    spec: EvalStage,
    threads: int = 2,
    tick: Tick | None = None,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base = load_model(base_dir)
    layers = base.config.num_hidden_layers
    loaded: dict[Path, Any] = {}
    starts: dict[str, int] = {}
    for cand in candidates:
        if cand.path not in loaded:
            loaded[cand.path] = load_expert(cand.path, base_dir)
        starts[cand.name] = first_differing_layer(cand.path, base_dir, layers)
    wanted = sorted({s for s in starts.values() if 0 < s < layers})
    encoded = {
        d: encode_rows(tokenizer, read_rows(p), spec.max_tokens, spec.rows) for d, p in heldout.items()
    }
    total = sum((len(e) + spec.batch_size - 1) // spec.batch_size for e in encoded.values())
    sums: dict[str, dict[str, list[float]]] = {
        m: {d: [0.0, 0] for d in heldout} for m in ["base", *(c.name for c in candidates)]
    }
    pad = pad_id(tokenizer)
    done = 0
    for domain, examples in encoded.items():
        for begin in range(0, len(examples), spec.batch_size):
            ids, mask, labels = collate(examples[begin : begin + spec.batch_size], pad)
            captured, final = hidden_before(base, wanted, ids, mask, stop=False)
            assert final is not None  # stop=False: the whole forward ran
            nll, count = scored_nll(base, final, labels)
            sums["base"][domain][0] += nll
            sums["base"][domain][1] += count
            for cand in candidates:
                model, start = loaded[cand.path], starts[cand.name]
                if cand.top_k is not None:
                    set_experts_per_token(model, cand.top_k)
                if start >= layers:
                    out = final
                elif start == 0:
                    out = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                else:
                    out = suffix_hidden(model, start, captured[start], mask)
                nll, count = scored_nll(model, out, labels)
                sums[cand.name][domain][0] += nll
                sums[cand.name][domain][1] += count
            done += 1
            if tick is not None:
                tick(done, total)
    table = {m: {d: mean_nll(v[0], int(v[1])) for d, v in row.items()} for m, row in sums.items()}
    return {
        "measure": "mean NLL per reference-response token given the chat-formatted prompt "
        "(knowledge: NLL of the prompt text, MMLU has no reference answer)",
        "nll": table,
        "rows": {d: len(e) for d, e in encoded.items()},
        "tokens": {d: int(sums["base"][d][1]) for d in heldout},
        "first_differing_layer": starts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def improvement_summary(table: dict[str, dict[str, float]], own: dict[str, str]) -> dict[str, Any]:
    """For each expert: its own-domain NLL, the base's, and the relative change (negative is better)."""
    out = {}
    for expert, domain in own.items():
        if expert in table and domain in table["base"]:
            mine, base = table[expert][domain], table["base"][domain]
            out[expert] = {
                "domain": domain,
                "nll": mine,
                "base_nll": base,
                "change": round(mine / base - 1, 4),
            }
    return out
