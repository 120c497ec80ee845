"""Serving pieces without a vLLM engine: config, breaker, micro-batching, errors, limits, dispatch rules."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from typer.testing import CliRunner

from router.base import Decision, Router, RoutingRequest
from serving.backends.inprocess import engine_argv
from serving.cli import register_serve_commands
from serving.config import ConfigError, load_config, missing_paths, parse_config
from serving.health import BreakerState, CircuitBreaker
from serving.routing import MicroBatcher, RouterOverloaded
from tests.helpers import LOOPBACK, ThreadedServer, free_port

pytestmark = pytest.mark.timeout(120)
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("serve*.yaml"))


def remote(url: str, **kw: Any) -> dict[str, Any]:
    return {"backend": "openai", "url": url, **kw}


# -- config -----------------------------------------------------------------------------------------
def test_examples_exist() -> None:
    assert EXAMPLES, "examples/serve*.yaml missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config.experts
    for expert in config.experts.values():
        if expert.backend == "vllm":
            assert Path(expert.model).is_absolute(), "relative model paths resolve against the config file"
    assert isinstance(missing_paths(config), list)  # existence is a separate check


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"experts": {"a": {"backend": "ollama", "model": "x"}}}, "experts.a"),
        ({"experts": {"a": {"backend": "vllm"}}}, "experts.a.vllm.model"),
        ({"experts": {"a": {"backend": "vllm", "model": "m", "fallback": "zz"}}}, "experts.a.fallback"),
        ({"experts": {"a": {"backend": "vllm", "model": "m", "fallback": "a"}}}, "experts.a.fallback"),
        (
            {"experts": {"a": {"backend": "vllm", "model": "m", "engine_args": {"trust_remote_code": True}}}},
            "trust_remote_code",
        ),
        (
            {"experts": {"a": {"backend": "vllm", "model": "m", "engine_args": {"served-model-name": "x"}}}},
            "served_model_name",
        ),
        ({"experts": {"a": {"backend": "openai", "url": "not a url"}}}, "experts.a.openai.url"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"prot": 1}}, "server.prot"),
        ({"routers": {"r": {"kind": "fixed", "artifact": "/x"}}}, "routers.r"),
        ({"routers": {"r": {"kind": "nope"}}}, "routers.r.kind"),
        ({"routers": {"r": {"kind": "hybrid"}}}, "routers.r.kind"),
        ({"routers": {"r": {"kind": "fixed"}}, "routing_models": {"auto": "nope"}}, "routing_models.auto"),
        ({"routers": {"r": {"kind": "fixed"}}, "routing_models": {"a": "r"}}, "routing_models.a"),
        ({"experts": {}}, "experts"),
        ({"timeouts": {"first_token_s": -1}}, "timeouts.first_token_s"),
    ],
)
def test_config_errors_name_the_field(patch: dict[str, Any], field: str) -> None:
    data: dict[str, Any] = {"experts": {"a": {"backend": "vllm", "model": "m"}}}
    data.update(patch)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)


def test_router_kinds_come_from_the_router_registry() -> None:
    from router.base import router_kinds
    from router.heads import head_kinds

    data: dict[str, Any] = {"experts": {"a": {"backend": "vllm", "model": "m"}}}
    with pytest.raises(ConfigError) as err:
        parse_config({**data, "routers": {"r": {"kind": "nope"}}})
    built_in = [k for k in router_kinds() if k not in head_kinds()]
    assert f"built-in kinds: {', '.join(built_in)}" in str(err.value)
    assert {"fixed", "random", "rules", "perplexity"} <= set(built_in)
    with pytest.raises(ConfigError, match=r"router kind 'classifier' is trained: give `artifact: DIR`"):
        parse_config({**data, "routers": {"r": {"kind": "classifier"}}})


def test_config_defaults_and_paths(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "serve.yaml"
    path.write_text(
        "experts:\n  a: {backend: vllm, model: ../models/a}\n  b: {backend: openai, url: 'http://127.0.0.1:1/v1'}\n"
        "routers:\n  r: {kind: fixed}\n"
    )
    config = load_config(path)
    assert config.routing_models == {"auto": "r"}
    assert config.experts["a"].model == str((tmp_path / "models" / "a").resolve())
    assert missing_paths(config) == [f"experts.a.model: {(tmp_path / 'models' / 'a').resolve()}"]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_engine_argv_uses_vllm_flag_conventions() -> None:
    argv = engine_argv(
        "/m",
        "math",
        {
            "max_model_len": 256,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "override_generation_config": {"temperature": 0.5},
        },
    )
    assert argv[:4] == ["--model", "/m", "--served-model-name", "math"]
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--max-model-len") + 1] == "256"
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {"temperature": 0.5}


def test_tool_calling_options_per_expert() -> None:
    """`tool_call_parser` / `enable_auto_tool_choice` on an in-process expert become vLLM's flags; the
    parser is checked against the installed vLLM's (by name, in the error)."""
    from serving.cli import check_runtime

    tools = {"backend": "vllm", "model": "m", "tool_call_parser": "pythonic", "enable_auto_tool_choice": True}
    cfg = parse_config({"experts": {"a": tools}})
    options = cfg.experts["a"].engine_options()  # type: ignore[union-attr]
    argv = engine_argv("/m", "a", options)
    assert argv[argv.index("--tool-call-parser") + 1] == "pythonic" and "--enable-auto-tool-choice" in argv
    check_runtime(cfg)
    with pytest.raises(ConfigError, match=r"experts\.a\.tool_call_parser: unknown tool-call parser 'nope'"):
        check_runtime(parse_config({"experts": {"a": {**tools, "tool_call_parser": "nope"}}}))
    with pytest.raises(ConfigError, match="enable_auto_tool_choice needs tool_call_parser"):
        parse_config({"experts": {"a": {"backend": "vllm", "model": "m", "enable_auto_tool_choice": True}}})
    with pytest.raises(ConfigError, match="set it on the expert"):
        parse_config(
            {
                "experts": {
                    "a": {"backend": "vllm", "model": "m", "engine_args": {"tool-call-parser": "hermes"}}
                }
            }
        )


def test_embedded_cpu_engines_share_a_kv_cache_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a budget, vLLM's CPU engine reserves 92% of RAM and a second embedded engine cannot start."""
    from serving.backends.inprocess import KV_CAP_BYTES, parse_engine_args, with_cpu_kv_budget

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gib = 2**30
    three = with_cpu_kv_budget({"max_model_len": 256}, engines=3, total_bytes=24 * gib)
    assert three == {"max_model_len": 256, "kv_cache_memory_bytes": 4 * gib}  # 24 GiB / 2 / 3
    assert with_cpu_kv_budget({}, engines=1, total_bytes=64 * gib)["kv_cache_memory_bytes"] == KV_CAP_BYTES
    assert with_cpu_kv_budget({}, engines=4, total_bytes=8 * gib)["kv_cache_memory_bytes"] == gib
    assert parse_engine_args("/m", "x", three).kv_cache_memory_bytes == 4 * gib  # a flag vLLM accepts
    own = {"kv_cache_memory_bytes": 123 * 2**20}
    assert with_cpu_kv_budget(own, engines=3, total_bytes=24 * gib) is own
    assert "kv_cache_memory_bytes" not in with_cpu_kv_budget({"gpu_memory_utilization": 0.3}, 3, 24 * gib)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert with_cpu_kv_budget({}, engines=3, total_bytes=24 * gib) == {}


# -- circuit breaker --------------------------------------------------------------------------------
def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    cb = CircuitBreaker(failure_threshold=2, reset_after_s=10, clock=lambda: now[0])
    assert cb.allow() and cb.state is BreakerState.CLOSED
    cb.record_failure("x")
    assert cb.state is BreakerState.CLOSED
    cb.record_failure("y")
    assert cb.state is BreakerState.OPEN and not cb.allow() and not cb.up
    now[0] = 10.5
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.allow() and not cb.allow(), "half-open lets one trial through"
    cb.record_failure("z")
    assert cb.state is BreakerState.OPEN
    now[0] = 21
    assert cb.allow()
    cb.record_success()
    assert cb.state is BreakerState.CLOSED and cb.up
    cb.record_probe(False)
    assert cb.state is BreakerState.OPEN and not cb.up
    cb.record_probe(True)
    assert cb.state is BreakerState.CLOSED and cb.up


def test_good_probe_does_not_close_a_breaker_that_requests_opened() -> None:
    """/health answering while requests fail must not re-close the breaker every probe interval."""
    now = [0.0]
    cb = CircuitBreaker(failure_threshold=2, reset_after_s=10, clock=lambda: now[0])
    cb.record_failure("HTTP 500")
    cb.record_failure("HTTP 500")
    cb.record_probe(True)
    assert cb.state is BreakerState.OPEN and not cb.allow()
    cb.record_probe(False)  # a failed probe on top does not turn it into a probe-opened breaker
    cb.record_probe(True)
    assert cb.state is BreakerState.OPEN
    now[0] = 10.5
    assert cb.allow(), "the half-open trial decides"
    cb.record_success()
    assert cb.state is BreakerState.CLOSED


# -- micro-batching ---------------------------------------------------------------------------------
class RecordingRouter(Router):
    name = "recording"

    def __init__(self, experts: Sequence[str], fail: bool = False) -> None:
        super().__init__(experts)
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.fail = fail
        self.gate = threading.Event()

    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]:
        self.gate.wait(5)  # holds the first batch so the others queue up behind it
        self.threads.add(threading.get_ident())
        self.batches.append(len(requests))
        if self.fail:
            raise RuntimeError("boom")
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            out.append(Decision(self.experts[len(text) % 2], {}, 1.0, self.name, "1", "len"))
        return out


async def test_micro_batcher_batches_concurrent_requests_off_the_loop() -> None:
    router = RecordingRouter(["even", "odd"])
    batcher = MicroBatcher("r", router, fallback="even")
    loop_thread = threading.get_ident()
    prompts = ["x" * i for i in range(40)]
    tasks = [asyncio.create_task(batcher.decide(RoutingRequest.from_prompt(p))) for p in prompts]
    await asyncio.sleep(0.05)
    router.gate.set()
    decisions = await asyncio.gather(*tasks)
    assert [d.expert for d in decisions] == [["even", "odd"][len(p) % 2] for p in prompts]
    assert sum(router.batches) == 40 and len(router.batches) < 40, router.batches
    assert loop_thread not in router.threads
    batcher.close()


async def test_micro_batcher_calls_cheap_routers_inline() -> None:
    router = RecordingRouter(["a", "b"])
    router.gate.set()
    batcher = MicroBatcher("r", router, fallback="a", inline_below_s=10.0)
    for _ in range(3):
        await batcher.decide(RoutingRequest.from_prompt("hi"))
    assert (
        threading.get_ident() in router.threads and len(router.threads) == 2
    )  # measured on the thread first
    slow = MicroBatcher("r", RecordingRouter(["a", "b"]), fallback="a", inline_below_s=0.0)
    slow.router.gate.set()
    for _ in range(3):
        await slow.decide(RoutingRequest.from_prompt("hi"))
    assert threading.get_ident() not in slow.router.threads
    batcher.close()
    slow.close()


async def test_micro_batcher_drops_cancelled_requests_undecided() -> None:
    """Shadow decisions whose caller gave up are not decided (and no longer hold their messages)."""
    router = RecordingRouter(["a", "b"])
    batcher = MicroBatcher("r", router, fallback="a")
    first = asyncio.create_task(batcher.decide(RoutingRequest.from_prompt("x")))
    await asyncio.sleep(0.05)  # the first batch is being decided (the router waits on its gate)
    shadows = [
        asyncio.create_task(batcher.decide(RoutingRequest.from_prompt("y" * 10_000), shadow=True))
        for _ in range(20)
    ]
    await asyncio.sleep(0.01)
    for task in shadows[:15]:
        task.cancel()
    router.gate.set()
    await first
    decided = await asyncio.gather(*shadows[15:])
    assert len(decided) == 5 and sum(router.batches) == 1 + 5, router.batches
    assert batcher.queued() == 0
    batcher.close()


async def test_micro_batcher_queue_is_bounded() -> None:
    router = RecordingRouter(["a", "b"])
    shed: list[str] = []
    batcher = MicroBatcher("r", router, fallback="b", max_queue=3, on_shed=shed.append)
    first = asyncio.create_task(batcher.decide(RoutingRequest.from_prompt("x")))
    await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(batcher.decide(RoutingRequest.from_prompt("x"))) for _ in range(3)]
    await asyncio.sleep(0.01)
    over = await batcher.decide(RoutingRequest.from_prompt("x"))
    assert over.expert == "b" and over.reason == "router-overloaded→fallback"
    with pytest.raises(RouterOverloaded):
        await batcher.decide(RoutingRequest.from_prompt("x"), shadow=True)
    assert shed == ["serving", "shadow"]
    router.gate.set()
    await asyncio.gather(first, *waiting)
    assert sum(router.batches) == 4
    batcher.close()


async def test_micro_batcher_router_failure_falls_back() -> None:
    router = RecordingRouter(["a", "b"], fail=True)
    router.gate.set()
    batcher = MicroBatcher("r", router, fallback="b")
    decision = await batcher.decide(RoutingRequest.from_prompt("hi"))
    assert decision.expert == "b" and decision.reason == "router-error→fallback"
    batcher.close()


# -- the HTTP surface with misbehaving fake backends (dispatch rules) --------------------------------
def chunk_of(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}],
    }


def fake_backend(mode: str) -> FastAPI:
    """A stand-in OpenAI server for one dispatch rule: `ok`, `fail500`, or `hang` (never answers)."""
    app = FastAPI()
    calls = {"n": 0, "closed": 0}
    app.state.calls = calls

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        calls["n"] += 1
        body = await request.json()
        if mode == "fail500":
            return JSONResponse({"error": {"message": "engine exploded", "type": "server_error"}}, 500)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "texterr":  # an error event with a text code first, then nothing: the stream stays open

            async def text_error() -> Any:
                try:
                    error = {"message": "engine busy", "type": "server_error", "code": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    await asyncio.sleep(3600)
                finally:
                    calls["closed"] += 1

            return StreamingResponse(text_error(), media_type="text/event-stream")
        if mode == "cut":  # one event, then the connection drops mid-stream

            async def cut() -> Any:
                yield f"data: {json.dumps(chunk_of(body))}\n\n"
                await asyncio.sleep(0.05)
                raise RuntimeError("backend died")

            return StreamingResponse(cut(), media_type="text/event-stream")
        chunk = chunk_of(body)
        if body.get("stream"):

            async def events() -> Any:
                yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:  # `cut` only: a Responses stream that breaks off
        body = await request.json()

        async def cut() -> Any:
            created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}}
            yield f"event: response.created\ndata: {json.dumps(created)}\n\n"
            delta = {"type": "response.output_text.delta", "delta": "ok", "sequence_number": 1}
            yield f"event: response.output_text.delta\ndata: {json.dumps(delta)}\n\n"
            await asyncio.sleep(0.05)
            raise RuntimeError("backend died")

        assert mode == "cut" and body.get("stream")
        return StreamingResponse(cut(), media_type="text/event-stream")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:  # `cut` only: a Messages stream that breaks off
        body = await request.json()

        async def cut() -> Any:
            start = {"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 3}}}
            yield f"event: message_start\ndata: {json.dumps(start)}\n\n"
            await asyncio.sleep(0.05)
            raise RuntimeError("backend died")

        assert mode == "cut" and body.get("stream")
        return StreamingResponse(cut(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, ThreadedServer]]:
    servers = {
        m: ThreadedServer(fake_backend(m)).start() for m in ("ok", "fail500", "hang", "cut", "texterr")
    }
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def gateway(fakes: dict[str, ThreadedServer]) -> Iterator[str]:
    from serving.app import create_app

    dead = f"http://{LOOPBACK}:{free_port()}/v1"
    config = parse_config(
        {
            "server": {"max_body_bytes": 4096},
            "experts": {
                "good": remote(fakes["ok"].url + "/v1"),
                "ghost": remote(dead, fallback="good"),
                "broken": remote(fakes["fail500"].url + "/v1", fallback="good"),
                "slow": remote(fakes["hang"].url + "/v1", fallback="good"),
                "lonely": remote(dead),
                "flaky": remote(fakes["cut"].url + "/v1", fallback="good"),
                "doomed": remote(fakes["fail500"].url + "/v1"),
                "texty": remote(fakes["texterr"].url + "/v1", fallback="good"),
            },
            "routers": {
                "r": {"kind": "fixed", "params": {"expert": "ghost"}},
                "ruled": {
                    "kind": "rules",
                    "experts": ["good"],
                    "params": {"rules": [{"pattern": "x\n|hi", "expert": "good"}]},
                },
            },
            "routing_models": {"auto": "r", "ruled": "ruled"},
            "timeouts": {"first_token_s": 1, "total_s": 1, "connect_s": 1},
            "retry": {"attempts": 1, "backoff_s": 0.01},
            "circuit_breaker": {"failure_threshold": 50, "health_interval_s": 0.5},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        yield server.url


JSON = {"content-type": "application/json"}


def post(url: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=30, headers=headers, **kw)


def msg(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (b'{"model": "good", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
        (b"[" * 100_0 + b"]" * 100_0, 400, None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "good"}, 400, "messages"),
        ({"model": "good", "messages": []}, 400, "messages"),
        ({"model": "good", "messages": [{"content": "x"}]}, 400, "messages.0.role"),
        (msg("good", temperature="hot"), 400, "temperature"),
        (msg("good", temperature=3), 400, "temperature"),
        (msg("good", n=0), 400, "n"),
        (msg("good", top_logprobs=99), 400, "top_logprobs"),
        (msg("good", stream="maybe"), 400, "stream"),
        (msg("good", stream=1), 400, "stream"),
        (msg("good", parallel_tool_calls=0), 400, "parallel_tool_calls"),
        (msg("good", n=17), 400, "n"),
        (msg("good", max_tokens=2**20 + 1), 400, "max_tokens"),
        (msg("good", max_completion_tokens=2**20 + 1), 400, "max_completion_tokens"),
        (msg("good", stop=["x"] * 17), 400, "stop"),
        (msg("good", user="u" * 257), 400, "user"),
        ({"model": "good", "messages": [{"role": "¼K"}]}, 400, "messages.0.role"),
        (msg("nope"), 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(gateway: str, body: Any, status: int, param: str | None) -> None:
    assert_openai_error(post(gateway, body), status, param)


def test_protocol_bounds() -> None:
    """Bounds no real request needs: refused by the schema, before a router or backend sees them."""
    from pydantic import ValidationError

    from serving.protocol import MAX_MESSAGES, ChatCompletionRequest, CompletionRequest

    many = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": many})
    ChatCompletionRequest.model_validate({"model": "m", "messages": many[:MAX_MESSAGES]})
    for prompt in ("", [], [""], [[]]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    for prompt in ("x", ["x", "y"], [1, 2], [[1], [2]]):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    with pytest.raises(ValidationError, match="best_of"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 17})


def requests_by_status(url: str, status: str) -> float:
    text = httpx.get(url + "/metrics").text
    pattern = rf'^moerge_requests_total\{{[^}}]*status="{status}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_unknown_fields_named_like_checked_ones_are_never_read_as_checked() -> None:
    """An extra field (`n` on Messages, `max_completion_tokens` on completions) is passed through, but the
    token cap and reservation read only the fields the body's model declares (a dict there was a 500)."""
    from serving.protocol import CompletionRequest, MessagesRequest, check_max_tokens, reserved_tokens

    msgs = MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "n": {"a": 1}}
    )
    assert reserved_tokens(msgs, 400) == 100 + 3
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_completion_tokens": {}})
    check_max_tokens(comp, 16)
    assert reserved_tokens(comp, 40) == 10 + 256


def test_client_leaving_mid_upload_is_499_not_500(gateway: str) -> None:
    before = {s: requests_by_status(gateway, s) for s in ("499", "500")}
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"model": "good", '
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while requests_by_status(gateway, "499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_by_status(gateway, "499") == before["499"] + 1
    assert requests_by_status(gateway, "500") == before["500"]


def test_oversize_body_is_413(gateway: str) -> None:
    big = msg("good", messages=[{"role": "user", "content": "x" * 10_000}])
    assert_openai_error(post(gateway, big), 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "good", "messages": [{"role": "user", "content": "'
        yield b"x" * 10_000
        yield b'"}]}'

    assert_openai_error(
        httpx.post(gateway + "/v1/chat/completions", content=chunks(), timeout=30, headers=JSON), 413
    )


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]
)
def test_non_json_bodies_are_415(gateway: str, content_type: str | None) -> None:
    """A browser's cross-site "simple" POST (no CORS preflight) never reaches a backend."""
    headers = {} if content_type is None else {"content-type": content_type}
    resp = httpx.post(gateway + "/v1/chat/completions", content=json.dumps(msg("good")), headers=headers)
    assert assert_openai_error(resp, 415)["code"] == "unsupported_media_type"
    resp = httpx.post(
        gateway + "/v1/chat/completions",
        content=json.dumps(msg("good")),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert resp.status_code == 200, resp.text
    # no body at all (an admin action such as a sync): no content type needed; here the chat endpoint
    # then says what is missing
    assert assert_openai_error(httpx.post(gateway + "/v1/chat/completions"), 400)["code"] == "invalid_json"


@pytest.fixture(scope="module")
def admission_gateway(fakes: dict[str, ThreadedServer]) -> Iterator[str]:
    """One slot, a 1 s body deadline, allowed hosts, and keys with request and token budgets."""
    from serving.app import create_app
    from serving.auth import hash_key

    config = parse_config(
        {
            "server": {
                "max_concurrent_requests": 1,
                "body_timeout_s": 1,
                "allowed_hosts": [LOOPBACK, "localhost"],
            },
            "experts": {"good": remote(fakes["ok"].url + "/v1")},
            "auth": {
                "keys": {
                    "tokens": {"sha256": hash_key("sk-tokens"), "tokens_per_minute": 100},
                    "once": {"sha256": hash_key("sk-once"), "requests_per_minute": 1},
                }
            },
        }
    )
    with ThreadedServer(create_app(config)) as server:
        yield server.url


def _trickle(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n{".encode()
    )
    return sock


def test_slow_upload_takes_no_slot_and_meets_its_deadline(admission_gateway: str) -> None:
    """Two trickling uploads on a gateway with one slot: a normal request is still served (the slot is
    taken only once a body is whole), and each trickler gets 408 when its body deadline passes."""
    tricklers = [_trickle(admission_gateway), _trickle(admission_gateway)]
    try:
        resp = post(admission_gateway, msg("good", max_tokens=5), headers=auth_tokens())
        assert resp.status_code == 200, resp.text
        for sock in tricklers:
            sock.settimeout(10)
            answer = sock.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 408"), answer
            assert '"code":"request_timeout"' in answer.replace(" ", "")
    finally:
        for sock in tricklers:
            sock.close()


def test_unknown_host_is_refused(admission_gateway: str) -> None:
    body = msg("good", max_tokens=5)
    resp = post(admission_gateway, body, headers={"host": "evil.example", **auth_tokens()})
    assert resp.status_code == 400, resp.text
    assert post(admission_gateway, body, headers=auth_tokens()).status_code == 200


def auth_tokens() -> dict[str, str]:
    return {"authorization": "Bearer sk-tokens"}


def test_token_reservation_is_refunded_after_the_answer(admission_gateway: str) -> None:
    """On a 100-tokens-a-minute key, a request that may use ~80 tokens (60 to answer, its prompt
    estimate) is admitted again and again: each reserves its maximum and gets back what it did not use
    (the fake expert answers 2 tokens). Without the refund the second would get 429."""
    body = msg("good", max_tokens=60)
    for _ in range(3):
        resp = post(admission_gateway, body, headers=auth_tokens())
        assert resp.status_code == 200, resp.text


def test_feedback_is_rate_limited_like_any_request(admission_gateway: str) -> None:
    headers = {"authorization": "Bearer sk-once", **JSON}
    body = json.dumps({"request_id": "req-x", "score": 1})
    first = httpx.post(admission_gateway + "/v1/feedback", content=body, headers=headers)
    assert first.status_code == 404, first.text  # no decision log here: feedback_disabled
    second = httpx.post(admission_gateway + "/v1/feedback", content=body, headers=headers)
    assert assert_openai_error(second, 429)["code"] == "rate_limit_requests"


def test_unknown_route_and_method_are_openai_shaped(gateway: str) -> None:
    assert_openai_error(httpx.get(gateway + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(gateway + "/v1/chat/completions"), 405)


def test_models_health_ready_metrics_openapi(gateway: str) -> None:
    models = httpx.get(gateway + "/v1/models").json()
    ids = {m["id"]: m["moerge"]["type"] for m in models["data"]}
    assert ids == {
        "good": "expert",
        "ghost": "expert",
        "broken": "expert",
        "slow": "expert",
        "lonely": "expert",
        "flaky": "expert",
        "doomed": "expert",
        "texty": "expert",
        "auto": "routing",
        "ruled": "routing",
    }
    assert httpx.get(gateway + "/health").status_code == 200
    # `auto` decides `ghost`, which is down, but its fallback `good` is up: the replica can serve
    ready = httpx.get(gateway + "/ready")
    assert ready.status_code == 200 and ready.json()["routing_models"] == {"auto": True, "ruled": True}
    assert ready.json()["backends"]["ghost"] == {"backend": "openai", "up": False, "breaker": "open"}
    assert ready.json()["backends"]["good"]["up"] is True
    assert LOOPBACK not in ready.text and "error" not in ready.text, "no addresses or errors on /ready"
    metrics = httpx.get(gateway + "/metrics").text
    assert (
        'moerge_backend_up{expert="good"} 1.0' in metrics
        and 'moerge_backend_up{expert="ghost"} 0.0' in metrics
    )
    schema = httpx.get(gateway + "/openapi.json").json()
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


@pytest.mark.parametrize("expert", ["ghost", "broken", "slow"])
@pytest.mark.parametrize("stream", [False, True])
def test_failures_before_first_token_fall_back(gateway: str, expert: str, stream: bool) -> None:
    resp = post(gateway, msg(expert, stream=stream))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-moerge-expert"] == "good" and resp.headers["x-moerge-routed-expert"] == expert
    if stream:
        first = json.loads(resp.text.split("\n\n")[0][len("data: ") :])
        assert first["moerge"]["fallback"] is True and resp.text.rstrip().endswith("data: [DONE]")
    else:
        ext = resp.json()["moerge"]
        # ghost is known down (health probe opened its breaker): skipped; the others are retried once
        assert ext["expert"] == "good" and ext["fallback"] is True
        assert ext["attempts"] == (1 if expert == "ghost" else 3)


def test_error_event_with_a_text_code_falls_back_and_closes_upstream(
    gateway: str, fakes: dict[str, ThreadedServer]
) -> None:
    """A stream whose first event is `{"error": {"code": "server_error"}}`: retried, then the fallback
    serves; every upstream stream is closed (it would otherwise stay open, sleeping)."""
    calls = fakes["texterr"].app.state.calls
    before = calls["n"]
    resp = post(gateway, msg("texty", stream=True))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-moerge-expert"] == "good" and resp.headers["x-moerge-routed-expert"] == "texty"
    assert calls["n"] - before == 2, "tried twice (one retry)"
    deadline = time.monotonic() + 10
    while calls["closed"] < calls["n"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls["closed"] == calls["n"], "the upstream connections were closed"


@pytest.mark.parametrize("closing", [False, True])
async def test_stream_relay_is_closed_at_once(closing: bool) -> None:
    """A client that leaves while the relay is parked at a `yield` (its `send` blocked): Starlette only
    drops the generator, whose `finally` closes the upstream connection when the garbage collector
    gets to it, late when a reference cycle holds it (here: an extra reference). This was why the
    remote-abort test failed in long runs. ClosingStreamingResponse closes it before returning."""
    from starlette.responses import StreamingResponse

    from serving.app import ClosingStreamingResponse

    closed: list[bool] = []

    async def relay() -> Any:
        try:
            while True:
                yield b"data: {}\n\n"
        finally:
            closed.append(True)

    gen = relay()  # held elsewhere, as by a reference cycle
    left = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            left.set()
            await asyncio.sleep(3600)  # the client stopped reading

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    response = (ClosingStreamingResponse if closing else StreamingResponse)(gen)
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await asyncio.wait_for(response(scope, receive, send), 5)
    assert closed == ([True] if closing else []), "the relay (and its upstream) is closed at once"
    await gen.aclose()


def test_error_status_of_openai_error_objects() -> None:
    from serving.backends.base import error_status

    assert error_status({"code": 503}) == 503 and error_status({"code": "429"}) == 429
    assert error_status({"code": "server_error"}) == 500 and error_status({}) == 500
    assert error_status({"code": "bad", "type": "invalid_request_error"}) == 400
    assert error_status({"code": True}) == 500 and error_status({"code": 7}) == 500


def test_router_reason_with_a_newline_is_a_valid_header(gateway: str) -> None:
    """A rules pattern with a newline names itself in x-moerge-reason: the header must stay one line."""
    resp = post(gateway, msg("ruled"))
    assert resp.status_code == 200 and resp.headers["x-moerge-expert"] == "good"
    assert resp.headers["x-moerge-reason"] == "rule:0:x |hi"
    assert resp.json()["moerge"]["reason"] == "rule:0:x\n|hi", "the body keeps the reason as it is"


def test_routed_request_falls_back_and_reports_decision(gateway: str) -> None:
    resp = post(gateway, msg("auto"))
    assert resp.status_code == 200
    assert resp.headers["x-moerge-router"] == "fixed" and resp.headers["x-moerge-routed-expert"] == "ghost"
    assert float(resp.headers["x-moerge-confidence"]) == 1.0


def test_failure_after_first_token_ends_stream_with_error_event(gateway: str) -> None:
    resp = post(gateway, msg("flaky", stream=True))
    assert resp.status_code == 200 and resp.headers["x-moerge-expert"] == "flaky"  # no fallback mid-stream
    events = [e for e in resp.text.split("\n\n") if e]
    assert json.loads(events[0][len("data: ") :])["choices"][0]["delta"]["content"] == "ok"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["code"] == "backend_stream_error" and "mid-stream" in error["message"]
    assert "127.0.0.1" not in error["message"] and "http" not in error["message"], "no backend internals"
    assert events[-1] == "data: [DONE]"


def _sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name, data) of each event of an SSE body."""
    out = []
    for block in (b for b in text.split("\n\n") if b):
        name = data = None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        out.append((name, data))
    return out


def test_responses_and_messages_streams_that_break_off_end_with_their_error_event(gateway: str) -> None:
    """Mid-stream, Responses ends with `event: error` (its top-level fields), Messages with Anthropic's
    `event: error`; the relayed events keep their names and the first one carries the `moerge` field."""
    resp = httpx.post(
        gateway + "/v1/responses", json={"model": "flaky", "input": "hi", "stream": True}, timeout=30
    )
    assert resp.status_code == 200 and resp.headers["x-moerge-expert"] == "flaky"
    events = _sse(resp.text)
    assert [n for n, _ in events] == ["response.created", "response.output_text.delta", "error"]
    assert events[0][1]["moerge"]["expert"] == "flaky" and events[1][1]["delta"] == "ok"
    assert events[-1][1]["code"] == "backend_stream_error" and "mid-stream" in events[-1][1]["message"]
    body = {"model": "flaky", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "stream": True}
    resp = httpx.post(gateway + "/v1/messages", json=body, timeout=30)
    assert resp.status_code == 200
    events = _sse(resp.text)
    assert [n for n, _ in events] == ["message_start", "error"]
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    for endpoint in ("responses", "messages"):  # accounted when the stream response closes, just after
        settled = rf'moerge_requests_total\{{endpoint="{endpoint}",[^}}]*status="502"\}} 1\.0'
        deadline = time.monotonic() + 10
        while not re.search(settled, metrics := httpx.get(gateway + "/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert f'moerge_requests_in_flight{{endpoint="{endpoint}"}} 0.0' in metrics


def test_response_ids_are_bounded_and_forgotten_least_recently_used() -> None:
    from serving.gateway import ResponseIds

    forgotten: list[tuple[str, str]] = []
    ids = ResponseIds(2, lambda rid, expert: forgotten.append((rid, expert)))
    ids.add("r1", "math", None)
    ids.add("r2", "code", "k")
    assert ids.holder("r1", None) == "math"  # used: r2 is now the oldest
    ids.add("r3", "math", None)
    assert forgotten == [("r2", "code")] and len(ids) == 2
    assert ids.holder("r2", "k") is None and ids.holder("r1", "other-key") is None
    off = ResponseIds(0, lambda rid, expert: forgotten.append((rid, expert)))
    off.add("r4", "math", None)
    assert off.holder("r4", None) is None


def test_no_backend_left_is_503(gateway: str) -> None:
    err = assert_openai_error(post(gateway, msg("lonely")), 503)
    assert err["code"] == "backend_unavailable"
    assert LOOPBACK not in err["message"] and "Connect" not in err["message"], "no internal address"
    err = assert_openai_error(post(gateway, msg("doomed")), 503)
    assert "exploded" not in err["message"] and err["message"].endswith("(tried: doomed failed)."), err


async def started(config: dict[str, Any]) -> Any:
    from serving.gateway import Gateway

    gw = Gateway(parse_config(config))
    await gw.start()
    return gw


async def test_readiness_needs_every_routing_model_servable(fakes: dict[str, ThreadedServer]) -> None:
    dead = f"http://{LOOPBACK}:{free_port()}/v1"
    experts = {
        "good": remote(fakes["ok"].url + "/v1"),
        "ghost": remote(dead, fallback="good"),
        "lonely": remote(dead),
    }
    routers = {
        "to-ghost": {"kind": "fixed", "params": {"expert": "ghost"}},
        "to-lonely": {"kind": "fixed", "params": {"expert": "lonely"}, "fallback": "lonely"},
    }
    gw = await started({"experts": experts, "routers": routers, "routing_models": {"auto": "to-ghost"}})
    try:
        ok, detail = gw.readiness()
        assert ok and detail["routing_models"] == {"auto": True} and not detail["backends"]["lonely"]["up"]
    finally:
        await gw.close()
    models = {"auto": "to-ghost", "solo": "to-lonely"}
    gw = await started({"experts": experts, "routers": routers, "routing_models": models})
    try:
        ok, detail = gw.readiness()
        assert not ok and detail["routing_models"] == {"auto": True, "solo": False}
    finally:
        await gw.close()
    gw = await started({"experts": {"lonely": experts["lonely"], "good": experts["good"]}})
    try:
        assert gw.readiness()[0], "no routing models: ready while some expert is up"
    finally:
        await gw.close()


async def test_fallback_chain_honours_the_key_and_is_bounded(fakes: dict[str, ThreadedServer]) -> None:
    dead = f"http://{LOOPBACK}:{free_port()}/v1"
    key = {"sha256": "0" * 64}
    config = {
        "experts": {
            "a": remote(dead, fallback="b"),
            "b": remote(dead, fallback="c"),
            "c": remote(dead, fallback="good"),
            "good": remote(fakes["ok"].url + "/v1"),
        },
        "routers": {"to-a": {"kind": "fixed", "params": {"expert": "a"}, "fallback": "a"}},
        "auth": {
            "keys": {
                "a-only": {**key, "models": ["a"]},
                "auto-only": {**key, "sha256": "1" * 64, "models": ["auto"]},
                "any": {**key, "sha256": "2" * 64},
            }
        },
        "retry": {"max_fallbacks": 2},
    }
    gw = await started(config)
    try:
        assert gw.fallback_chain("a") == ["a", "b", "c"], "at most two fallbacks"
        assert gw.fallback_chain("a", "a-only") == ["a"]
        assert gw.fallback_chain("a", "auto-only") == ["a", "b", "c"], "auto may be served by a's chain"
        assert gw.fallback_chain("a", "any") == ["a", "b", "c"]
    finally:
        await gw.close()


@pytest.fixture(scope="module")
def keyed_gateway(fakes: dict[str, ThreadedServer]) -> Iterator[str]:
    from serving.app import create_app
    from serving.auth import hash_key

    dead = f"http://{LOOPBACK}:{free_port()}/v1"
    config = parse_config(
        {
            "experts": {"good": remote(fakes["ok"].url + "/v1"), "ghost": remote(dead, fallback="good")},
            "routers": {"r": {"kind": "fixed", "params": {"expert": "ghost"}, "fallback": "ghost"}},
            "auth": {
                "keys": {
                    "ghost-only": {"sha256": hash_key("sk-ghost"), "models": ["ghost"]},
                    "auto-only": {"sha256": hash_key("sk-auto"), "models": ["auto"]},
                }
            },
            "circuit_breaker": {"health_interval_s": 0.5},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        yield server.url


def test_fallback_never_serves_a_model_the_key_may_not_use(keyed_gateway: str) -> None:
    """A key allowed only `ghost` is not answered by `good` when `ghost` is down; a key allowed `auto`
    is served by the chain of what `auto` decides."""
    resp = post(keyed_gateway, msg("ghost"), headers={"authorization": "Bearer sk-ghost"})
    assert_openai_error(resp, 503)
    resp = post(keyed_gateway, msg("auto"), headers={"authorization": "Bearer sk-auto"})
    assert resp.status_code == 200 and resp.headers["x-moerge-expert"] == "good"
    resp = post(keyed_gateway, msg("good"), headers={"authorization": "Bearer sk-auto"})
    assert_openai_error(resp, 403)


def test_metrics_on_their_own_port_and_docs_off(fakes: dict[str, ThreadedServer]) -> None:
    from serving.app import create_app

    port = free_port()
    config = parse_config(
        {
            "server": {"metrics_port": port, "docs": False},
            "experts": {"good": remote(fakes["ok"].url + "/v1")},
        }
    )
    assert config.server.max_concurrent_requests == 256, "a concurrency cap by default"
    with ThreadedServer(create_app(config)) as server:
        assert post(server.url, msg("good")).status_code == 200
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert_openai_error(httpx.get(server.url + path), 404)
        metrics = httpx.get(f"http://{LOOPBACK}:{port}/metrics").text
        assert 'moerge_backend_up{expert="good"} 1.0' in metrics, "gauges are fresh on the metrics port"
        assert 'moerge_requests_total{endpoint="chat",expert="good",model="good",status="200"} 1.0' in metrics
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{LOOPBACK}:{port}/metrics")


def test_cli_check(tmp_path: Path) -> None:
    app = typer.Typer()
    register_serve_commands(app)

    @app.callback()
    def main() -> None: ...

    good = tmp_path / "ok.yaml"
    good.write_text("experts:\n  a: {backend: openai, url: 'http://127.0.0.1:9/v1'}\n")
    result = CliRunner().invoke(app, ["serve", str(good), "--check"])
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  a: {backend: openai}\n")
    result = CliRunner().invoke(app, ["serve", str(bad), "--check"])
    assert result.exit_code == 2 and "experts.a.openai.url" in result.output


def test_port_helpers_bind_loopback_only() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind((LOOPBACK, port))
