"""merge.tokenizer: the light tokenizer load gives AutoTokenizer's class and ids, or defers to AutoTokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.models.auto import tokenization_auto

from merge.tiny import build_tokenizer
from merge.tokenizer import HUB_CLASS_OVERRIDDEN, REGISTERED_CLASSES, light_tokenizer_class, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["If we compute 2 + 2 we get", "def f(x):\n    return x * 2", "  spaced   out\ttext "]
CLASSES = [
    "TokenizersBackend",
    "PreTrainedTokenizerFast",
    "GPT2Tokenizer",
    "GPT2TokenizerFast",
    "Qwen2Tokenizer",
    "Qwen2TokenizerFast",
    "LlamaTokenizerFast",
]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return folder


def variant(src: Path, dst: Path, model_type: str, tokenizer_class: str | None) -> Path:
    """`src`'s tokenizer files with another tokenizer_class, beside a config.json of `model_type`."""
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    tok_config.pop("tokenizer_class", None)
    if tokenizer_class is not None:
        tok_config["tokenizer_class"] = tokenizer_class
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (dst / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 512}))
    return dst


@pytest.mark.parametrize("model_type", sorted(REGISTERED_CLASSES))
@pytest.mark.parametrize("tokenizer_class", CLASSES)
def test_same_class_and_ids_as_auto_tokenizer(
    saved_tokenizer: Path, tmp_path: Path, model_type: str, tokenizer_class: str
) -> None:
    folder = variant(saved_tokenizer, tmp_path / "t", model_type, tokenizer_class)
    assert light_tokenizer_class(folder) is not None, "this pair should not need AutoTokenizer"
    expected = AutoTokenizer.from_pretrained(str(folder.resolve()), trust_remote_code=False)
    got = load_tokenizer(folder)
    assert type(got) is type(expected)
    for text in TEXTS:
        assert got(text)["input_ids"] == expected(text)["input_ids"]
        assert (
            got(text, add_special_tokens=False)["input_ids"]
            == expected(text, add_special_tokens=False)["input_ids"]
        )
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert got.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == (
        expected.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    )
    assert got.get_vocab() == expected.get_vocab()


@pytest.mark.parametrize(
    ("model_type", "tokenizer_class", "change"),
    [
        ("mistral", "LlamaTokenizerFast", None),  # Mistral's own format: AutoTokenizer decides
        ("gpt2", "GPT2Tokenizer", None),  # not a type a merge takes
        ("llama", None, None),  # no class named: AutoTokenizer looks at the config
        ("llama", "TokenizersBackend", "auto_map"),  # remote code is AutoTokenizer's business (and refused)
        ("llama", "TokenizersBackend", "no_tokenizer_json"),
        ("llama", "NoSuchTokenizer", None),
    ],
)
def test_defers_to_auto_tokenizer(
    saved_tokenizer: Path, tmp_path: Path, model_type: str, tokenizer_class: str | None, change: str | None
) -> None:
    folder = variant(saved_tokenizer, tmp_path / "t", model_type, tokenizer_class)
    if change == "auto_map":
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        tok_config["auto_map"] = {"AutoTokenizer": ["x.Tok", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if change == "no_tokenizer_json":
        (folder / "tokenizer.json").unlink()
    assert light_tokenizer_class(folder) is None


def test_tables_match_the_installed_transformers() -> None:
    """The two facts the light path copies from transformers' AutoTokenizer: fail here when they change."""
    for model_type, registered in REGISTERED_CLASSES.items():
        assert tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type) == registered
    overridden = {
        m for m in REGISTERED_CLASSES if m in tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    }
    assert overridden == HUB_CLASS_OVERRIDDEN
    # AutoTokenizer forces TokenizersBackend for some Hub ids matched against the path it was given;
    # load_tokenizer passes an absolute path, which none of these patterns can match.
    for pattern in tokenization_auto.MODEL_IDS_TO_TOKENIZERS_BACKEND:
        assert not pattern.startswith(("*", "/")), pattern


def test_merge_path_does_not_import_transformers_models(saved_tokenizer: Path, tmp_path: Path) -> None:
    """What the light path is for: a merge's tokenizer and output configs without transformers' model
    machinery (its configuration_utils pulls in generation and scikit-learn: seconds of every merge)."""
    folder = variant(saved_tokenizer, tmp_path / "t", "llama", "TokenizersBackend")
    code = (
        "import sys; import merge.build; from merge.tokenizer import load_tokenizer; "
        f"load_tokenizer({str(folder)!r}); "
        "heavy = [m for m in ('transformers.configuration_utils', 'sklearn', 'transformers.generation') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
