"""Language-model helpers shared by fine-tuning and evaluation: chat encoding, batches, split forwards.

Experts differ from the base only in their top layers (FFN-only fine-tunes or LoRA adapters of those
layers), and the MoE's lower layers equal the base's. So the base's hidden state at the first differing
layer is computed once and every other model runs only its own top layers from there (`suffix_logits`): the numbers are those of a
full forward (same weights, same inputs), at a fraction of the cost on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from merge.adapter import ADAPTER_WEIGHTS, is_adapter
from merge.layout import LLAMA_PROJ


@dataclass(frozen=True)
class Example:
    """Token ids and the positions scored (labels; -100 elsewhere)."""

    ids: list[int]
    labels: list[int]


def chat_prefix(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_example(tokenizer: Any, row: dict[str, Any], max_tokens: int) -> Example | None:
    """Chat-formatted prompt → reference response (+ end-of-turn); loss on the response only.

    Rows without a `response` (MMLU) score the prompt text itself. None when the row does not fit.
    """
    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        ids = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        if len(ids) < 2:
            return None
        ids = ids[:max_tokens]
        return Example(ids, [-100, *ids[1:]])
    prefix = chat_prefix(tokenizer, row["prompt"])
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(prefix):  # a template that rewrites earlier turns: fall back to plain concat
        full = prefix + response + (tokenizer.eos_token or "")
    head = tokenizer(prefix, add_special_tokens=False).input_ids
    tail = tokenizer(full[len(prefix) :].rstrip("\n"), add_special_tokens=False).input_ids
    if len(head) + len(tail) > max_tokens or not tail:
        return None
    return Example(head + tail, [-100] * len(head) + tail)


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_tokens: int, limit: int | None
) -> list[Example]:
    """The first `limit` rows that fit in `max_tokens`, encoded (file order: deterministic)."""
    out: list[Example] = []
    for row in rows:
        example = encode_example(tokenizer, row, max_tokens)
        if example is not None:
            out.append(example)
            if limit is not None and len(out) >= limit:
                break
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels)."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return ids, mask, labels


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


class _Captured(Exception):
    pass


def hidden_before(
    model: Any, layers: Sequence[int], ids: torch.Tensor, mask: torch.Tensor, stop: bool
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Hidden states entering each decoder layer in `layers`, and the final (normed) hidden states.

    With `stop`, the forward is aborted once the last wanted layer is reached (final is then None).
    """
    captured: dict[int, torch.Tensor] = {}
    wanted = set(layers)
    blocks = model.model.layers
    handles = []

    def hook(index: int) -> Callable[..., None]:
        def grab(_module: Any, args: tuple, kwargs: dict) -> None:
            captured[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            if stop and len(captured) == len(wanted):
                raise _Captured

        return grab

    for index in wanted:
        if index < len(blocks):
            handles.append(blocks[index].register_forward_pre_hook(hook(index), with_kwargs=True))
    final = None
    try:
        with contextlib.suppress(_Captured):
            final = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return captured, final


@contextlib.contextmanager
def top_layers(model: Any, start: int) -> Iterator[None]:
    """Temporarily keep only decoder layers [start:], so `inputs_embeds` is the state entering `start`."""
    inner = model.model
    full = inner.layers
    inner.layers = torch.nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        inner.layers = full


def suffix_hidden(model: Any, start: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of `model` run from layer `start` on `hidden`."""
    with top_layers(model, start):
        return model.model(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state


def scored_nll(model: Any, final: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, token count) of the labelled positions; the vocabulary projection only where scored."""
    targets = labels[:, 1:]
    keep = targets != -100
    states = final[:, :-1][keep]
    weight = model.get_output_embeddings().weight
    logits = F.linear(states.float(), weight.float())
    nll = F.cross_entropy(logits, targets[keep], reduction="sum")
    return float(nll), int(keep.sum())


def training_loss(model: Any, final: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(final[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def mean_nll(total: float, count: int) -> float:
    return round(total / count, 4) if count else math.nan


# ---- which layers differ from the base (so evaluation can start there) ----


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    return dict.fromkeys(_names(folder / "model.safetensors"), folder / "model.safetensors")


def _names(file: Path) -> list[str]:
    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def _read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), "pt") as handle:
        return handle.get_tensor(name)


LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def adapter_layers(adapter_dir: Path) -> list[int]:
    """The decoder layers a PEFT adapter's saved tensors touch."""
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), "pt") as handle:
        names: list[str] = list(handle.keys())  # noqa: SIM118 (a safetensors handle is not iterable)
    found = {int(m.group(1)) for key in names if (m := LAYER_KEY.search(key))}
    return sorted(found)


def first_differing_layer(model_dir: Path, base_dir: Path, num_layers: int) -> int:
    """The lowest decoder layer whose weights differ from the base's (num_layers when none does).

    A PEFT adapter differs from the base from the lowest layer its tensors touch.

    Mixtral checkpoints (moerge's per-expert layout) compare every expert's FFN with the base's FFN:
    a layer whose experts are all the base's FFN computes the base's function whatever its gate says.
    """
    if is_adapter(Path(model_dir)):
        return min(adapter_layers(model_dir), default=num_layers)
    mine, base = _tensor_files(Path(model_dir)), _tensor_files(Path(base_dir))
    if not torch.equal(_read(mine, "model.embed_tokens.weight"), _read(base, "model.embed_tokens.weight")):
        return 0
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for name in sorted(n for n in mine if n.startswith(prefix)):
            rest = name[len(prefix) :]
            if rest.startswith("block_sparse_moe.gate."):
                continue
            if rest.startswith("block_sparse_moe.experts."):
                proj = rest.split(".")[3]
                reference = f"{prefix}mlp.{LLAMA_PROJ[proj]}.weight"
            else:
                reference = name
            if reference not in base or not torch.equal(_read(mine, name), _read(base, reference)):
                return layer
    return num_layers


def load_model(folder: Path, dtype: torch.dtype | str = "auto") -> Any:
    """A causal LM in its stored dtype by default (so saved copies stay bit-identical to their source)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False)
    model.eval()
    return model


def load_expert(folder: Path, base_dir: Path) -> Any:
    """A dense expert as `load_model` does; a PEFT adapter folder as its base with the adapter merged in
    by peft itself (W + (alpha/r)·B·A in the base's dtype, what serving the merged expert computes)."""
    if not is_adapter(Path(folder)):
        return load_model(folder)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(folder)).merge_and_unload()
    model.eval()
    return model


def set_experts_per_token(model: Any, top_k: int) -> None:
    """Change a loaded Mixtral's routing top-k in place (the weights do not depend on it)."""
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter") or type(module).__name__.endswith("SparseMoeBlock"):
            module.top_k = top_k
    model.config.num_experts_per_tok = top_k
