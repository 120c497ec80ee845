"""Soak test: N minutes of concurrent OpenAI-SDK load against `moerge serve` with a tiny in-process model.

Not part of the test suite (it runs for minutes). The gateway runs as its own process (`python -m
serving serve`) with the production features on: an A/B experiment with a shadow router, the decision
log (SQLite), API keys with rate limits, the concurrency cap, JSON logs. The load mixes chat and
completions, streaming and not, sticky users, and feedback posts. Reported: requests by status, 5xx
count, client errors, resident memory of the gateway process (and of vLLM's engine-core child) at
start, after warm-up and at the end, growth after warm-up, and decision-log rows written vs requests.

    .venv/bin/python bench/soak.py --minutes 10 [--concurrency 16] [--out runs/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.auth import hash_key  # noqa: E402
from tests.helpers import LOOPBACK, free_port, wait_http_ok  # noqa: E402

KEY = "sk-moerge-soak"
PROMPTS = [
    "What is 12 + 30?",
    "def total(items):",
    "Tell me a story about a river.",
    "If we compute 7 * 8",
    "Write a letter to a friend about the summer.",
    "for x in range(10):",
]


def write_config(zoo_expert: Path, work: Path, port: int) -> Path:
    config = {
        "server": {
            "host": LOOPBACK,
            "port": port,
            "log_level": "warning",
            "log_format": "json",
            "max_concurrent_requests": 256,
            "drain_s": 10,
        },
        "experts": {
            "math": {
                "backend": "vllm",
                "model": str(zoo_expert),
                "engine_args": {"max_model_len": 256, "enforce_eager": True},
            }
        },
        "routers": {
            "fixed-math": {"kind": "fixed", "params": {"expert": "math"}},
            "coin": {"kind": "random"},
        },
        "experiments": {
            "soak-ab": {
                "arms": {
                    "control": {"router": "fixed-math", "weight": 1},
                    "treatment": {"router": "coin", "weight": 1},
                },
                "assign_by": "user",
                "shadow": ["coin"],
            }
        },
        "routing_models": {"auto": "soak-ab"},
        "decision_log": {"enabled": True, "url": f"sqlite:///{work / 'decisions.db'}"},
        "auth": {
            "keys": {
                "soak": {
                    "sha256": hash_key(KEY),
                    "requests_per_minute": 1_000_000,
                    "tokens_per_minute": 100_000_000,
                }
            }
        },
    }
    path = work / "serve-soak.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rss_mib(proc: psutil.Process) -> tuple[float, float]:
    """(gateway process, its children) resident memory in MiB."""
    own = proc.memory_info().rss
    kids = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            kids += child.memory_info().rss
    return own / 2**20, kids / 2**20


async def worker(
    client: openai.AsyncOpenAI,
    http: httpx.AsyncClient,
    url: str,
    rng: random.Random,
    stop: float,
    stats: Counter[str],
) -> None:
    while time.monotonic() < stop:
        kind = rng.choices(["chat", "chat-stream", "completion", "completion-stream"], [4, 3, 2, 1])[0]
        user = f"user-{rng.randrange(1000)}"
        prompt = rng.choice(PROMPTS)
        max_tokens = rng.randint(4, 32)
        try:
            rid = None
            if kind == "chat":
                raw = await client.chat.completions.with_raw_response.create(
                    model="auto",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    user=user,
                )
                raw.parse()
                rid = raw.headers.get("x-moerge-request-id")
            elif kind == "chat-stream":
                stream = await client.chat.completions.create(
                    model="auto",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    user=user,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                rid = stream.response.headers.get("x-moerge-request-id")
                async for _ in stream:
                    pass
            elif kind == "completion":
                await client.completions.create(model="auto", prompt=prompt, max_tokens=max_tokens, user=user)
            else:
                stream = await client.completions.create(
                    model="auto", prompt=prompt, max_tokens=max_tokens, user=user, stream=True
                )
                async for _ in stream:
                    pass
            stats["200"] += 1
            if rid and rng.random() < 0.2:
                resp = await http.post(
                    url + "/v1/feedback",
                    json={"request_id": rid, "score": rng.random(), "label": rng.choice(["good", "bad"])},
                    headers={"authorization": f"Bearer {KEY}"},
                )
                stats[f"feedback-{resp.status_code}"] += 1
        except openai.APIStatusError as err:
            stats[str(err.status_code)] += 1
        except Exception as err:  # connection errors, timeouts: counted, never fatal
            stats[f"client-error:{type(err).__name__}"] += 1


async def load(
    url: str, gateway: psutil.Process, minutes: float, warmup_s: float, concurrency: int
) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    http = httpx.AsyncClient(timeout=30)
    stats: Counter[str] = Counter()
    start = time.monotonic()
    stop = start + minutes * 60
    samples: list[dict[str, float]] = []

    async def sample() -> None:
        while time.monotonic() < stop:
            own, kids = rss_mib(gateway)
            samples.append(
                {
                    "t": time.monotonic() - start,
                    "gateway_mib": own,
                    "children_mib": kids,
                    "requests": sum(stats.values()),
                }
            )
            await asyncio.sleep(5)

    rngs = [random.Random(1000 + i) for i in range(concurrency)]
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(worker(client, http, url, rngs[i], stop, stats) for i in range(concurrency)))
    await sampler
    own, kids = rss_mib(gateway)
    samples.append(
        {
            "t": time.monotonic() - start,
            "gateway_mib": own,
            "children_mib": kids,
            "requests": sum(stats.values()),
        }
    )
    await client.close()
    await http.aclose()
    first = samples[0]
    warm = next((s for s in samples if s["t"] >= warmup_s), samples[-1])
    end = samples[-1]
    requests = sum(v for k, v in stats.items() if not k.startswith("feedback"))
    return {
        "duration_s": round(end["t"], 1),
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": round(requests / end["t"], 2),
        "by_status": dict(stats),
        "5xx": sum(v for k, v in stats.items() if k[:1] == "5" or k.startswith("feedback-5")),
        "rss_gateway_mib": {
            "start": round(first["gateway_mib"], 1),
            "after_warmup": round(warm["gateway_mib"], 1),
            "end": round(end["gateway_mib"], 1),
            "max": round(max(s["gateway_mib"] for s in samples), 1),
        },
        "rss_gateway_growth_after_warmup_pct": round(
            100 * (end["gateway_mib"] - warm["gateway_mib"]) / warm["gateway_mib"], 2
        ),
        "rss_children_mib": {
            "start": round(first["children_mib"], 1),
            "after_warmup": round(warm["children_mib"], 1),
            "end": round(end["children_mib"], 1),
        },
        "rss_children_growth_after_warmup_pct": round(
            100 * (end["children_mib"] - warm["children_mib"]) / max(warm["children_mib"], 1e-9), 2
        ),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured from here")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "soak" / "tiny-zoo")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here too")
    args = ap.parse_args()

    from merge.tiny import build_tiny_zoo

    zoo = build_tiny_zoo(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="moerge-soak-"))
    port = free_port()
    config = write_config(zoo.experts["math"], work, port)
    log_path = work / "gateway.log"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "serve", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http_ok(url + "/ready", 600, proc)  # type: ignore[arg-type]
        result = asyncio.run(
            load(url, psutil.Process(proc.pid), args.minutes, args.warmup_s, args.concurrency)
        )
        metrics = httpx.get(url + "/metrics", timeout=10).text
        result["decision_log_dropped"] = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("moerge_decision_log_dropped_total")
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result_code = proc.wait()
    with sqlite3.connect(work / "decisions.db") as db:
        result["decision_log_rows"] = db.execute("select count(*) from moerge_decisions").fetchone()[0]
        result["feedback_rows"] = db.execute("select count(*) from moerge_feedback").fetchone()[0]
    result["gateway_exit_code"] = result_code
    result["work_dir"] = str(work)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    report = subprocess.run(
        [str(Path(sys.executable).parent / "moerge"), "ab", "report", "soak-ab", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print(report.stdout or report.stderr)


if __name__ == "__main__":
    main()
