"""Router speed benchmark (not a test): ratios against plain fp32 MiniLM measured in the same run.

Baseline: sentence-transformers' own `encode()` of all-MiniLM-L6-v2 in fp32 at its default max length
(256), one prompt per call — what a naive router does. Each variant is our encoder at some max length /
precision / depth, timed on the same prompts (a fixed mix of the five shared-data domains), unbatched
(p50/p99 ms per call) and batched (prompts/s). With --artifact, the full router is timed too: decide()
unbatched with the cache off, decide_batch throughput, and decide() on a repeated (cached) prompt.

    .venv/bin/python bench/router_bench.py [--artifact runs/router-shared] [--json] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = ROOT.parent / "shared" / "data"
DOMAINS = ("math", "code", "knowledge", "text", "general")


def bench_prompts(count: int, seed: int = 0, heldout: Path | None = None) -> list[str]:
    """An equal share of each domain: from an artifact's held-out split when given (prompts the router
    never trained on, so its fast path is not flattered), else from the whole shared data."""
    rng = random.Random(seed)
    per = max(1, count // len(DOMAINS))
    prompts: list[str] = []
    for domain in DOMAINS:
        if heldout is not None:
            lines = heldout.open(encoding="utf-8")
            rows = [r["prompt"] for r in map(json.loads, lines) if r.get("domain") == domain]
        else:
            rows = [
                json.loads(line)["prompt"] for line in (SHARED / f"{domain}.jsonl").open(encoding="utf-8")
            ]
        prompts += rng.sample(rows, min(per, len(rows)))
    rng.shuffle(prompts)
    return prompts


def time_unbatched(fn: Callable[[Sequence[str]], object], prompts: Sequence[str]) -> dict[str, float]:
    fn(prompts[:2])
    times = []
    for p in prompts:
        t = time.perf_counter()
        fn([p])
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))]}


def time_batched(fn: Callable[[Sequence[str]], object], prompts: Sequence[str], batch: int) -> float:
    fn(prompts[:batch])
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        fn(prompts[i : i + batch])
    return len(prompts) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", type=Path, help="a trained router artifact to time end to end")
    parser.add_argument("--samples", type=int, default=200, help="prompts timed per variant")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--variants",
        default="fp32:128,bf16:128,bf16:64,bf16:64:3",
        help="PRECISION:MAXLEN[:LAYERS],… of our encoder ('' for none)",
    )
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from router.encoder import Encoder, cpu_has_native_bf16, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    heldout = args.artifact / "heldout.jsonl" if args.artifact else None
    prompts = bench_prompts(args.samples, heldout=heldout if heldout and heldout.is_file() else None)
    rows: list[dict[str, object]] = []

    model = SentenceTransformer(str(resolve_model_path("bundled")), device="cpu")

    def plain(batch: Sequence[str]) -> object:
        return model.encode(list(batch), batch_size=len(batch))

    with torch.inference_mode():
        base_u = time_unbatched(plain, prompts)
        base_b = time_batched(plain, prompts, args.batch)
    rows.append(
        {
            "variant": f"baseline: sentence-transformers fp32, max_len {model.max_seq_length}",
            **base_u,
            "batched_per_s": base_b,
        }
    )

    for spec in filter(None, args.variants.split(",")):
        parts = spec.split(":")
        precision, length = parts[0], int(parts[1])
        layers = int(parts[2]) if len(parts) > 2 else None
        enc = Encoder("bundled", max_seq_length=length, precision=precision, layers=layers)
        u = time_unbatched(lambda b, e=enc: list(e.encode(b, batch_size=len(b))), prompts)
        rate = time_batched(lambda b, e=enc: list(e.encode(b, batch_size=len(b))), prompts, args.batch)
        name = f"encoder {precision}, max_len {length}" + (f", {layers} layers" if layers else "")
        rows.append({"variant": name, **u, "batched_per_s": rate})
        del enc

    if args.artifact:
        from router.artifact import load_router
        from router.base import RoutingRequest
        from router.learned import LearnedRouter

        router = load_router(args.artifact)
        encoder_only = load_router(args.artifact, fast_path=False)
        assert isinstance(router, LearnedRouter) and isinstance(encoder_only, LearnedRouter)

        def decide(batch: Sequence[str], cache: bool = False, r: LearnedRouter = router) -> object:
            return r.decide_batch([RoutingRequest.from_prompt(p) for p in batch], use_cache=cache)

        ref = router.encoder.reference()
        layers = f", {ref['layers']} layers" if ref.get("layers") else ""
        if ref.get("pool_layers"):
            layers += f", pooled layers {ref['pool_layers']}"
        setup = f"{ref['precision']}, max_len {ref['max_seq_length']}{layers}"
        if router.fast_path is not None:
            ngram = router.fast_path
            u = time_unbatched(ngram.proba, prompts)
            rate = time_batched(ngram.proba, prompts, args.batch)
            rows.append(
                {"variant": "n-gram stage alone (hashed char n-grams, linear)", **u, "batched_per_s": rate}
            )
            u = time_unbatched(lambda b: decide(b, r=encoder_only), prompts)
            rate = time_batched(lambda b: decide(b, r=encoder_only), prompts, args.batch)
            rows.append(
                {
                    "variant": f"router {router.kind} decide(), no fast path ({setup})",
                    **u,
                    "batched_per_s": rate,
                }
            )
            _, answered = router.fast_path_split(prompts)
            share = f"{answered.mean():.0%} answered by n-grams"
        u = time_unbatched(decide, prompts)
        rate = time_batched(decide, prompts, args.batch)
        label = f"router {router.kind} decide() as served ({share if router.fast_path else setup})"
        rows.append({"variant": label, **u, "batched_per_s": rate})
        cached = time_unbatched(lambda b: decide(prompts[:1], cache=True), prompts)
        rows.append(
            {
                "variant": f"router {router.kind} decide(), repeated prompt (LRU cache hit)",
                **cached,
                "batched_per_s": float("nan"),
            }
        )

    for row in rows:
        row["speedup_p50"] = base_u["p50_ms"] / float(row["p50_ms"])  # type: ignore[arg-type]
        row["throughput_ratio"] = float(row["batched_per_s"]) / base_b  # type: ignore[arg-type]
    meta = {
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "samples": len(prompts),
        "batch": args.batch,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "prompts": "artifact held-out split" if heldout and heldout.is_file() else "shared data",
        "median_prompt_chars": statistics.median(len(p) for p in prompts),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"# router bench: {meta}")
    print(f"| {'variant':72s} | p50 ms | p99 ms | ×p50 | prompts/s | ×thr |")
    print(f"|{'-' * 74}|-------:|-------:|-----:|----------:|-----:|")
    for r in rows:
        print(
            f"| {r['variant']:72s} | {r['p50_ms']:6.2f} | {r['p99_ms']:6.2f} | {r['speedup_p50']:4.1f} "
            f"| {r['batched_per_s']:9.0f} | {r['throughput_ratio']:4.1f} |"
        )


if __name__ == "__main__":
    main()
