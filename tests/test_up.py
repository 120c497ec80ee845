"""`moerge up`: real `vllm serve` processes for two tiny experts and the gateway, driven by the OpenAI SDK.

The example topology (examples/up-tiny.yaml) is run with its model paths pointed at the session's tiny
zoo. One run is stopped with SIGINT (Ctrl-C) and must leave no process and no bound port behind; in the
other an expert server is killed and `moerge up` must take everything down with a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from merge.tiny import TinyZoo, build_tiny_zoo
from moerge.up import ExpertProcess, Topology, cli_flags, free_port, load_topology, make_plan
from serving.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "up-tiny.yaml"
MOERGE = Path(sys.executable).parent / "moerge"


# -- the topology schema (no processes) --------------------------------------------------------------
def test_example_topology_is_valid() -> None:
    topo = load_topology(EXAMPLE)
    assert set(topo.experts) == {"math", "code"}
    assert topo.experts["math"].model == str(ROOT / ".cache" / "tiny-zoo" / "expert-math")
    plan = make_plan(topo, gateway_port=free_port())
    assert plan.gateway_config["experts"]["math"] == {
        "backend": "openai",
        "url": f"http://127.0.0.1:{plan.ports['math']}/v1",
        "model": "math",
        "fallback": "code",
    }
    assert plan.serve_config.routing_models == {"auto": "default", "coder": "always-code"}
    argv = plan.expert_argv["code"]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") :][:2] == ["--served-model-name", "code"]
    assert "--enforce-eager" in argv and argv[argv.index("--max-model-len") + 1] == "256"
    math = plan.expert_argv["math"]
    assert math[math.index("--tool-call-parser") + 1] == "pythonic" and "--enable-auto-tool-choice" in math
    assert "--tool-call-parser" not in argv and "--enable-auto-tool-choice" not in argv


def test_tool_options_are_checked(tmp_path: Path) -> None:
    """The tool options live on the expert (not in `args`), auto needs a parser, and the parser must be
    one the installed vLLM has: each error names its field."""
    with pytest.raises(ValueError, match="tool_call_parser: set it on the expert"):
        ExpertProcess(model="/m", args={"tool-call-parser": "hermes"})
    with pytest.raises(ValueError, match="enable_auto_tool_choice needs tool_call_parser"):
        ExpertProcess(model="/m", enable_auto_tool_choice=True)
    from moerge.up import check_tool_parsers

    check_tool_parsers(Topology(experts={"a": ExpertProcess(model="/m", tool_call_parser="hermes")}))
    bad = Topology(experts={"a": ExpertProcess(model="/m", tool_call_parser="no-such-parser")})
    with pytest.raises(ConfigError, match=r"experts\.a\.tool_call_parser: unknown tool-call parser.*hermes"):
        check_tool_parsers(bad)
    plugin = {"tool_parser_plugin": "/p.py"}
    check_tool_parsers(
        Topology(experts={"a": ExpertProcess(model="/m", tool_call_parser="mine", args=plugin)})
    )


def test_cli_flags() -> None:
    assert cli_flags({"max_model_len": 256, "enforce_eager": True, "disable_log_stats": False}) == [
        "--max-model-len",
        "256",
        "--enforce-eager",
    ]
    assert cli_flags({"tensor-parallel-size": 2, "allowed_origins": ["a", "b"]}) == [
        "--tensor-parallel-size",
        "2",
        "--allowed-origins",
        "a",
        "b",
    ]


def test_engine_options_mean_the_same_in_process_and_under_moerge_up() -> None:
    """One mapping: `enforce_eager: false` is `--no-enforce-eager` (vLLM can negate it) in both, a
    plain switch set false is left out in both, and vLLM's own parser accepts the result."""
    from serving.backends.inprocess import engine_argv, parse_engine_args

    options = {"enforce_eager": False, "disable_log_stats": False, "max_model_len": 256, "seed": None}
    flags = cli_flags(options)
    assert flags == ["--no-enforce-eager", "--max-model-len", "256"]
    assert engine_argv("/m", "x", options)[4:] == flags
    args = parse_engine_args("/m", "x", options)
    assert args.enforce_eager is False and args.max_model_len == 256


@pytest.mark.parametrize(
    ("url", "expected"), [(None, "moerge-decisions.db"), ("sqlite:///./d/x.db", "d/x.db")]
)
def test_decision_log_lives_beside_the_topology(tmp_path: Path, url: str | None, expected: str) -> None:
    topo_file = tmp_path / "topo.yaml"
    log_cfg: dict[str, Any] = {"enabled": True} if url is None else {"enabled": True, "url": url}
    topo_file.write_text(
        yaml.safe_dump({"experts": {"a": {"model": str(tmp_path)}}, "gateway": {"decision_log": log_cfg}})
    )
    plan = make_plan(load_topology(topo_file))
    assert plan.serve_config.decision_log.url == f"sqlite:///{tmp_path.resolve() / expected}"


@pytest.mark.parametrize("key", ["model", "served-model-name", "port", "host", "model_tag"])
def test_reserved_engine_args_are_refused_everywhere(key: str) -> None:
    from serving.config import ConfigError, parse_config

    with pytest.raises(ValueError, match=key.replace("-", "_")):
        ExpertProcess(model="/m", args={key: "x"})
    with pytest.raises(ConfigError, match=key.replace("-", "_")):
        parse_config({"experts": {"a": {"backend": "vllm", "model": "/m", "engine_args": {key: "x"}}}})


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"experts": {"math": {"model": "m", "port": 70000}}}, "experts.math.port"),
        ({"experts": {"math": {"model": "m", "args": {"port": 1}}}}, "experts.math.args"),
        ({"experts": {"math": {"model": "m", "args": {"trust_remote_code": True}}}}, "experts.math.args"),
        ({"experts": {"math": {"model": "m", "typo": 1}}}, "experts.math.typo"),
        (
            {"experts": {"a": {"model": "m", "port": 9001}, "b": {"model": "m", "port": 9001}}},
            "experts.b.port",
        ),
        ({"experts": {"math": {"model": "m"}}, "gateway": {"experts": {}}}, "gateway"),
        ({"experts": {}}, "experts"),
    ],
)
def test_topology_errors_name_the_field(tmp_path: Path, patch: dict, field: str) -> None:
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(patch))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_topology(path)


def test_generated_gateway_config_errors_are_reported() -> None:
    topo = Topology(
        experts={"math": ExpertProcess(model="/m", fallback="nope")},
        gateway={"routers": {"r": {"kind": "fixed", "params": {"expert": "math"}}}},
    )
    with pytest.raises(ConfigError, match=r"experts\.math\.fallback: unknown expert 'nope'"):
        make_plan(topo)
    topo = Topology(
        experts={"math": ExpertProcess(model="/m", port=9100)}, gateway={"server": {"port": 9100}}
    )
    with pytest.raises(ConfigError, match=r"gateway\.server\.port"):
        make_plan(topo)


def test_auto_ports_avoid_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(free_port() < low for _ in range(20))


def test_up_check_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moerge.cli import app

    model = tmp_path / "expert"
    model.mkdir()
    topo = tmp_path / "topo.yaml"
    topo.write_text(yaml.safe_dump({"experts": {"math": {"model": str(model), "port": 9123}}}))
    result = CliRunner().invoke(app, ["up", str(topo), "--check"])
    assert result.exit_code == 0, result.output
    assert "--served-model-name math" in result.output and "url: http://127.0.0.1:9123/v1" in result.output
    topo.write_text(yaml.safe_dump({"experts": {"math": {"model": str(tmp_path / "missing")}}}))
    result = CliRunner().invoke(app, ["up", str(topo), "--check"])
    assert result.exit_code == 2 and "experts.math.model" in result.output


# -- real processes ------------------------------------------------------------------------------------
@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    log: Path
    run_dir: Path
    gateway_url: str

    def ports(self) -> list[int]:
        config = yaml.safe_load((self.run_dir / "gateway.yaml").read_text())
        urls = [e["url"] for e in config["experts"].values()]
        return [int(u.rsplit(":", 1)[1].split("/")[0]) for u in urls] + [config["server"]["port"]]

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_up(zoo: TinyZoo, tmp: Path) -> Up:
    data = yaml.safe_load(EXAMPLE.read_text())
    for name, expert in data["experts"].items():
        expert["model"] = str(zoo.experts[name])
    port = free_port()
    data["gateway"]["server"]["port"] = port
    topo = tmp / "topology.yaml"
    topo.write_text(yaml.safe_dump(data))
    log = tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(MOERGE), "up", str(topo), "--run-dir", str(tmp / "run")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
            start_new_session=True,
        )
    up = Up(proc, log, tmp / "run", f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moerge up exited with {proc.returncode}:\n{up.output()[-4000:]}")
        try:
            if httpx.get(up.gateway_url + "/ready", timeout=2).status_code == 200:
                return up
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(up)
    pytest.fail(f"the gateway was not ready in time:\n{up.output()[-4000:]}")


def stop(up: Up) -> None:
    """Last-resort cleanup for a failed test: kill moerge up and its whole tree."""
    for p in [*up.descendants(), psutil.Process(up.proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    up.proc.wait(timeout=30)


def assert_all_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=30)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {[(p.pid, p.cmdline()) for p in alive]}"


def assert_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            # as a server binds (uvicorn, vLLM): closed connections' TIME_WAIT is fine, a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()


@pytest.fixture(scope="session")
def zoo(request: pytest.FixtureRequest) -> TinyZoo:
    """The session's tiny zoo; MOERGE_TEST_ZOO=/path reuses one built earlier (for local iteration)."""
    if path := os.environ.get("MOERGE_TEST_ZOO"):
        return build_tiny_zoo(Path(path))
    return request.getfixturevalue("tiny_zoo")


@pytest.fixture()
def up(zoo: TinyZoo, tmp_path: Path) -> Iterator[Up]:
    running = start_up(zoo, tmp_path)
    yield running
    if running.proc.poll() is None:
        stop(running)


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_up_serves_routes_and_stops_on_ctrl_c(up: Up) -> None:
    children = up.descendants()
    servers = [p for p in children if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(servers) == 2
    ports = up.ports()
    client = openai.OpenAI(base_url=up.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    assert {m.id for m in client.models.list().data} >= {"math", "code", "auto", "coder"}
    for model, expert in [("math", "math"), ("code", "code"), ("coder", "code")]:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8
        )
        assert raw.headers["x-moerge-expert"] == expert
        completion = raw.parse()
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens > 0
    with client.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": "def add(a, b):"}],
        max_tokens=8,
        stream=True,
    ) as response:
        assert response.headers["x-moerge-expert"] in {"math", "code"}
        assert response.headers["x-moerge-router"]  # the deciding router reports itself
        chunks = list(response.parse())
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    # tool calling on a `vllm serve` expert: the topology's tool options reached the server
    tool: Any = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"n": {"enum": [1, 2, 3]}},
                "required": ["n"],
                "additionalProperties": False,
            },
        },
    }
    resp = client.chat.completions.create(
        model="math",
        messages=[{"role": "user", "content": "pick"}],
        max_tokens=256,  # `required` may add calls; at 64 a sampled array can be cut before it closes
        seed=1,
        tools=[tool],
        tool_choice="required",
    )
    calls = resp.choices[0].message.tool_calls or []
    assert calls and all(c.function.name == "pick" for c in calls), calls  # type: ignore[union-attr]

    up.proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
    assert up.proc.wait(timeout=120) == 0
    assert_all_gone(children)
    assert_ports_free(ports)
    out = up.output()
    assert "math │" in out and "code │" in out and "gateway │" in out  # prefixed child logs
    assert "all processes stopped" in out


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_up_stops_everything_when_an_expert_dies(up: Up) -> None:
    children = up.descendants()
    ports = up.ports()
    math_server = next(
        p
        for p in children
        if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
        and "math" in p.cmdline()[p.cmdline().index("--served-model-name") + 1 :][:1]
    )
    math_server.kill()  # the server only: its engine core is left for `moerge up` to clean up
    assert up.proc.wait(timeout=120) != 0
    assert_all_gone(children)
    assert_ports_free(ports)
    assert "math (exit -9)" in up.output()
