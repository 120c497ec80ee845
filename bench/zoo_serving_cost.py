"""Serving cost of the zoo's two ways to use the same experts: the merged MoE vs the base + LoRA adapters.

    .venv/bin/python bench/zoo_serving_cost.py [--zoo runs/zoo] [--rounds 3] [--requests 48]

Each engine is a `vllm serve` process (what moerge's remote backends talk to) with the zoo's serve.yaml
settings (the checkpoint's dtype, max_model_len 1024, eager):
  plain  the base alone (the reference)
  moe    the merged MoE (runs/zoo/moe)
  lora   the base with the three adapters unmerged (`--enable-lora --max-loras 3 --max-lora-rank 16`)
Start-up (launch → /health OK) is measured for each engine started alone, one after the other, so the
start-ups do not compete. Then all three are up and loaded in alternating rounds (`--rounds`, medians
kept), so the throughput ratios are measured under the same background load: `--requests` completions,
`--concurrency` at once, greedy, `--tokens` tokens each (ignore_eos), on the zoo's held-out prompts of
math, code and text in turn; `moe` answers every one, `lora` sends each to its domain's adapter, `plain`
to the base. RSS and PSS are summed over each engine's process tree after the load.
Results: runs/zoo-serving-cost/results.{json,md}. Not a test: the numbers depend on the machine.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_bench import completion_load, tree_memory  # noqa: E402

from tests.helpers import VllmServer  # noqa: E402

DOMAINS = ["math", "code", "text"]


def prompts(zoo: Path, per_domain: int) -> list[tuple[str, str]]:
    """(domain, prompt) pairs, the domains in turn, from the zoo's held-out split."""
    by_domain = {}
    for d in DOMAINS:
        # split on "\n" only: str.splitlines also breaks at U+2028 and friends inside JSON strings
        lines = (zoo / "data" / f"{d}.heldout.jsonl").read_text(encoding="utf-8").split("\n")
        rows = [json.loads(line) for line in lines if line.strip()]
        by_domain[d] = [r["prompt"][:1500] for r in rows[:per_domain]]
    return [(d, by_domain[d][i]) for i in range(per_domain) for d in DOMAINS]


def engines(zoo: Path) -> dict[str, VllmServer]:
    common = ["--max-num-seqs", "16"]
    lora = ["--enable-lora", "--max-loras", "3", "--max-lora-rank", "16", "--lora-modules"]
    lora += [f"{d}-lora={zoo / 'experts' / d}" for d in DOMAINS]
    return {
        "plain": VllmServer(zoo / "base", ["base"], max_model_len=1024, extra_args=common),
        "moe": VllmServer(zoo / "moe", ["moe"], max_model_len=1024, extra_args=common),
        "lora": VllmServer(zoo / "base", ["base"], max_model_len=1024, extra_args=[*common, *lora]),
    }


def model_for(config: str, domain: str) -> str:
    return {"plain": "base", "moe": "moe"}.get(config, f"{domain}-lora")


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    servers = engines(args.zoo)
    work = prompts(args.zoo, args.requests // len(DOMAINS))
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, server in servers.items():
            print(f"[{name}] starting", flush=True)
            t0 = time.monotonic()
            server.start().wait_ready(1200)
            rows[name] = {"config": name, "startup_s": round(time.monotonic() - t0, 1)}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for r in range(args.rounds):
            for name, server in servers.items():
                jobs = [(server.url, model_for(name, d), prompt) for d, prompt in work]
                result = asyncio.run(completion_load(jobs, args.concurrency, args.tokens))
                print(f"[{name}] round {r + 1}: {json.dumps(result)}", flush=True)
                runs[name].append(result)
        for name, server in servers.items():
            rss, pss = tree_memory(server.proc)
            rows[name].update(
                rss_mib=round(rss, 1),
                pss_mib=round(pss, 1),
                tok_per_s=round(statistics.median(x["tok_per_s"] for x in runs[name]), 2),
                p50_ms=round(statistics.median(x["p50_ms"] for x in runs[name]), 1),
                rounds=[round(x["tok_per_s"], 1) for x in runs[name]],
            )
    finally:
        for server in servers.values():
            server.kill(signal.SIGTERM)
    return list(rows.values())


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by = {r["config"]: r for r in rows}
    for row in rows:
        for ref in ("plain", "lora"):
            row[f"rss_x_{ref}"] = round(row["rss_mib"] / by[ref]["rss_mib"], 3)
            row[f"startup_x_{ref}"] = round(row["startup_s"] / by[ref]["startup_s"], 3)
            row[f"tput_x_{ref}"] = round(row["tok_per_s"] / by[ref]["tok_per_s"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    cols = ["config", "startup_s", "rss_mib", "pss_mib", "tok_per_s", "p50_ms"]
    cols += ["rss_x_lora", "startup_x_lora", "tput_x_lora", "rss_x_plain", "tput_x_plain", "rounds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "—")) for c in cols) + " |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo-serving-cost")
    ap.add_argument("--requests", type=int, default=48, help="per round (a multiple of 3: the domains)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    report(measure(args), args)


if __name__ == "__main__":
    main()
