"""`moerge up TOPOLOGY.yaml`: the production topology as local processes.

One `vllm serve` per expert on a loopback port, then the gateway (`moerge serve`) pointing at them as
`backend: openai` remote experts: the shape the Helm chart deploys, without a cluster. Every child runs
in its own process group (a vLLM server has an engine-core child), its output is streamed with a
coloured prefix, and everything is stopped — SIGTERM, then SIGKILL after a grace period — on
Ctrl-C/SIGTERM or as soon as any child exits. A child that died makes the exit code non-zero.
Relative paths, the experts' models and the gateway's, are relative to the topology file (moerge's one
rule, moerge/config_base.py): the generated gateway config says so (`paths_relative_to`).
May import: moerge.config_base, serving (config, engine arguments, the vLLM version check), httpx, rich.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import httpx
import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator
from rich.console import Console
from rich.text import Text

from moerge.config_base import ConfigError, ConfigModel, ModelRef, read_yaml_mapping, validate_config
from serving.config import NAME_PATTERN, ServeConfig, parse_config
from serving.engine_args import check_engine_args, engine_flags
from serving.vllm_boundary import VllmVersionError, check_vllm

LOOPBACK = "127.0.0.1"
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")
# Flags moerge up sets itself; `trust_remote_code` is refused as everywhere in moerge.


class ExpertProcess(ConfigModel):
    """One `vllm serve` process; `args` are its command-line options (`max_model_len: 256` →
    `--max-model-len 256`, `true` → a bare flag, `false` → left out)."""

    model: ModelRef = Field(
        min_length=1, description="checkpoint folder (./x, ../x: relative to the file) or model id"
    )
    port: int | Literal["auto"] = Field("auto", description="loopback port, or auto (a free one)")
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for this server")
    fallback: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    startup_timeout_s: float = Field(600.0, gt=0)
    tool_call_parser: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="vLLM's tool-call parser (`--tool-call-parser`: hermes, llama3_json, pythonic...): "
        "tool_choice `required` or a named function needs one; checked against the installed vLLM's",
    )
    enable_auto_tool_choice: bool = Field(
        False, description="tool_choice `auto` (`--enable-auto-tool-choice`; needs tool_call_parser)"
    )

    @field_validator("port")
    @classmethod
    def _port_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError("port must be 1-65535 or auto")
        return v

    @field_validator("args")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_engine_args(v, set_by="moerge up")
        if both := sorted({k.replace("-", "_") for k in v} & {"tool_call_parser", "enable_auto_tool_choice"}):
            raise ValueError(f"{', '.join(both)}: set it on the expert, not in args")
        return v

    @model_validator(mode="after")
    def _auto_needs_parser(self) -> ExpertProcess:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self

    def server_options(self) -> dict[str, Any]:
        """`args` plus the tool-calling options, as `vllm serve` gets them."""
        out = dict(self.args)
        if self.tool_call_parser is not None:
            out["tool_call_parser"] = self.tool_call_parser
        if self.enable_auto_tool_choice:
            out["enable_auto_tool_choice"] = True
        return out


class Topology(ConfigModel):
    """Experts as local vLLM servers plus the gateway's serve config (everything but `experts`)."""

    experts: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ExpertProcess] = Field(min_length=1)
    gateway: dict[str, Any] = Field(
        default_factory=dict,
        description="a `moerge serve` config without `experts` (routers, routing_models, experiments...)",
    )
    grace_s: float = Field(15.0, gt=0, description="SIGTERM → SIGKILL grace period at shutdown")
    _base: Path = PrivateAttr(default_factory=Path.cwd)  # the gateway's relative paths' folder

    @field_validator("gateway")
    @classmethod
    def _no_experts(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "experts" in v:
            raise ValueError("experts are generated from the top-level `experts` section")
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> Topology:
        seen: dict[int, str] = {}
        for name, e in self.experts.items():
            if isinstance(e.port, int):
                if e.port in seen:
                    raise ValueError(f"experts.{name}.port: {e.port} is also experts.{seen[e.port]}.port")
                seen[e.port] = name
        return self


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    topo = validate_config(Topology, read_yaml_mapping(path, what="topology"), what="topology", source=path)
    topo._base = path.resolve().parent
    return topo


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A port from bind(0) comes from the ephemeral range, which outgoing connections (health probes,
    vLLM's own sockets) draw from too: one may take it before the server that was meant to binds it.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, low)) if low > 21000 else []
    random.shuffle(candidates)
    for port in [*candidates[:200], 0]:
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free loopback port")


def check_tool_parsers(topo: Topology) -> None:
    """ConfigError naming `experts.X.tool_call_parser` when the installed vLLM has no such parser (a
    `tool_parser_plugin` in `args` registers its own names, so those are left to vLLM)."""
    from serving.vllm_boundary import check_tool_parser

    for name, e in topo.experts.items():
        plugin = "tool_parser_plugin" in {k.replace("-", "_") for k in e.args}
        if e.tool_call_parser is not None and not plugin:
            try:
                check_tool_parser(e.tool_call_parser, f"experts.{name}.tool_call_parser")
            except ValueError as err:
                raise ConfigError(str(err), field=f"experts.{name}.tool_call_parser") from None


def cli_flags(args: dict[str, Any]) -> list[str]:
    """The expert's `args` as `vllm serve` flags: the same mapping as in-process engines use."""
    return engine_flags(args)


@dataclass
class Plan:
    """What `moerge up` will run: ports fixed, the gateway config generated and validated."""

    ports: dict[str, int]
    expert_argv: dict[str, list[str]]
    gateway_config: dict[str, Any]
    serve_config: ServeConfig


def check_positions(topo: Topology) -> None:
    """ConfigError naming `experts.X.args` where a server would run its model past its RoPE table."""
    from serving.engine_args import check_rope_positions

    for name, e in topo.experts.items():
        try:
            check_rope_positions(e.model, e.args, {**os.environ, **e.env}, field=f"experts.{name}.args")
        except ValueError as err:
            raise ConfigError(str(err), field=f"experts.{name}.args") from None


def make_plan(topo: Topology, *, gateway_port: int | None = None) -> Plan:
    check_positions(topo)
    ports = {n: e.port if isinstance(e.port, int) else free_port() for n, e in topo.experts.items()}
    argv = {
        name: [
            sys.executable,  # the module `vllm serve` runs: works whichever distribution provides vLLM
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            e.model,
            "--served-model-name",
            name,
            "--host",
            LOOPBACK,
            "--port",
            str(ports[name]),
            *cli_flags(e.server_options()),
        ]
        for name, e in topo.experts.items()
    }
    config = dict(topo.gateway)
    config["paths_relative_to"] = str(topo._base)  # the file is written elsewhere (a run folder)
    config["server"] = dict(config.get("server") or {})
    if gateway_port is not None:
        config["server"]["port"] = gateway_port
    config["experts"] = {
        name: {
            "backend": "openai",
            "url": f"http://{LOOPBACK}:{ports[name]}/v1",
            "model": name,
            **({"fallback": e.fallback} if e.fallback else {}),
        }
        for name, e in topo.experts.items()
    }
    try:
        serve = parse_config(config, base=topo._base)
    except ConfigError as err:
        raise ConfigError(
            f"the generated gateway config is invalid (fix `gateway` or `experts`):\n{err}",
            field=err.field and f"gateway.{err.field}",
        ) from None
    if serve.server.port in ports.values():
        raise ConfigError(
            f"gateway.server.port: {serve.server.port} is also an expert's port", field="gateway.server.port"
        )
    return Plan(ports, argv, config, serve)


@dataclass
class Child:
    """A supervised process in its own process group, its output relayed with a prefix."""

    name: str
    argv: list[str]
    env: dict[str, str]
    colour: str
    proc: subprocess.Popen[bytes] | None = None
    relay: threading.Thread | None = None
    stopping: bool = field(default=False)

    def start(self, console: Console, width: int) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        prefix = Text(f"{self.name:>{width}} │ ", style=f"bold {self.colour}")
        assert self.proc.stdout is not None
        self.relay = threading.Thread(
            target=_relay, args=(self.proc.stdout, prefix, console), name=f"log-{self.name}", daemon=True
        )
        self.relay.start()

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)


def _relay(stream: IO[bytes], prefix: Text, console: Console) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        console.print(prefix + Text(line), highlight=False, soft_wrap=True)
    stream.close()


class Supervisor:
    """Starts the children, waits for health, and owns the shutdown path."""

    def __init__(self, console: Console, grace_s: float) -> None:
        self.console = console
        self.grace_s = grace_s
        self.children: list[Child] = []
        self.stop = threading.Event()
        self.died: list[tuple[str, int]] = []

    def add(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, COLOURS[len(self.children) % len(COLOURS)])
        self.children.append(child)
        return child

    def say(self, message: str, style: str = "bold") -> None:
        self.console.print(Text("moerge up │ ", style="bold white") + Text(message, style=style))

    def check_children(self) -> bool:
        """Record children that exited on their own; True if all are alive."""
        for child in self.children:
            if child.proc is not None and not child.stopping and child.proc.poll() is not None:
                child.stopping = True
                self.died.append((child.name, child.proc.returncode))
        return not self.died

    def wait_healthy(self, urls: dict[str, str], timeouts: dict[str, float]) -> bool:
        """Poll every URL until 200; False if a child died, a timeout passed, or a stop was asked."""
        start = time.monotonic()
        pending = dict(urls)
        with httpx.Client(timeout=2) as http:
            while pending:
                if self.stop.is_set() or not self.check_children():
                    return False
                for name, url in list(pending.items()):
                    with contextlib.suppress(httpx.HTTPError):
                        if http.get(url).status_code == 200:
                            self.say(f"{name} is up ({time.monotonic() - start:.0f}s)", "green")
                            del pending[name]
                    if name in pending and time.monotonic() - start > timeouts[name]:
                        self.say(f"{name}: {url} not healthy after {timeouts[name]:.0f}s", "bold red")
                        self.died.append((name, -1))
                        return False
                self.stop.wait(0.5)
        return True

    def shutdown(self) -> None:
        """SIGTERM every group (gateway first), then SIGKILL whatever outlives the grace period."""
        for child in reversed(self.children):
            child.stopping = True
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop in {self.grace_s:.0f}s: SIGKILL", "yellow")
            # The group may hold stragglers (vLLM's engine core) even after the leader exited.
            child.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=10)
        for child in self.children:
            if child.relay is not None:
                child.relay.join(timeout=5)


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run_up(
    topo: Topology,
    *,
    console: Console,
    gateway_port: int | None = None,
    run_dir: Path | None = None,
) -> int:
    """Run the topology until Ctrl-C/SIGTERM (exit 0) or until a child dies (exit 1)."""
    check_vllm()
    plan = make_plan(topo, gateway_port=gateway_port)
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="moerge-up-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(plan.gateway_config, sort_keys=False))

    sup = Supervisor(console, topo.grace_s)
    _install_signal_handlers(sup.stop)
    width = max(len(n) for n in [*topo.experts, "gateway"])
    try:
        for name, argv in plan.expert_argv.items():
            sup.add(name, argv, {**os.environ, **topo.experts[name].env}).start(console, width)
            sup.say(f"{name}: vllm serve {topo.experts[name].model} on {LOOPBACK}:{plan.ports[name]}")
        urls = {n: f"http://{LOOPBACK}:{p}/health" for n, p in plan.ports.items()}
        if not sup.wait_healthy(urls, {n: e.startup_timeout_s for n, e in topo.experts.items()}):
            return _finish(sup)
        if plan.serve_config.server.port == 0:  # auto: picked now, so nothing else takes it meanwhile
            plan.serve_config.server.port = plan.gateway_config["server"]["port"] = free_port()
            config_path.write_text(yaml.safe_dump(plan.gateway_config, sort_keys=False))
        gw_argv = [sys.executable, "-m", "serving", "serve", str(config_path)]
        sup.add("gateway", gw_argv, dict(os.environ)).start(console, width)
        host, port = plan.serve_config.server.host, plan.serve_config.server.port
        gw_host = LOOPBACK if host in ("0.0.0.0", "::", "") else host
        if not sup.wait_healthy({"gateway": f"http://{gw_host}:{port}/health"}, {"gateway": 300}):
            return _finish(sup)
        sup.say(
            f"ready: OpenAI API at http://{gw_host}:{port}/v1 (config {config_path}); Ctrl-C stops",
            "bold green",
        )
        while not sup.stop.wait(0.5):
            if not sup.check_children():
                break
        return _finish(sup)
    except BaseException:
        sup.shutdown()
        raise


def _finish(sup: Supervisor) -> int:
    died = list(sup.died)
    if died:
        names = ", ".join(f"{n} (exit {code})" for n, code in died)
        sup.say(f"{names} stopped: shutting everything down", "bold red")
    else:
        sup.say("stopping")
    sup.shutdown()
    sup.say("all processes stopped", "bold red" if died else "bold")
    return 1 if died else 0


def register_up_command(app: Any) -> None:
    """Add `moerge up` to the main typer app."""
    import typer

    @app.command("up")
    def up(
        topology: Path = typer.Argument(..., exists=True, dir_okay=False, help="topology YAML"),
        port: int | None = typer.Option(None, help="override gateway.server.port"),
        run_dir: Path | None = typer.Option(None, help="where the generated gateway config is written"),
        check: bool = typer.Option(False, "--check", help="validate the topology, print the plan, exit"),
    ) -> None:
        """Run one `vllm serve` per expert on loopback and the gateway in front of them, until Ctrl-C."""
        console = Console(highlight=False)
        try:
            topo = load_topology(topology)
            missing = [
                f"experts.{n}.model: {e.model}"
                for n, e in topo.experts.items()
                if e.model.startswith("/") and not Path(e.model).exists()
            ]
            if missing:
                raise ConfigError("missing paths:\n" + "\n".join(missing))
            check_tool_parsers(topo)
            if check:
                plan = make_plan(topo, gateway_port=port)
                for name, argv in plan.expert_argv.items():
                    console.print(Text(f"{name}: {' '.join(argv[1:])}"), soft_wrap=True)
                console.print(
                    Text(yaml.safe_dump({"gateway": plan.gateway_config}, sort_keys=False)), soft_wrap=True
                )
                return
            code = run_up(topo, console=console, gateway_port=port, run_dir=run_dir)
        except ConfigError as err:
            typer.echo(str(err) if err.source else f"invalid topology {topology}:\n{err}", err=True)
            raise typer.Exit(2) from None
        except VllmVersionError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)
