"""The LoRA engine's admission gate: requests with prompt logprobs run alone (vLLM 0.32 fails a LoRA batch
of several such requests), everything else shares the engine. No engine here: the gate alone; the real
engine's side is tests/test_lora_serving.py::test_prompt_logprobs_beside_adapter_traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.backends.base import StreamResult
from serving.backends.lora import AloneGate, runs_alone


@pytest.mark.parametrize(
    ("payload", "alone"),
    [
        ({"prompt": "x"}, False),
        ({"prompt": "x", "logprobs": 1}, False),
        ({"prompt": "x", "prompt_logprobs": 0}, True),
        ({"prompt": "x", "echo": True, "logprobs": 0}, True),
        ({"prompt": "x", "echo": True}, False),
        ({"messages": [], "echo": True, "top_logprobs": 2}, True),
        ({"messages": [], "prompt_logprobs": None}, False),
    ],
)
def test_runs_alone(payload: dict, alone: bool) -> None:
    assert runs_alone(payload) is alone


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_alone_waits_for_running_and_holds_new_ones_back() -> None:
    gate = AloneGate()
    await gate.enter(False)
    await gate.enter(False)
    alone = asyncio.create_task(gate.enter(True))
    await settle()
    assert not alone.done()  # two ordinary requests still run
    later = asyncio.create_task(gate.enter(False))
    await settle()
    assert not later.done()  # held back while the alone one waits
    gate.leave(False)
    await settle()
    assert not alone.done()
    gate.leave(False)
    await settle()
    assert alone.done() and gate.alone and gate.running == 1
    assert not later.done()  # still out while the alone one runs
    gate.leave(True)
    await settle()
    assert later.done() and not gate.alone and gate.running == 1


async def test_two_alone_requests_take_turns() -> None:
    gate = AloneGate()
    await gate.enter(True)
    second = asyncio.create_task(gate.enter(True))
    await settle()
    assert not second.done()
    gate.leave(True)
    await settle()
    assert second.done() and gate.running == 1


async def test_a_cancelled_alone_waiter_lets_the_others_in() -> None:
    gate = AloneGate()
    await gate.enter(False)
    alone = asyncio.create_task(gate.enter(True))
    await settle()
    later = asyncio.create_task(gate.enter(False))
    await settle()
    assert not later.done()
    alone.cancel()
    await settle()
    assert later.done() and gate.waiting_alone == 0 and gate.running == 2


async def test_a_timed_out_alone_waiter_lets_the_others_in() -> None:
    gate = AloneGate()
    await gate.enter(False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(gate.enter(True), 0.05)
    await asyncio.wait_for(gate.enter(False), 1)
    assert gate.running == 2 and gate.waiting_alone == 0


def stream(chunks: list[bytes], closed: list[bool]) -> StreamResult:
    async def rest() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def close() -> None:
        closed.append(True)

    return StreamResult(b"first", rest(), close)


async def test_a_stream_holds_its_place_until_it_ends() -> None:
    gate = AloneGate()
    await gate.enter(False)
    held = gate.hold_stream(stream([b"a", b"b"], []), False)
    alone = asyncio.create_task(gate.enter(True))
    await settle()
    assert not alone.done()
    assert [c async for c in held.rest] == [b"a", b"b"]
    await settle()
    assert alone.done()
    await held.close()  # after the end: released once only
    assert gate.running == 1


async def test_a_closed_stream_releases_once() -> None:
    gate = AloneGate()
    await gate.enter(True)
    closed: list[bool] = []
    held = gate.hold_stream(stream([b"a"], closed), True)
    await held.close()
    await held.close()
    assert closed == [True, True] and gate.running == 0 and not gate.alone
