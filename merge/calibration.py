"""Calibration data and the layer-by-layer forward pass that initialises the gates.

The MoE is run one decoder layer at a time over every expert's calibration prompts: attention with the
merged shared weights, then the gate is fitted on the FFN inputs at that layer, then the tokens are
routed through the experts' FFNs with that gate. The hidden states that reach layer l+1 are therefore
exactly those of the MoE being written, and only one layer's weights are in memory at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from merge.outputs.base import rope_of
from merge.recipe import DataSource, ExpertSpec, RecipeError

BATCH = 32


@dataclass(frozen=True)
class CalibrationText:
    """One calibration example: a prompt and, where the data has one, a reference answer to it.

    With an answer the gate also sees answer tokens given the prompt, the tokens a served model generates.
    """

    prompt: str
    response: str | None = None


def read_prompts(expert: str, source: DataSource) -> list[CalibrationText]:
    """Prompts (and answers, if `response_field` is set) of one JSONL source; errors name the expert, the
    file and the line."""
    if not source.path.is_file():
        raise RecipeError(f"experts[{expert}].data: file not found: {source.path}")
    prompts: list[CalibrationText] = []
    with open(source.path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise RecipeError(f"experts[{expert}].data: {source.path}:{number} is not UTF-8") from err
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecipeError(
                    f"experts[{expert}].data: {source.path}:{number} is not JSON ({err})"
                ) from err
            if any(str(row.get(k)) != v for k, v in source.where.items()):
                continue
            text = row.get(source.field)
            if not isinstance(text, str):
                raise RecipeError(
                    f"experts[{expert}].data: {source.path}:{number} has no string field {source.field!r}"
                )
            response = row.get(source.response_field) if source.response_field else None
            if response is not None and not isinstance(response, str):
                raise RecipeError(
                    f"experts[{expert}].data: {source.path}:{number} field {source.response_field!r} "
                    "is not a string"
                )
            if text.strip():
                prompts.append(CalibrationText(text, response if response and response.strip() else None))
            if source.limit and len(prompts) >= source.limit:
                break
    if not prompts:
        raise RecipeError(
            f"experts[{expert}].data: no prompts in {source.path} matching {source.where or '{}'}"
        )
    return prompts


def expert_prompts(expert: ExpertSpec, limit: int) -> tuple[list[CalibrationText], list[CalibrationText]]:
    """(positive, negative) calibration examples of one expert, at most `limit` positives."""
    positive = [CalibrationText(p) for p in expert.positive_prompts]
    for source in expert.data:
        positive.extend(read_prompts(expert.name, source))
    return positive[:limit], [CalibrationText(p) for p in expert.negative_prompts][:limit]


@dataclass
class CalibrationSet:
    """Token ids of all calibration prompts, right-padded, with each token's expert label."""

    input_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool, True on real tokens
    labels: torch.Tensor  # [B] expert index, or −(i+1) for expert i's negative prompts

    @property
    def token_labels(self) -> torch.Tensor:
        return self.labels.unsqueeze(1).expand_as(self.mask)[self.mask]


def _calibration_ids(
    tokenizer: PreTrainedTokenizerBase, example: CalibrationText, max_tokens: int, use_chat_template: bool
) -> list[int]:
    """The ids the model sees: the (chat-formatted) prompt, then the answer if there is one.

    With an answer, the prompt keeps at most half of `max_tokens`, cut from the left so the assistant
    header stays next to the answer."""
    if use_chat_template and tokenizer.chat_template:
        chat: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(chat, list):  # transformers 5 may return a BatchEncoding
            chat = chat["input_ids"]
        ids: list[int] = list(chat)
    else:
        ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
        if example.response:
            ids += tokenizer("\n", add_special_tokens=False)["input_ids"]
    if not example.response:
        return ids[:max_tokens]
    context = ids[-(max_tokens // 2) :]
    answer = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return context + list(answer)[: max_tokens - len(context)]


def tokenize_calibration(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[tuple[int, CalibrationText]],
    max_tokens: int,
    use_chat_template: bool,
) -> CalibrationSet:
    rows: list[list[int]] = []
    for _, example in prompts:
        ids = _calibration_ids(tokenizer, example, max_tokens, use_chat_template)
        rows.append(ids or [tokenizer.eos_token_id or 0])
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    labels = torch.tensor([label for label, _ in prompts], dtype=torch.long)
    return CalibrationSet(input_ids, mask, labels)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_cos_sin(dense: dict[str, Any], head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for positions 0..length-1 ([1, length, head_dim], float32) of the dense model whose
    config.json is `dense`, exactly as transformers' LlamaRotaryEmbedding gives them. Plain RoPE (SmolLM2,
    Mistral, Qwen2, Qwen3) is computed here: transformers' config and modelling code would cost every merge
    seconds of imports (generation, scikit-learn). Scaled types use its `modeling_rope_utils` frequencies
    (and pay that import); those that depend on the sequence length (dynamic, longrope) its module itself."""
    rope = rope_of(dense)
    if rope["rope_type"] == "default" and "partial_rotary_factor" not in rope:
        theta = rope["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = LlamaConfig.from_dict({k: v for k, v in dense.items() if k != "architectures"})
        if rope["rope_type"] in ("dynamic", "longrope"):
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            probe = torch.zeros(1, 1, head_dim)
            return LlamaRotaryEmbedding(cfg)(probe, torch.arange(length).unsqueeze(0))
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg)
    freqs = torch.arange(length).unsqueeze(0)[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    return (F.silu(x @ gate.to(dtype).T) * (x @ up.to(dtype).T)) @ down.to(dtype).T


class LayerwiseForward:
    """Runs decoder layers one at a time on the calibration set, holding only the hidden states."""

    def __init__(self, dense_config: dict, calibration: CalibrationSet, compute_dtype: torch.dtype) -> None:
        """`compute_dtype` is that of the checkpoint being written (bf16 for a bf16 MoE): the gates are fitted
        on the hidden states the served model will produce, and bf16 matmuls are ~2x faster on this CPU."""
        self.compute_dtype = compute_dtype
        self.heads = int(dense_config["num_attention_heads"])
        self.kv_heads = int(dense_config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(dense_config.get("head_dim") or dense_config["hidden_size"] // self.heads)
        self.eps = float(dense_config.get("rms_norm_eps", 1e-6))  # Llama's, Qwen2's and Qwen3's default
        self.cal = calibration
        cos, sin = rope_cos_sin(dense_config, self.head_dim, calibration.input_ids.shape[1])
        # [1, T, 1, head_dim] in the compute dtype, to broadcast over [B, T, heads, head_dim].
        self.cos, self.sin = (c.to(compute_dtype).unsqueeze(2) for c in (cos, sin))
        self.hidden: torch.Tensor | None = None
        lengths = calibration.mask.sum(dim=1)
        self._batches = [
            (start, int(lengths[start : start + BATCH].max())) for start in range(0, len(lengths), BATCH)
        ]

    @torch.inference_mode()
    def embed(self, embed_tokens: torch.Tensor) -> torch.Tensor:
        self.hidden = F.embedding(self.cal.input_ids, embed_tokens).float()
        return self.hidden[self.cal.mask]

    def _attention(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal self-attention of one layer; `w` is keyed by the name inside the layer
        (`self_attn.q_proj.weight`); q/k/v biases (Qwen2) and per-head q/k norms (Qwen3) where present."""
        b, t, _ = x.shape
        x = x.to(self.compute_dtype)

        def proj(name: str, heads: int) -> torch.Tensor:
            y = x @ w[f"self_attn.{name}.weight"].T
            bias = w.get(f"self_attn.{name}.bias")
            if bias is not None:
                y = y + bias
            return y.view(b, t, heads, self.head_dim)

        q, k, v = proj("q_proj", self.heads), proj("k_proj", self.kv_heads), proj("v_proj", self.kv_heads)
        if "self_attn.q_norm.weight" in w:  # Qwen3: RMSNorm over each head, before RoPE
            q = rms_norm(q.float(), w["self_attn.q_norm.weight"].float(), self.eps).to(x.dtype)
            k = rms_norm(k.float(), w["self_attn.k_norm.weight"].float(), self.eps).to(x.dtype)
        # RoPE as transformers' apply_rotary_pos_emb computes it, on [B, T, heads, head_dim] before the
        # transpose (element for element the same, on contiguous memory).
        cos, sin = self.cos[:, :t], self.sin[:, :t]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return (out.transpose(1, 2).reshape(b, t, -1) @ w["self_attn.o_proj.weight"].T).float()

    @torch.inference_mode()
    def attention(self, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply one layer's attention block; returns the FFN inputs of real tokens [N, H]."""
        assert self.hidden is not None, "call embed() first"
        weights = {k: v.to(self.compute_dtype) for k, v in shared.items()}  # once per layer, not per batch
        for start, width in self._batches:
            # Only as wide as the batch's longest prompt: right padding is never attended to (causal).
            h = self.hidden[start : start + BATCH, :width]
            attended = h + self._attention(rms_norm(h, shared["input_layernorm.weight"], self.eps), weights)
            self.hidden[start : start + BATCH, :width] = attended
        self._ffn_in = rms_norm(self.hidden, shared["post_attention_layernorm.weight"], self.eps)
        return self._ffn_in[self.cal.mask]

    @torch.inference_mode()
    def dense(self, ffn: dict[str, torch.Tensor]) -> None:
        """A layer that keeps one dense FFN: every real token goes through it."""
        x = self._ffn_in
        y = swiglu(x.to(self.compute_dtype), ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"]).float()
        assert self.hidden is not None
        self.hidden = self.hidden + y * self.cal.mask.unsqueeze(-1)

    @torch.inference_mode()
    def route(
        self,
        gate: torch.Tensor,
        experts: list[dict[str, torch.Tensor]],
        top_k: int,
        shared: dict[str, torch.Tensor] | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Route every token through its top-k experts (softmax, top-k, renormalised: Mixtral's routing and
        Qwen's with norm_topk_prob), plus sigmoid(shared_gate · x) times the shared expert if there is one;
        returns top-1 ids. Works on the real tokens only, packed [N, H]: padding never reaches an expert."""
        mask = self.cal.mask
        x = self._ffn_in[mask]
        probs = torch.softmax(x @ gate.T, dim=-1)
        weights, chosen = probs.topk(top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        x_compute = x.to(self.compute_dtype)  # once, not once per expert
        out = torch.zeros_like(x)
        for e, ffn in enumerate(experts):
            hit = chosen == e  # [N, k]
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = swiglu(x_compute[rows], ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"]).float()
            out.index_add_(0, rows, y * (weights * hit).sum(-1)[rows].unsqueeze(-1))
        if shared is not None and shared_gate is not None:
            y = swiglu(x_compute, shared["gate_proj"], shared["up_proj"], shared["down_proj"]).float()
            out += torch.sigmoid(x_compute.float() @ shared_gate.float().T) * y
        assert self.hidden is not None
        self.hidden[mask] += out
        return chosen[:, 0]


def routing_shares(top1: torch.Tensor, labels: torch.Tensor, num_experts: int) -> list[list[float]]:
    """Row i: the share of expert i's calibration tokens whose top-1 expert is j."""
    shares = []
    for i in range(num_experts):
        picks = top1[labels == i]
        if len(picks) == 0:
            shares.append([0.0] * num_experts)
            continue
        counts = torch.bincount(picks, minlength=num_experts).float()
        shares.append((counts / counts.sum()).tolist())
    return shares


def load_calibration_prompts(
    experts: list[ExpertSpec], max_prompts: int
) -> list[tuple[int, CalibrationText]]:
    labelled: list[tuple[int, CalibrationText]] = []
    for index, expert in enumerate(experts):
        positive, negative = expert_prompts(expert, max_prompts)
        labelled += [(index, p) for p in positive] + [(-(index + 1), p) for p in negative]
    return labelled
