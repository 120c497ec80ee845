"""Session-wide fixtures: tiny homogeneous experts, built once per test session and shared by all tests."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from merge.tiny import TINY_FAMILIES, TinyFamily, TinyZoo, build_tiny_family, build_tiny_zoo

if TYPE_CHECKING:
    import openai

    from tests.helpers import PostgresServer, ThreadedServer, VllmServer

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


# -- the serving tests' engines (tests/test_serving_e2e.py, tests/test_serving_api.py), started once -----
# Three engines: the `math` expert inside the gateway, the `code` expert as a `vllm serve` subprocess (a
# remote backend, storing Responses answers for `previous_response_id`), and a second `vllm serve` of the
# math checkpoint that is the reference for pass-through fidelity and the victim the fault tests kill
# (they run last: test_serving_e2e.py sorts after test_serving_api.py).
# Long generations that a test can interrupt for sure: the engine core of a tiny model can run
# thousands of tokens per second ahead of the HTTP frontend, so "long" must be very long.
LONG_LEN = 8192
LONG_TOKENS = 8000
# The victim of the kill test streams far longer than any socket buffer and any frontend lag can hold:
# it cannot have sent its whole answer before it is killed (≈1 KB of KV cache per token: 60 MB).
VICTIM_LEN = 65536
VICTIM_TOKENS = 60000
# The tiny checkpoints say max_position_embeddings=256, so vLLM builds their RoPE table with 256 rows.
# Engines that run longer get a table that long (hf_overrides: RoPE has no weights, positions below 256
# are unchanged). Not VLLM_ALLOW_LONG_MAX_MODEL_LEN: with it, vLLM's CPU rotary kernel reads past the
# table from position 256 on and writes NaN keys and values into the KV cache; the CPU attention kernel
# reads the NaN slots a later request leaves unwritten in a reused block, and that request's logits are
# NaN (test_serving_e2e.py::test_long_generation_logprobs_stay_finite).
LONG_POSITIONS = {"max_position_embeddings": VICTIM_LEN}
LONG_SERVE_ARGS = ["--hf-overrides", json.dumps(LONG_POSITIONS)]


def math_expert(zoo: TinyZoo, max_model_len: int, **engine_args: Any) -> dict[str, Any]:
    """The tiny zoo's math expert as an in-process engine (falling back to `code`), RoPE table as long as
    its context."""
    return {
        "backend": "vllm",
        "model": str(zoo.experts["math"]),
        "fallback": "code",
        "engine_args": {
            "max_model_len": max_model_len,
            "hf_overrides": LONG_POSITIONS,
            "enforce_eager": True,
            **engine_args,
        },
    }


@pytest.fixture(scope="session")
def zoo(request: pytest.FixtureRequest) -> TinyZoo:
    """The session's tiny zoo; MOERGE_TEST_ZOO=/path reuses one built earlier (for local iteration)."""
    if path := os.environ.get("MOERGE_TEST_ZOO"):
        return build_tiny_zoo(Path(path))
    return request.getfixturevalue("tiny_zoo")


@pytest.fixture(scope="session")
def servers(zoo: TinyZoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    """Both `vllm serve` processes, launched together so their start-ups overlap."""
    from tests.helpers import VllmServer

    logs = tmp_path_factory.mktemp("vllm-logs")
    store = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}  # `previous_response_id` needs the store
    started = {
        "code": VllmServer(
            zoo.experts["code"],
            ["code"],
            max_model_len=VICTIM_LEN,
            extra_args=LONG_SERVE_ARGS,
            env=store,
            log_path=logs / "code.log",
        ).start(),
        "victim": VllmServer(
            zoo.experts["math"],
            ["victim"],
            max_model_len=VICTIM_LEN,
            extra_args=LONG_SERVE_ARGS,
            log_path=logs / "victim.log",
        ).start(),
    }
    yield started
    for server in started.values():
        server.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def code_server(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["code"].wait_ready()


@pytest.fixture(scope="session")
def victim(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["victim"].wait_ready()


@pytest.fixture(scope="session")
def decision_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decisions") / "decisions.db"


@pytest.fixture(scope="session")
def gateway(zoo: TinyZoo, servers: dict[str, VllmServer], decision_db: Path) -> Iterator[ThreadedServer]:
    from serving.app import create_app
    from serving.config import parse_config
    from tests.helpers import ThreadedServer, wait_http_ok

    config = parse_config(
        {
            "experts": {
                "math": {
                    **math_expert(
                        zoo,
                        LONG_LEN,
                        # compact JSON under a schema: a random tiny model would otherwise pad tool
                        # arguments with whitespace until max_tokens cuts them off
                        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
                    ),
                    "tool_call_parser": "pythonic",  # tool_choice required / named / auto
                    "enable_auto_tool_choice": True,
                },
                "code": {"backend": "openai", "url": servers["code"].url + "/v1"},
            },
            "routers": {
                "rand": {"kind": "random", "params": {"seed": 0}},
                "to-code": {"kind": "fixed", "params": {"expert": "code"}},
                "to-math": {"kind": "fixed", "params": {"expert": "math"}},
                # live perplexity routing: each candidate's own engine (in-process, remote) scores the prompt
                "ppl": {"kind": "perplexity", "experts": ["math", "code"], "params": {"timeout_s": 60}},
            },
            "experiments": {
                "ab": {
                    "arms": {"control": {"router": "to-math"}, "treatment": {"expert": "code"}},
                    "shadow": ["to-code", "rand"],
                }
            },
            "routing_models": {"auto": "rand", "coder": "to-code", "ab-test": "ab", "ppl": "ppl"},
            "decision_log": {"enabled": True, "url": f"sqlite:///{decision_db}", "flush_interval_s": 0.05},
            "circuit_breaker": {"health_interval_s": 0.5},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        servers["code"].wait_ready()
        wait_http_ok(server.url + "/ready", 60)
        yield server


@pytest.fixture(scope="session")
def client(gateway: ThreadedServer) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def aclient(gateway: ThreadedServer) -> openai.AsyncOpenAI:
    import openai

    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
