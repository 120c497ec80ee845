"""Session-wide fixtures: tiny homogeneous experts, built once per test session and shared by all tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from merge.tiny import TINY_FAMILIES, TinyFamily, TinyZoo, build_tiny_family, build_tiny_zoo

if TYPE_CHECKING:
    from tests.helpers import PostgresServer

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
def tiny_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyFamily]:
    """Random-init dense Qwen2 and Qwen3 bases (random biases and norms), each with a layer-1-changed copy."""
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_family(root / f, f) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres_factory() -> Iterator[Callable[[], PostgresServer]]:
    """Starts real throwaway PostgreSQL servers (apt-get installs `postgresql` if missing; needs root).

    Without PostgreSQL the tests that need it fail when CI is set, and are skipped (with the reason) locally.
    """
    from tests.helpers import PostgresServer, PostgresUnavailable

    started: list[PostgresServer] = []

    def start() -> PostgresServer:
        try:
            server = PostgresServer().start()
        except (PostgresUnavailable, RuntimeError, OSError) as err:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is required in CI but could not be started: {err}")
            pytest.skip(f"PostgreSQL unavailable here: {err}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.destroy()


@pytest.fixture(scope="session")
def postgres(postgres_factory: Callable[[], PostgresServer]) -> PostgresServer:
    """One PostgreSQL server shared by the session's decision-log tests."""
    return postgres_factory()
