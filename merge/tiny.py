"""Tiny homogeneous experts built on the fly, for tests, benchmarks and the offline demo.

No model hub is reachable, so the fixtures are made here: a byte-level BPE tokenizer, a random-init
Llama base (head_dim 64, the smallest vLLM's CPU attention accepts) briefly trained on mixed text, and
one expert per domain fine-tuned from it. Fine-tuning touches every weight, so experts differ from the
base in attention as well as in the FFN, which is what makes shared-weight merging non-trivial.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TINY_DOMAINS = ("math", "code", "text")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_WORDS = [
    "the",
    "a",
    "river",
    "story",
    "old",
    "city",
    "light",
    "morning",
    "quiet",
    "people",
    "walked",
    "said",
    "house",
    "garden",
    "window",
    "friend",
    "letter",
    "summer",
    "music",
    "small",
    "green",
    "dream",
    "evening",
    "voice",
    "remember",
    "long",
    "road",
    "market",
    "bread",
    "paper",
]
_IDENTS = ["x", "y", "items", "total", "value", "name", "result", "count", "node", "data"]


def domain_sentence(domain: str, rng: random.Random) -> str:
    """One synthetic sentence whose surface form is typical of `domain`."""
    if domain == "math":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"If we compute {a} {op} {b} we get {value}. So the answer is {value}."
    if domain == "code":
        f, x = rng.choice(_IDENTS), rng.choice(_IDENTS)
        return (
            f"def {f}_fn({x}):\n    return [{x} * {rng.randint(2, 9)} for {x} in range({rng.randint(1, 20)})]"
        )
    if domain == "text":
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
    raise ValueError(f"unknown tiny domain {domain!r}; expected one of {TINY_DOMAINS}")


def domain_prompts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    return [domain_sentence(domain, rng) for _ in range(n)]


def build_tokenizer(out: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    corpus = [s for d in TINY_DOMAINS for s in domain_prompts(d, 400, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", bos_token="<|end|>", pad_token="<|end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(vocab_size: int, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _train(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, texts: list[str], steps: int, seed: int
) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [texts[(step * 16 + i) % len(texts)] for i in range(16)]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@dataclass(frozen=True)
class TinyZoo:
    """Paths of a built tiny zoo: a base and one expert per domain, sharing one tokenizer."""

    root: Path
    base: Path
    experts: dict[str, Path]
    data: dict[str, Path]


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def build_tiny_zoo(
    root: Path, *, shared_attention: bool = False, layers: int = 2, seed: int = 0, family: str = "llama"
) -> TinyZoo:
    """Build (or reuse) a tiny zoo under `root`.

    With `shared_attention`, every expert keeps the base's non-FFN weights exactly, so an MoE whose
    gate picks expert i must reproduce expert i's logits: the equivalence test uses this. `family`
    "qwen2" or "qwen3" trains that family's architecture instead of Llama (same shape, head_dim 64).
    """

    def fresh() -> PreTrainedModel:
        if family == "llama":
            return LlamaForCausalLM(tiny_config(len(tok), layers))
        return _causal_lm(tiny_family_config(family, len(tok), layers))

    root = Path(root)
    marker = root / "zoo.json"
    experts = {d: root / f"expert-{d}" for d in TINY_DOMAINS}
    data = {d: root / "data" / f"{d}.jsonl" for d in TINY_DOMAINS}
    zoo = TinyZoo(root=root, base=root / "base", experts=experts, data=data)
    if marker.exists():
        return zoo
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = build_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    base = fresh()
    mixed = [s for d in TINY_DOMAINS for s in domain_prompts(d, 200, seed=seed + 1)]
    random.Random(seed).shuffle(mixed)
    _train(base, tok, mixed, steps=40, seed=seed)
    _save(base, tok, tmp / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    (tmp / "data").mkdir()
    for i, domain in enumerate(TINY_DOMAINS):
        texts = domain_prompts(domain, 300, seed=seed + 2)
        with open(tmp / "data" / f"{domain}.jsonl", "w") as fh:
            for j, text in enumerate(texts):
                fh.write(json.dumps({"id": f"{domain}-{j}", "domain": domain, "prompt": text}) + "\n")
        expert = fresh()
        expert.load_state_dict(base_state)
        _train(expert, tok, texts[:200], steps=60, seed=seed + 10 + i)
        if shared_attention:
            state = expert.state_dict()
            for name, tensor in base_state.items():
                if ".mlp." not in name:
                    state[name].copy_(tensor)
        _save(expert, tok, tmp / f"expert-{domain}")
    (tmp / "zoo.json").write_text(
        json.dumps({"domains": list(TINY_DOMAINS), "shared_attention": shared_attention, "family": family})
    )
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return zoo


# ---- tiny Qwen2 / Qwen3 families: random init, for the equivalence tests of the Qwen output classes ----

TINY_FAMILIES = ("qwen2", "qwen3")


def tiny_family_config(family: str, vocab_size: int, layers: int = 2) -> PretrainedConfig:
    """A tiny dense Qwen2 (q/k/v biases) or Qwen3 (per-head q/k norms) config, head_dim 64."""
    from transformers import Qwen2Config, Qwen3Config

    shape: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if family == "qwen2":
        return Qwen2Config(**shape)
    if family == "qwen3":
        return Qwen3Config(**shape, head_dim=64)
    raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")


def _causal_lm(config: PretrainedConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def _randomise(model: PreTrainedModel, seed: int) -> None:
    """Give biases and norm weights random values: transformers initialises them to 0 and 1, which would
    hide a dropped bias or norm from an equivalence test."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(".bias"):
            p.copy_(noise * 0.1)
        elif "norm" in name:
            p.copy_(1.0 + noise * 0.2)


@dataclass(frozen=True)
class TinyFamily:
    """A random-init dense base of one family, and experts derived from it.

    `base`: the dense base. `changed`: a copy of the base whose layer-1 FFN differs (so layer 0 equals the
    base's). `data`: one JSONL of prompts per tiny domain, for calibrating gates.
    """

    family: str
    root: Path
    base: Path
    changed: Path
    data: dict[str, Path]


def build_tiny_family(root: Path, family: str, *, layers: int = 2, seed: int = 0) -> TinyFamily:
    root = Path(root)
    fam = TinyFamily(
        family=family,
        root=root,
        base=root / "base",
        changed=root / "changed",
        data={d: root / "data" / f"{d}.jsonl" for d in TINY_DOMAINS},
    )
    if (root / "family.json").exists():
        return fam
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = build_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    base = _causal_lm(tiny_family_config(family, len(tok), layers))
    _randomise(base, seed)
    _save(base, tok, tmp / "base")
    with torch.no_grad():
        mlp = base.model.layers[layers - 1].mlp
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.weight.add_(
                torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
            )
    _save(base, tok, tmp / "changed")
    (tmp / "data").mkdir()
    for domain in TINY_DOMAINS:
        with open(tmp / "data" / f"{domain}.jsonl", "w") as fh:
            for j, text in enumerate(domain_prompts(domain, 48, seed=seed + 2)):
                fh.write(json.dumps({"id": f"{domain}-{j}", "domain": domain, "prompt": text}) + "\n")
    (tmp / "family.json").write_text(json.dumps({"family": family, "layers": layers}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return fam
