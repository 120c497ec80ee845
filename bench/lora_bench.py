"""LoRA serving benchmark: one engine with N adapters against N separate engines, on the same base.

    .venv/bin/python bench/lora_bench.py                 # N = 3 and 8, tiny base (hidden 128)
    .venv/bin/python bench/lora_bench.py --n 3 --requests 48

In one run, each a `vllm serve` process (the server moerge's remote backends talk to):
  plain      the base on an engine without LoRA (the throughput reference)
  lora-N     one engine with N adapters (`--enable-lora --max-loras N --lora-modules ...`)
  separate-N N engines, each serving one adapter merged into the base (peft's merge_and_unload), the way
             a library of N experts is served without multi-LoRA
Each lora-N engine runs while the plain one is still up, and the two are loaded in alternating rounds
(`--rounds`, medians kept: `paired_tput_x_plain`), so that ratio is measured under the same background
load. Requests are spread evenly over the adapters (round robin), `--concurrency` at once (default 8), greedy,
`--tokens` tokens each (ignore_eos). Reported: total RSS and PSS of the engines' process trees after the
load, start-up time (launch → /health OK; the separate engines start together), throughput (generated
tokens/s) and p50 latency, with the ratios the issue asks for. Results: runs/lora-bench/results.{json,md}.
N separate engines that would not fit (N x a plain engine's PSS > --memory-share of the available memory)
are skipped and shown as that estimate.
Not a test: the numbers depend on the machine (2 shared cores here: engines and load generator compete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import VllmServer  # noqa: E402

DOMAINS = ["math", "code", "text"]
PROMPTS = [f"If we compute {a} + {b} we get" for a in range(9) for b in range(9)]
# per engine: every engine gets the same small KV cache
COMMON = ["--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 2**20), "--max-num-seqs", "16"]


def build_inputs(work: Path, n_max: int) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The tiny base, n_max peft adapters (domains in turn, different seeds) and each one merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge.tiny import build_tiny_zoo
    from merge.tiny_lora import build_tiny_adapters

    zoo = build_tiny_zoo(work / "zoo")
    names = {f"a{i}": DOMAINS[i % len(DOMAINS)] for i in range(n_max)}
    adapters = build_tiny_adapters(zoo.base, work / "adapters", names, steps=10)
    merged = {}
    tok = AutoTokenizer.from_pretrained(zoo.base)
    for name, path in adapters.items():
        out = work / "merged" / name
        if not (out / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
            PeftModel.from_pretrained(model, str(path)).merge_and_unload().save_pretrained(out)
            tok.save_pretrained(out)
        merged[name] = out
    return zoo.base, adapters, merged


def server(model: Path, names: list[str], extra: list[str]) -> VllmServer:
    """`vllm serve` with the bench's own KV budget (--kv-cache-memory-bytes, not VLLM_CPU_KVCACHE_SPACE)."""
    s = VllmServer(model, names, extra_args=[*COMMON, *extra])
    s.env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return s


def tree_memory(proc: Any) -> tuple[float, float]:
    """RSS and PSS (MiB) of a process and its children (PSS shares common pages out fairly)."""
    rss = pss = 0.0
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        rss += full.rss / 2**20
        pss += getattr(full, "pss", full.rss) / 2**20
    return rss, pss


def start(servers: list[VllmServer]) -> float:
    t0 = time.monotonic()
    for s in servers:
        s.start()
    for s in servers:
        s.wait_ready(900)
    return time.monotonic() - t0


async def load(
    targets: list[tuple[str, str]], requests: int, concurrency: int, tokens: int
) -> dict[str, float]:
    """`requests` completions over `targets` (url, model) round robin, `concurrency` at once."""
    jobs = [(*targets[i % len(targets)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    return await completion_load(jobs, concurrency, tokens)


async def completion_load(
    jobs: list[tuple[str, str, str]], concurrency: int, tokens: int
) -> dict[str, float]:
    """Each (url, model, prompt) of `jobs` once, `concurrency` at once: greedy, `tokens` tokens each
    (ignore_eos), after one warm-up request per (url, model) (loads every adapter into its slot)."""
    latencies: list[float] = []
    generated = 0
    queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal generated
        while not queue.empty():
            url, model, prompt = queue.get_nowait()
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{model} at {url}: HTTP {resp.status}: {data}")
            latencies.append(time.perf_counter() - t0)
            generated += data["usage"]["completion_tokens"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for url, model in dict.fromkeys((url, model) for url, model, _ in jobs):
            async with session.post(
                url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}
            ) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tok_per_s": generated / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "requests": len(latencies),
    }


def run_config(
    label: str,
    servers: list[VllmServer],
    targets: list[tuple[str, str]] | None,
    args: argparse.Namespace,
    keep: bool = False,
) -> dict[str, Any]:
    print(f"[{label}] starting {len(servers)} engine(s)", flush=True)
    try:
        startup = start(servers)
        urls = targets or [(s.url, s.argv[s.argv.index("--served-model-name") + 1]) for s in servers]
        result = asyncio.run(load(urls, args.requests, args.concurrency, args.tokens))
        rss, pss = map(sum, zip(*(tree_memory(s.proc) for s in servers), strict=True))
    finally:
        for s in servers:
            if not keep:
                s.kill(signal.SIGTERM)
    row = {
        "config": label,
        "engines": len(servers),
        "startup_s": round(startup, 1),
        "rss_mib": round(rss, 1),
        "pss_mib": round(pss, 1),
        **{k: round(v, 2) for k, v in result.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def paired(
    label: str,
    lora: VllmServer,
    targets: list[tuple[str, str]],
    plain: list[tuple[str, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The LoRA engine and the plain one (already up) loaded in alternating rounds, medians kept: the
    throughput ratio is measured under the same background load (this machine's cores are shared)."""
    print(f"[{label}] starting 1 engine; {args.rounds} rounds alternating with plain", flush=True)
    try:
        startup = start([lora])
        runs: dict[str, list[dict[str, float]]] = {"lora": [], "plain": []}
        for _ in range(args.rounds):
            for which, urls in (("plain", plain), ("lora", targets)):
                runs[which].append(asyncio.run(load(urls, args.requests, args.concurrency, args.tokens)))
        rss, pss = tree_memory(lora.proc)
    finally:
        lora.kill(signal.SIGTERM)

    def med(which: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[which])

    row = {
        "config": label,
        "engines": 1,
        "startup_s": round(startup, 1),
        "rss_mib": round(rss, 1),
        "pss_mib": round(pss, 1),
        "tok_per_s": round(med("lora", "tok_per_s"), 2),
        "p50_ms": round(med("lora", "p50_ms"), 2),
        "paired_plain_tok_per_s": round(med("plain", "tok_per_s"), 2),
        "paired_tput_x_plain": round(med("lora", "tok_per_s") / med("plain", "tok_per_s"), 3),
        "rounds": {k: [round(r["tok_per_s"], 1) for r in v] for k, v in runs.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "lora-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lora-bench")
    ap.add_argument("--rounds", type=int, default=3, help="alternating LoRA/plain load rounds per N")
    ap.add_argument("--skip-separate", action="store_true", help="no N-separate-engines configs")
    ap.add_argument(
        "--memory-share",
        type=float,
        default=0.5,
        help="skip N separate engines whose estimated memory (N x the plain engine's PSS) exceeds this share "
        "of the available memory (the machine is shared); the row then shows the estimate",
    )
    args = ap.parse_args()
    base, adapters, merged = build_inputs(args.work, max(args.n))
    plain_server = server(base, ["base"], [])
    rows = [run_config("plain", [plain_server], None, args, keep=True)]
    plain_targets = [(plain_server.url, "base")]
    try:
        lora_rows(rows, args, base, adapters, merged, plain_targets)
    finally:
        plain_server.kill(signal.SIGTERM)
    report(rows, args)


def lora_rows(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    base: Path,
    adapters: dict[str, Path],
    merged: dict[str, Path],
    plain_targets: list[tuple[str, str]],
) -> None:
    for n in args.n:
        names = list(adapters)[:n]
        lora = server(
            base,
            ["base"],
            [
                "--enable-lora",
                "--max-loras",
                str(n),
                "--max-lora-rank",
                "8",
                "--lora-modules",
                *(f"{a}={adapters[a]}" for a in names),
            ],
        )
        rows.append(paired(f"lora-{n}", lora, [(lora.url, a) for a in names], plain_targets, args))
        if args.skip_separate:
            continue
        need = n * rows[0]["pss_mib"]  # N plain engines' memory, estimated from the plain one
        free = psutil.virtual_memory().available / 2**20
        if need > args.memory_share * free:
            print(f"[separate-{n}] skipped: ~{need:.0f} MiB needed, {free:.0f} MiB available", flush=True)
            rows.append(
                {
                    "config": f"separate-{n}",
                    "engines": n,
                    "skipped": True,
                    "rss_mib": round(n * rows[0]["rss_mib"], 1),
                    "pss_mib": round(need, 1),
                }
            )
            continue
        engines = [server(merged[a], [a], []) for a in names]
        rows.append(run_config(f"separate-{n}", engines, None, args))


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    plain = rows[0]
    for row in rows:
        row["rss_x_plain"] = round(row["rss_mib"] / plain["rss_mib"], 3)
        row["pss_x_plain"] = round(row["pss_mib"] / plain["pss_mib"], 3)
        if row.get("skipped"):
            continue
        row["tput_x_plain"] = round(row["tok_per_s"] / plain["tok_per_s"], 3)
        sep = next((r for r in rows if r["config"] == row["config"].replace("lora-", "separate-")), None)
        if row["config"].startswith("lora-") and sep is not None and sep.get("skipped"):
            row["rss_x_separate"] = f"≈{round(row['rss_mib'] / sep['rss_mib'], 3)} (est.)"
        elif row["config"].startswith("lora-") and sep is not None:
            row["rss_x_separate"] = round(row["rss_mib"] / sep["rss_mib"], 3)
            row["startup_x_separate"] = round(row["startup_s"] / sep["startup_s"], 3)
            row["tput_x_separate"] = round(row["tok_per_s"] / sep["tok_per_s"], 3)
            row["p50_x_separate"] = round(row["p50_ms"] / sep["p50_ms"], 3)
    for row in rows:
        if row.get("skipped"):
            for key in ("rss_mib", "pss_mib", "rss_x_plain", "pss_x_plain"):
                row[key] = f"≈{row[key]} (est.)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    cols = [
        "config",
        "engines",
        "startup_s",
        "rss_mib",
        "pss_mib",
        "tok_per_s",
        "p50_ms",
        "rss_x_plain",
        "tput_x_plain",
        "paired_tput_x_plain",
        "rss_x_separate",
        "startup_x_separate",
        "tput_x_separate",
        "p50_x_separate",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "—")) for c in cols) + " |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
