"""Session-wide fixtures: tiny homogeneous experts, built once per test session and shared by all tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from merge.tiny import TinyZoo, build_tiny_zoo

# vLLM on CPU: small KV cache so several engines fit beside the tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    """A base and three domain experts (math, code, text) differing in FFN and attention."""
    return build_tiny_zoo(tmp_path_factory.mktemp("zoo") / "tiny")


@pytest.fixture(scope="session")
def tiny_zoo_shared_attention(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    """Experts that share every non-FFN weight with the base: an MoE must reproduce each exactly."""
    return build_tiny_zoo(tmp_path_factory.mktemp("zoo-shared") / "tiny", shared_attention=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA
