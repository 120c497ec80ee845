"""Serving overhead benchmark: the same load against `vllm serve` directly, moerge in front of it, and
(optionally) LiteLLM's proxy in front of it, in one run.

    .venv/bin/python bench/serving_bench.py                       # tiny zoo model, direct vs moerge
    .venv/bin/python bench/serving_bench.py --litellm /tmp/litellm-venv/bin/litellm --vllm-bench

moerge runs with routing on (model `auto`, a random router over two expert names served by the same
backend), so the routing decision is inside the measured overhead. Targets are run back to back per load
level, in rotating order, with the same prompts; the report gives added latency (p50/p99), time to first
token and throughput as ratios to direct. Results: runs/serving-bench/results.{json,md}.
Not a test: numbers depend on the machine (here the backend, the gateway and the load generator share
the same CPU cores, so any CPU the gateway uses is taken from the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import LOOPBACK, VllmServer, free_port, wait_http_ok  # noqa: E402

KEY = "sk-bench-" + secrets.token_hex(16)  # LiteLLM refuses to start without a master key
AUTH = {"Authorization": f"Bearer {KEY}"}  # sent to every target alike
PROMPTS = [f"If we compute {a} + {b} we get" for a in range(7) for b in range(7)]


@dataclass
class Level:
    target: str
    mode: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu_s: float | None = None  # CPU time the proxy process spent (None for direct)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ttft = sorted(self.ttfts)
        return {
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": len(lat),
            "errors": self.errors,
            "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "ttft_p50_ms": pct(ttft, 50) * 1e3 if ttft else None,
            "req_per_s": len(lat) / self.wall if self.wall else 0.0,
            "tok_per_s": self.tokens / self.wall if self.wall else 0.0,
            "proxy_cpu_ms_per_req": (self.cpu_s / len(lat) * 1e3) if self.cpu_s is not None and lat else None,
        }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    stream: bool,
    max_tokens: int,
    level: Level,
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                level.errors += 1
                return
            if not stream:
                data = await resp.json()
                level.tokens += data["usage"]["completion_tokens"]
            else:
                first = None
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        if not event.startswith(b"data: {"):
                            continue
                        data = json.loads(event[6:])
                        if first is None and any(
                            c.get("delta", {}).get("content") for c in data.get("choices", [])
                        ):
                            first = time.perf_counter()
                        if data.get("usage"):
                            level.tokens += data["usage"]["completion_tokens"]
                if first is not None:
                    level.ttfts.append(first - start)
    except (TimeoutError, aiohttp.ClientError):
        level.errors += 1
        return
    level.latencies.append(time.perf_counter() - start)


async def run_level(url: str, model: str, level: Level, n: int, max_tokens: int) -> None:
    stream = level.mode == "stream"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300), headers=AUTH
    ) as session:
        # warm-up: one round at this concurrency, not measured
        warm = Level(level.target, level.mode, level.concurrency)
        await asyncio.gather(
            *(
                one_request(session, url, model, PROMPTS[i % len(PROMPTS)], stream, max_tokens, warm)
                for i in range(level.concurrency)
            )
        )
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await one_request(session, url, model, PROMPTS[i % len(PROMPTS)], stream, max_tokens, level)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(level.concurrency)))
        level.wall = time.perf_counter() - start


async def run_paired(
    targets: dict[str, tuple[str, str]], levels: dict[str, Level], n: int, max_tokens: int
) -> dict[str, list[float]]:
    """Concurrency 1, requests interleaved across targets (rotating order): each moerge/LiteLLM request has a
    direct request next to it in time, so machine noise hits both alike; returns the per-pair differences."""
    names = list(targets)
    stream = next(iter(levels.values())).mode == "stream"
    diffs: dict[str, list[float]] = {name: [] for name in names if name != "direct"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), headers=AUTH, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        for name in names:  # warm-up
            url, model = targets[name]
            await one_request(session, url, model, PROMPTS[0], stream, max_tokens, Level(name, "warm", 1))
        start = time.perf_counter()
        for i in range(n):
            order = names[i % len(names) :] + names[: i % len(names)]
            got: dict[str, float] = {}
            for name in order:
                url, model = targets[name]
                before = len(levels[name].latencies)
                await one_request(
                    session, url, model, PROMPTS[i % len(PROMPTS)], stream, max_tokens, levels[name]
                )
                if len(levels[name].latencies) > before:
                    got[name] = levels[name].latencies[-1]
            for name in diffs:
                if name in got and "direct" in got:
                    diffs[name].append(got[name] - got["direct"])
        wall = time.perf_counter() - start
    for level in levels.values():
        level.wall += wall / len(names)
    return diffs


def start_moerge(backend_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "server": {"host": LOOPBACK, "port": port, "log_level": "info"},
        "experts": {
            "a": {"backend": "openai", "url": backend_url + "/v1"},
            "b": {"backend": "openai", "url": backend_url + "/v1"},
        },
        "routers": {"rand": {"kind": "random", "params": {"seed": 0}}},
        "routing_models": {"auto": "rand"},
    }
    path = workdir / "moerge.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(workdir / "moerge.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "serve", str(path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{port}"
    wait_http_ok(url + "/ready", 120, proc)
    return proc, url


def start_litellm(binary: str, backend_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": "auto",
                "litellm_params": {
                    "model": "hosted_vllm/a",
                    "api_base": backend_url + "/v1",
                    "api_key": "none",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "set_verbose": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": KEY}
    with open(workdir / "litellm.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, "--config", str(path), "--host", LOOPBACK, "--port", str(port), "--num_workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{port}"
    wait_http_ok(url + "/health/liveliness", 180, proc)
    return proc, url


def cpu_seconds(pid: int | None) -> float:
    """user+system CPU time of a process and its children (what the proxy costs, whatever the scheduling)."""
    if pid is None:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def vllm_bench(base_url: str, model: str, tokenizer: str, workdir: Path, label: str) -> str:
    """vLLM's own load generator (`vllm bench serve`), unchanged, against `base_url`."""
    code = (
        "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
        "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); "
        "main(p.parse_args(sys.argv[1:]))"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        "24",
        "--random-output-len",
        "16",
        "--num-prompts",
        "64",
        "--max-concurrency",
        "8",
        "--seed",
        "0",
        "--save-result",
        "--result-dir",
        str(workdir),
        "--result-filename",
        f"vllm-bench-{label}.json",
    ]
    out = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=600)
    result = workdir / f"vllm-bench-{label}.json"
    if out.returncode != 0 or not result.exists():
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-30:])
        return f"vllm bench serve against {label} FAILED (rc={out.returncode}):\n{tail}"
    data = json.loads(result.read_text())
    keys = [
        "completed",
        "failed",
        "request_throughput",
        "output_throughput",
        "median_ttft_ms",
        "median_tpot_ms",
        "median_e2el_ms",
    ]
    return f"vllm bench serve against {label}: " + json.dumps({k: data[k] for k in keys if k in data})


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | conc | target | p50 ms | p99 ms | added p50 ms | added p99 ms | TTFT p50 ms | TTFT ratio "
        "| req/s | throughput ratio | proxy CPU ms/req | errors |",
        "|" + "---|" * 13,
    ]
    direct = {(r["mode"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = direct[(r["mode"], r["concurrency"])]
        ttft_ratio = (r["ttft_p50_ms"] / d["ttft_p50_ms"]) if r["ttft_p50_ms"] and d["ttft_p50_ms"] else None
        ttft = "" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.2f}"
        cpu = "" if r["proxy_cpu_ms_per_req"] is None else f"{r['proxy_cpu_ms_per_req']:.2f}"
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['target']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r.get('paired_added_p50_ms', r['p50_ms'] - d['p50_ms']):+.2f} | {r['p99_ms'] - d['p99_ms']:+.2f} | "
            f"{ttft} | "
            f"{'' if ttft_ratio is None else f'{ttft_ratio:.3f}'} | {r['req_per_s']:.1f} | "
            f"{r['req_per_s'] / d['req_per_s']:.3f} | {cpu} | {r['errors']} |"
        )
    lines.append(
        "\nAt concurrency 1, requests to the targets are interleaved and `added p50` is the median of "
        "paired differences (target − the direct request next to it); elsewhere it is p50(target) − "
        "p50(direct). Throughput ratio = req/s ÷ direct req/s. Proxy CPU ms/req: user+system CPU time of the "
        "proxy process (warm-up included) per measured request — independent of scheduling noise."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint served by vllm serve (default: the tiny zoo's math expert)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(100, 10 x conc))"
    )
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--rounds", type=int, default=2, help="repeat each level this many times, rotating targets"
    )
    ap.add_argument("--modes", nargs="+", default=["nonstream", "stream"])
    ap.add_argument("--litellm", help="path to LiteLLM's `litellm` binary (its own virtualenv)")
    ap.add_argument("--vllm-bench", action="store_true", help="also run `vllm bench serve` against moerge")
    ap.add_argument("--out", default=str(ROOT / "runs" / "serving-bench"))
    ap.add_argument(
        "--pin",
        action="store_true",
        help="backend on CPU 0, proxies and load generator on the other CPUs: as with a GPU backend, the "
        "gateway then competes with the load generator, not with the engine, for CPU",
    )
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        ap.error("--pin needs at least 2 CPUs")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from merge.tiny import build_tiny_zoo

        model = str(build_tiny_zoo(ROOT / ".cache" / "tiny-zoo").experts["math"])
    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    pin_env = {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[0])} if args.pin else None
    backend = VllmServer(model, ["a", "b"], max_model_len=256, log_path=workdir / "vllm.log", env=pin_env)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.pin:  # the backend (and the engine core it spawns) inherit CPU 0; everything after, the rest
            os.sched_setaffinity(0, {cpus[0]})
            backend.start()
            os.sched_setaffinity(0, set(cpus[1:]))
        else:
            backend.start()
        backend.wait_ready()
        moerge, moerge_url = start_moerge(backend.url, workdir)
        procs.append(moerge)
        targets = {"direct": (backend.url, "a"), "moerge": (moerge_url, "auto")}
        pids: dict[str, int | None] = {"direct": None, "moerge": moerge.pid}
        if args.litellm:
            litellm, litellm_url = start_litellm(args.litellm, backend.url, workdir)
            procs.append(litellm)
            targets["litellm"] = (litellm_url, "auto")
            pids["litellm"] = litellm.pid
        levels: dict[tuple[str, str, int], Level] = {}
        paired: dict[tuple[str, str], list[float]] = {}
        names = list(targets)
        for mode in args.modes:
            for conc in args.concurrency:
                n = args.requests or max(100, 10 * conc)
                if conc == 1:
                    lv = {name: levels.setdefault((name, mode, 1), Level(name, mode, 1)) for name in names}
                    cpu0 = {name: cpu_seconds(pids[name]) for name in names}
                    diffs = asyncio.run(run_paired(targets, lv, n * args.rounds, args.max_tokens))
                    for name in names:
                        if pids[name] is not None:
                            lv[name].cpu_s = cpu_seconds(pids[name]) - cpu0[name]
                    for name, d in diffs.items():
                        paired[(name, mode)] = d
                        print(
                            f"{mode:9s} c=1   paired   {name:8s} added p50={pct(sorted(d), 50) * 1e3:+.2f} ms",
                            flush=True,
                        )
                    continue
                for rnd in range(args.rounds):
                    order = names[rnd % len(names) :] + names[: rnd % len(names)]
                    for name in order:
                        url, model_name = targets[name]
                        level = levels.setdefault((name, mode, conc), Level(name, mode, conc))
                        part = Level(name, mode, conc)
                        cpu0 = cpu_seconds(pids[name])
                        asyncio.run(run_level(url, model_name, part, n, args.max_tokens))
                        if pids[name] is not None:
                            level.cpu_s = (level.cpu_s or 0.0) + cpu_seconds(pids[name]) - cpu0
                        level.latencies += part.latencies
                        level.ttfts += part.ttfts
                        level.tokens += part.tokens
                        level.errors += part.errors
                        level.wall += part.wall
                        print(
                            f"{mode:9s} c={conc:<3d} round {rnd} {name:8s} "
                            f"p50={pct(sorted(part.latencies), 50) * 1e3:7.2f} ms "
                            f"req/s={len(part.latencies) / part.wall:7.1f} errors={part.errors}",
                            flush=True,
                        )
        rows = [lv.summary() for lv in levels.values()]
        for row in rows:
            d = paired.get((row["target"], row["mode"]))
            if d and row["concurrency"] == 1:
                row["paired_added_p50_ms"] = pct(sorted(d), 50) * 1e3
                row["paired_added_p90_ms"] = pct(sorted(d), 90) * 1e3
        rows.sort(key=lambda r: (r["mode"], r["concurrency"], names.index(r["target"])))
        table = report(rows)
        extra = ""
        if args.vllm_bench:
            extra = "\n\n```\n" + vllm_bench(moerge_url, "auto", model, out, "moerge") + "\n```\n"
            extra += "\n```\n" + vllm_bench(backend.url, "a", model, out, "direct") + "\n```\n"
        meta = {
            "model": model,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "litellm": bool(args.litellm),
            "pinned": {"backend": cpus[0], "rest": cpus[1:]} if args.pin else None,
        }
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "results.md").write_text(f"# serving overhead\n\n{json.dumps(meta)}\n\n{table}\n{extra}")
        print(table)
        print(extra)
        print(f"results: {out}/results.md  logs: {workdir}")
    finally:
        for proc in procs:
            stop(proc)
        backend.kill(signal.SIGTERM)


if __name__ == "__main__":
    main()
