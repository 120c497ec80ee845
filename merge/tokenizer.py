"""The experts' tokenizer for a merge, loaded without transformers' model machinery where that is exact.

`AutoTokenizer` picks the tokenizer class from the model's config, and importing it (like any transformers
config class) imports generation, masking and scikit-learn: ≈ 4 s and ≈ 260 MiB of every merge, for
a tokenizer. For the model types a merge takes (Llama, Qwen2, Qwen3) the class it picks follows from two
JSON files, so `load_tokenizer` names that class itself, imports only its module, and loads it the way
AutoTokenizer would. Anything less plain (Mistral's own tokenizer format, `auto_map`, no tokenizer.json, a
class outside transformers' fast backend) still goes through AutoTokenizer. tests/test_tokenizer.py checks
both paths give the same class and the same ids, for every (model type, tokenizer class) pair handled here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

# model_type → the class transformers 5 registers for it (TOKENIZER_MAPPING_NAMES); None: none registered.
REGISTERED_CLASSES: dict[str, str | None] = {
    "llama": None,
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
}
# Model types whose tokenizer_config.json class transformers overrides with the registered one
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
HUB_CLASS_OVERRIDDEN = frozenset({"qwen2"})
# Class names that mean "the generic fast backend": AutoTokenizer loads TokenizersBackend for them.
GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizer", "PythonBackend"})


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer AutoTokenizer.from_pretrained(path) gives (no remote code)."""
    folder = Path(path).resolve()
    cls = light_tokenizer_class(folder)
    if cls is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer: PreTrainedTokenizerBase = cls.from_pretrained(str(folder))
    return tokenizer


def light_tokenizer_class(folder: Path) -> Any | None:
    """The tokenizer class AutoTokenizer would pick for `folder`, or None where only AutoTokenizer knows."""
    if not (folder / "tokenizer.json").is_file():
        return None
    config, tok_config = _json(folder / "config.json"), _json(folder / "tokenizer_config.json")
    if config is None or tok_config is None or "auto_map" in tok_config or "auto_map" in config:
        return None
    model_type = config.get("model_type")
    hub = tok_config.get("tokenizer_class")
    if model_type not in REGISTERED_CLASSES or not isinstance(hub, str):
        return None
    name = hub.removesuffix("Fast")
    registered = REGISTERED_CLASSES[model_type]
    if registered is not None and name != registered and model_type in HUB_CLASS_OVERRIDDEN:
        name = registered
    import transformers
    from transformers import TokenizersBackend

    if name in GENERIC_CLASSES:
        return TokenizersBackend
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, TokenizersBackend):
        return cls
    return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
