"""The Responses and Messages APIs end to end, with the official `openai` and `anthropic` SDKs.

Against the session's real tiny engines (tests/conftest.py): `math` in-process (vLLM's own Responses
and Anthropic serving inside the gateway), `code` a `vllm serve` subprocess (passed through). And the
one request lifecycle: every way a request ends leaves one decision-log row (when it was routed) and
the in-flight gauge back at zero, for each endpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from sqlalchemy import select

from serving.app import create_app
from serving.config import parse_config
from serving.decision_log import decisions, make_engine
from tests.helpers import ThreadedServer, VllmServer, wait_http_ok

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]
EXPERTS = ["math", "code"]  # in-process, remote


@pytest.fixture(scope="session")
def claude(gateway: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120)


def moerge_of(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    assert "moerge" in extra, obj
    return dict(extra["moerge"])


# -- Responses ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", EXPERTS)
def test_responses_sync(client: openai.OpenAI, expert: str) -> None:
    raw = client.responses.with_raw_response.create(model=expert, input="2 + 2 =", max_output_tokens=6)
    resp = raw.parse()
    assert raw.headers["x-moerge-expert"] == expert and raw.headers["x-moerge-router"] == "direct"
    assert resp.object == "response" and resp.status in ("completed", "incomplete")
    assert isinstance(resp.output_text, str) and resp.output_text
    assert resp.usage is not None and 1 <= resp.usage.output_tokens <= 6
    ext = moerge_of(resp)
    assert ext["expert"] == expert and ext["request_id"] == raw.headers["x-moerge-request-id"]


def test_responses_routed_with_instructions(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="coder",
        instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "def f():"}]}],
        max_output_tokens=4,
    )
    assert raw.headers["x-moerge-expert"] == "code" and raw.headers["x-moerge-router"] == "fixed"
    assert moerge_of(raw.parse())["router_name"] == "to-code"


async def test_responses_async(aclient: openai.AsyncOpenAI) -> None:
    answers = await asyncio.gather(
        *(
            aclient.responses.create(model=m, input=f"count {i}", max_output_tokens=4)
            for i, m in enumerate(["math", "code", "auto", "auto"])
        )
    )
    experts = [moerge_of(a)["expert"] for a in answers]
    assert experts[:2] == ["math", "code"] and set(experts[2:]) <= {"math", "code"}
    assert all(a.output_text for a in answers)


@pytest.mark.parametrize("expert", EXPERTS)
def test_responses_stream(client: openai.OpenAI, expert: str) -> None:
    raw = client.responses.with_raw_response.create(
        model=expert, input="once upon", max_output_tokens=8, stream=True
    )
    assert raw.headers["x-moerge-expert"] == expert
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = list(raw.parse())
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert moerge_of(events[0])["expert"] == expert
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text
    assert final.usage is not None and final.usage.output_tokens >= 1


def test_responses_stream_helper(client: openai.OpenAI) -> None:
    """The SDK's `responses.stream` helper assembles the final response from the gateway's events."""
    with client.responses.stream(model="math", input="hello", max_output_tokens=5) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and final.output_text == text


@pytest.mark.parametrize("first", EXPERTS)
@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_goes_to_its_expert(client: openai.OpenAI, first: str, stream: bool) -> None:
    """A follow-up is served by the expert holding the conversation, whatever the model asks for."""
    start = client.responses.create(model=first, input="my name is Ada", max_output_tokens=4)
    assert moerge_of(start)["expert"] == first
    other = "code" if first == "math" else "math"
    for model in ("auto", "coder", other):
        raw = client.responses.with_raw_response.create(
            model=model,
            input="what is my name?",
            previous_response_id=start.id,
            max_output_tokens=4,
            stream=stream,
        )
        assert raw.headers["x-moerge-expert"] == first, model
        assert raw.headers["x-moerge-reason"] == "previous_response_id"
        if stream:
            events = list(raw.parse())
            assert events[-1].type == "response.completed"
            follow = events[-1].response
        else:
            follow = raw.parse()
        assert follow.previous_response_id == start.id and follow.output_text
    # A chain: the follow-up's own id is kept too.
    again = client.responses.create(
        model="auto", input="and again?", previous_response_id=follow.id, max_output_tokens=3
    )
    assert moerge_of(again)["expert"] == first


def test_previous_response_id_unknown_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(
            model="auto", input="x", previous_response_id="resp_nope", max_output_tokens=2
        )
    err = info.value.body
    assert isinstance(err, dict)
    assert err["code"] == "response_not_found" and err["param"] == "previous_response_id"
    assert "resp_nope" in err["message"]


def test_not_stored_response_is_not_kept(client: openai.OpenAI) -> None:
    start = client.responses.create(model="math", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="math", input="y", previous_response_id=start.id, max_output_tokens=2)


def test_responses_client_chosen_id_is_ignored(gateway: ThreadedServer, client: openai.OpenAI) -> None:
    """vLLM lets a request name its response id; the gateway drops it, so no client can take over (or
    overwrite) another conversation's id."""
    start = client.responses.create(model="math", input="x", max_output_tokens=2)
    resp = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "math", "input": "y", "max_output_tokens": 2, "request_id": start.id},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.json()["id"] != start.id


def test_responses_invalid_fields_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="math", input=[], max_output_tokens=2)
    assert info.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="math", input="x", background=True)
    assert info.value.body["param"] == "background"  # type: ignore[index]


# -- Messages (Anthropic) -------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", EXPERTS)
def test_messages_sync(claude: anthropic.Anthropic, expert: str) -> None:
    raw = claude.messages.with_raw_response.create(
        model=expert,
        max_tokens=6,
        system="You are terse.",
        messages=[{"role": "user", "content": "2 + 2 ="}],
    )
    msg = raw.parse()
    assert raw.headers["x-moerge-expert"] == expert
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text
    assert 1 <= msg.usage.output_tokens <= 6 and msg.usage.input_tokens >= 1
    assert moerge_of(msg)["expert"] == expert


def test_messages_routed(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model="coder", max_tokens=3, messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    )
    assert raw.headers["x-moerge-expert"] == "code" and raw.headers["x-moerge-router"] == "fixed"


@pytest.mark.parametrize("expert", EXPERTS)
def test_messages_stream(claude: anthropic.Anthropic, expert: str) -> None:
    with claude.messages.stream(
        model=expert, max_tokens=8, messages=[{"role": "user", "content": "once upon"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        assert stream.response.headers["x-moerge-expert"] == expert
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens >= 1


def test_messages_stream_events(claude: anthropic.Anthropic) -> None:
    events = list(
        claude.messages.create(
            model="math", max_tokens=4, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    assert "content_block_delta" in types and "message_delta" in types
    assert moerge_of(events[0])["expert"] == "math"


def test_messages_errors_in_anthropic_shape(claude: anthropic.Anthropic, gateway: ThreadedServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    resp = httpx.post(
        gateway.url + "/v1/messages", json={"model": "math", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    bad_json = httpx.post(
        gateway.url + "/v1/messages", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and bad_json.json()["type"] == "error"
    not_json = httpx.post(gateway.url + "/v1/messages", content=b"x", headers={"content-type": "text/plain"})
    assert not_json.status_code == 415 and not_json.json()["error"]["type"] == "invalid_request_error"


# -- tool calling (the in-process `math` expert has tool_call_parser: pythonic) -------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "pick",
            "description": "pick a number",
            "parameters": {
                "type": "object",
                "properties": {"n": {"enum": [1, 2, 3]}},
                "required": ["n"],
                "additionalProperties": False,
            },
        },
    }
]
NAMED = {"type": "function", "function": {"name": "pick"}}


def _stream_tool_calls(stream: Any) -> list[tuple[str, str]]:
    """(name, arguments) of the tool calls a chat stream sends in pieces."""
    calls: dict[int, list[str]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, ["", ""])
                call[0] += (tc.function and tc.function.name) or ""
                call[1] += (tc.function and tc.function.arguments) or ""
    return [(name, args) for name, args in calls.values()]


@pytest.mark.parametrize("tool_choice", ["required", "named"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_choice_required_and_named(client: openai.OpenAI, tool_choice: str, stream: bool) -> None:
    """The call is constrained to the tool's schema (vLLM's structured output), so even a tiny random
    model calls `pick` with valid arguments. Seeded (the engine's shared generator otherwise makes the
    answer depend on every request before it) and with room for a few calls: `required` lets the model go
    on adding calls, and at 64 tokens one sampled array was cut before it closed (no calls parsed)."""
    choice: Any = NAMED if tool_choice == "named" else "required"
    kw: dict[str, Any] = {
        "model": "math",
        "messages": [{"role": "user", "content": "pick"}],
        "max_tokens": 256,
        "seed": 1,
    }
    if stream:
        calls = _stream_tool_calls(
            client.chat.completions.create(**kw, tools=TOOLS, tool_choice=choice, stream=True)
        )
    else:
        resp = client.chat.completions.create(**kw, tools=TOOLS, tool_choice=choice)
        message = resp.choices[0].message
        calls = [(tc.function.name, tc.function.arguments) for tc in message.tool_calls or []]  # type: ignore[union-attr]
    assert calls and all(name == "pick" for name, _ in calls), calls
    assert all(json.loads(args)["n"] in (1, 2, 3) for _, args in calls), calls


# -- one lifecycle: every ending accounted once ---------------------------------------------------------
@pytest.fixture(scope="session")
def lifecycle_gateway(
    code_server: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ThreadedServer, Path]]:
    """The remote `code` engine and an expert whose backend is down (nothing listens on port 9)."""
    db = tmp_path_factory.mktemp("lifecycle") / "decisions.db"
    config = parse_config(
        {
            "experts": {
                "code": {"backend": "openai", "url": code_server.url + "/v1"},
                "dead": {"backend": "openai", "url": "http://127.0.0.1:9/v1"},
            },
            "routers": {"to-code": {"kind": "fixed", "params": {"expert": "code"}}},
            "routing_models": {"auto": "to-code"},
            "retry": {"attempts": 0},
            "decision_log": {"enabled": True, "url": f"sqlite:///{db}", "flush_interval_s": 0.05},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        wait_http_ok(server.url + "/ready", 60)
        yield server, db


def _bodies(endpoint: str, model: str, stream: bool) -> dict[str, Any]:
    if endpoint == "chat":
        return {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": stream,
        }
    if endpoint == "responses":
        return {"model": model, "input": "hi", "max_output_tokens": 3, "stream": stream}
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": stream,
    }


_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
# A request the gateway accepts but the engine refuses (400 after routing): a sampling value vLLM checks.
_ENGINE_REFUSES = {
    "chat": {"top_k": -7},
    "responses": {"top_k": -7},
    "messages": {"top_k": 1, "stop_sequences": [""]},
}


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry `labels` (among others)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _settled(server: ThreadedServer, endpoint: str) -> bool:
    """No request of `endpoint` open, and every decision-log row handed to the database."""
    gw = server.app.state.gateway
    metrics = httpx.get(server.url + "/metrics").text
    return (
        _metric(metrics, "moerge_requests_in_flight", endpoint=endpoint) == 0
        and not gw.accountant._tasks
        and gw.decision_log.pending() == 0
    )


@pytest.mark.parametrize("endpoint", ["chat", "responses", "messages"])
def test_every_ending_is_accounted_once(
    lifecycle_gateway: tuple[ThreadedServer, Path], endpoint: str
) -> None:
    """Success (JSON and stream), a client error after routing (the engine's 400), a backend failure
    (503, JSON and stream) and a client error before routing (400, no decision): each leaves exactly one
    decision-log row if it was routed, none if not, and the in-flight gauge back at zero."""
    server, db = lifecycle_gateway
    url = server.url + _PATHS[endpoint]
    routed: list[int] = []
    for stream in (False, True):
        ok = httpx.post(url, json=_bodies(endpoint, "auto", stream), timeout=60)
        assert ok.status_code == 200, ok.text
        routed.append(200)
        down = httpx.post(url, json=_bodies(endpoint, "dead", stream), timeout=60)
        assert down.status_code == 503, down.text
        routed.append(503)
    refused = httpx.post(
        url, json={**_bodies(endpoint, "code", False), **_ENGINE_REFUSES[endpoint]}, timeout=60
    )
    assert refused.status_code == 400, refused.text
    routed.append(400)
    unrouted = httpx.post(url, json={"model": "code"}, timeout=60)  # missing fields: refused before routing
    assert unrouted.status_code == 400
    if endpoint == "messages":
        assert down.json()["error"]["type"] == "overloaded_error" and refused.json()["type"] == "error"

    deadline = time.monotonic() + 60
    while not _settled(server, endpoint):  # a stream is accounted just after its last byte is sent
        assert time.monotonic() < deadline, "requests still open or rows not queued"
        time.sleep(0.05)
    engine = make_engine(f"sqlite:///{db}")
    rows: list[Any] = []
    while len(rows) < len(routed) and time.monotonic() < deadline:  # queued: wait for the writer
        with engine.connect() as conn:
            rows = list(conn.execute(select(decisions).where(decisions.c.endpoint == endpoint)))
        time.sleep(0.05)
    engine.dispose()
    assert sorted(r.status for r in rows) == sorted(routed), rows
    assert {r.served_expert for r in rows if r.status == 503} == {None}
    assert {r.served_expert for r in rows if r.status != 503} == {"code"}
    assert all(r.tokens_out for r in rows if r.status == 200)
    metrics = httpx.get(server.url + "/metrics").text
    assert _metric(metrics, "moerge_requests_in_flight", endpoint=endpoint) == 0
    for status, n in (("200", 2), ("503", 2), ("400", 2)):
        assert _metric(metrics, "moerge_requests_total", endpoint=endpoint, status=status) == n, status


# -- the OpenAPI document --------------------------------------------------------------------------------
def test_openapi_describes_responses_and_messages(gateway: ThreadedServer) -> None:
    doc = httpx.get(gateway.url + "/openapi.json").json()
    for path, schema in (("/v1/responses", "ResponsesRequest"), ("/v1/messages", "MessagesRequest")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
        assert {"400", "404", "503"} <= set(op["responses"])
    assert "previous_response_id" in doc["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert "max_tokens" in doc["components"]["schemas"]["MessagesRequest"]["required"]


# -- keys and caps ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def keyed_gateway(code_server: VllmServer) -> Iterator[ThreadedServer]:
    """The remote `code` engine behind two API keys and a 4-token cap."""
    from serving.auth import hash_key

    config = parse_config(
        {
            "server": {"max_tokens": 4},
            "experts": {"code": {"backend": "openai", "url": code_server.url + "/v1"}},
            "auth": {"keys": {"a": {"sha256": hash_key("sk-a")}, "b": {"sha256": hash_key("sk-b")}}},
        }
    )
    with ThreadedServer(create_app(config)) as server:
        wait_http_ok(server.url + "/ready", 60)
        yield server


def test_anthropic_sdk_key_header_and_auth_errors(keyed_gateway: ThreadedServer) -> None:
    """The Anthropic SDK sends its key as `x-api-key`; a wrong key is Anthropic's authentication_error."""
    ok = anthropic.Anthropic(base_url=keyed_gateway.url, api_key="sk-a", max_retries=0)
    msg = ok.messages.create(model="code", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert msg.usage.output_tokens <= 2
    bad = anthropic.Anthropic(base_url=keyed_gateway.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="code", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_previous_response_belongs_to_its_key_and_caps_apply(keyed_gateway: ThreadedServer) -> None:
    a = openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="sk-a", max_retries=0)
    b = openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="sk-b", max_retries=0)
    first = a.responses.create(model="code", input="tell me a long story")  # capped at 4 tokens
    assert first.usage is not None and first.usage.output_tokens <= 4
    assert a.responses.create(model="code", input="go on", previous_response_id=first.id).output_text
    with pytest.raises(openai.NotFoundError):  # another key cannot continue (or read) it
        b.responses.create(model="code", input="go on", previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError) as info:
        a.responses.create(model="code", input="x", max_output_tokens=10)
    assert info.value.body["param"] == "max_output_tokens"  # type: ignore[index]
