"""Live perplexity routing against the learned router, on the zoo's held-out prompts, in one gateway run.

    .venv/bin/python bench/perplexity_bench.py [--zoo runs/zoo] [--work runs/ppl-bench] [--rows 24]
        [--learned adapters] [--max-tokens 8]
    .venv/bin/python bench/perplexity_bench.py --tiny --learned learned --work runs/ppl-bench-tiny

The gateway is the zoo's serve.yaml (its in-process engines) plus a `perplexity` router whose candidates
are the experts the learned router (`--learned`, a router of serve.yaml) may send a request to, so both
choose from the same experts. Nothing is written into the zoo: the decision log is off, the LoRA state
file goes to WORK.

1. Latency, both routers in the same run, each held-out prompt asked through each (alternating which
   goes first), one at a time, as a chat request of `--max-tokens` greedy tokens: the routers' own
   decision time (the gateway's `moerge_router_batch_seconds`: one request a batch here) and the
   client's whole request time. Reported as ratios: perplexity decision / learned decision, and each
   decision's share of its request.
2. Accuracy: the share of each domain's prompts routed to the domain's expert (the learned router's
   label map and serve_as: the expert it is trained to send that domain to).
3. End to end: the reference answer's NLL per UTF-8 byte (comparable across tokenizers) given the
   chat-formatted prompt, under the expert each router picked, scored by that expert's own engine through
   the gateway (`prompt_logprobs`), as bench/quality.py's end-to-end table does with transformers; with
   the best single expert and the per-prompt oracle.

Writes WORK/perplexity_bench.json and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # small KV caches: the machine is shared

import httpx  # noqa: E402
import yaml  # noqa: E402

PPL, LEARNED = "bench-ppl", "bench-learned"  # the routing models the bench adds


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_config(zoo: Path, work: Path, learned: str) -> tuple[Any, list[str], dict[str, str]]:
    """serve.yaml with the perplexity router added, its candidates, and each domain's expert."""
    from serving.config import parse_config
    from serving.routing import load_router

    data = yaml.safe_load((zoo / "serve.yaml").read_text())
    data["decision_log"] = {"enabled": False}
    data["lora_state_file"] = str(work / "lora-state.json")
    plain = parse_config(data, base=zoo)
    if learned not in plain.routers:
        raise SystemExit(f"--learned {learned!r}: serve.yaml's routers are {sorted(plain.routers)}")
    router = load_router(learned, plain.routers[learned], list(plain.experts))
    candidates = list(dict.fromkeys(router.experts))  # several classes may be served by one expert
    meta = getattr(router, "meta", {})
    serve_as = {**meta.get("serve_as", {}), **(plain.routers[learned].serve_as or {})}
    # label_map is label → served expert through the artifact's own serve_as; the class of a label is the
    # label itself when the classes are the domains, else the expert it names (then serve.yaml re-maps it)
    classes = set(meta.get("experts", []))
    expected = {d: serve_as.get(d if d in classes else c, c) for d, c in meta.get("label_map", {}).items()}
    data["routers"]["ppl"] = {
        "kind": "perplexity",
        "experts": candidates,
        "fallback": plain.routers[learned].fallback,
        "params": {"timeout_s": 120},
    }
    data.setdefault("routing_models", {}).update({PPL: "ppl", LEARNED: learned})
    return parse_config(data, base=zoo), candidates, expected


def router_seconds(metrics: str) -> dict[str, tuple[float, float]]:
    """router → (sum of decision seconds, decisions) from the gateway's Prometheus text."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'moerge_router_batch_seconds_(sum|count)\{router="([^"]+)"\} (\S+)', metrics):
        out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def routing_pass(http: httpx.Client, rows: dict[str, list[dict]], max_tokens: int) -> dict[str, Any]:
    """Every prompt through both routers (alternating the order): picks, request times, decision times."""
    picks: dict[str, dict[str, list[str]]] = {PPL: {}, LEARNED: {}}
    wall: dict[str, list[float]] = {PPL: [], LEARNED: []}
    errors: list[dict[str, Any]] = []
    before = router_seconds(http.get("/metrics").text)
    i = 0
    for domain, domain_rows in rows.items():
        for row in domain_rows:
            order = (PPL, LEARNED) if i % 2 == 0 else (LEARNED, PPL)
            i += 1
            for model in order:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": row["prompt"]}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                }
                start = time.perf_counter()
                resp = http.post("/v1/chat/completions", json=body)
                wall[model].append(time.perf_counter() - start)
                picked = resp.headers.get("x-moerge-routed-expert") or resp.headers.get("x-moerge-expert")
                if resp.status_code != 200:  # e.g. a prompt longer than the picked expert's context
                    errors.append({"router": model, "domain": domain, "status": resp.status_code})
                    log(f"{model} → {picked}: HTTP {resp.status_code} {resp.text[:200]}")
                if picked is None:
                    resp.raise_for_status()
                picks[model].setdefault(domain, []).append(str(picked))
        log(f"routed {domain}")
    after = router_seconds(http.get("/metrics").text)
    decision = {}
    for name, (s, n) in after.items():
        s0, n0 = before.get(name, (0.0, 0.0))
        if n > n0:
            decision[name] = {"mean_s": (s - s0) / (n - n0), "n": n - n0}
    return {"picks": picks, "wall": wall, "decision": decision, "errors": errors}


def reference_nll(http: httpx.Client, config: Any, rows: list[dict], expert: str) -> list[float]:
    """Per row: NLL per byte of its reference answer given the chat-formatted prompt, from the expert's
    engine (`prompt_logprobs` over the token ids bench/quality.py's scoring builds)."""
    from transformers import AutoTokenizer

    from merge.evaluate import _reference_ids
    from serving.config import LoraMember, VllmExpert

    cfg = config.experts[expert]
    base = config.lora[cfg.family].base if isinstance(cfg, LoraMember) else cfg
    assert isinstance(base, VllmExpert)
    tokenizer = AutoTokenizer.from_pretrained(base.model)
    limit = int(base.engine_args.get("max_model_len", 2048)) - 2
    out = []
    for row in rows:
        ids, context = _reference_ids(tokenizer, row, min(512, limit // 2), limit)
        body = {"model": expert, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
        resp = http.post("/v1/completions", json=body)
        resp.raise_for_status()
        logprobs = resp.json()["choices"][0]["prompt_logprobs"]
        nll = -sum(next(iter(lp.values()))["logprob"] for lp in logprobs[max(1, context) :] if lp)
        text = str(tokenizer.decode(ids[context:], skip_special_tokens=False))
        out.append(nll / max(1, len(text.encode("utf-8"))))
    return out


def summarise(
    rows: dict[str, list[dict]],
    passed: dict[str, Any],
    nll: dict[str, dict[str, list[float]]],
    expected: dict[str, str],
    candidates: list[str],
) -> dict[str, Any]:
    """Accuracy and end-to-end NLL per domain and router, with the best single expert and the oracle."""
    table: dict[str, Any] = {}
    for domain in rows:
        entry: dict[str, Any] = {"n": len(rows[domain]), "expert": expected.get(domain)}
        for model in (PPL, LEARNED):
            picked = passed["picks"][model][domain]
            entry[model] = {"accuracy": sum(p == entry["expert"] for p in picked) / len(picked)}
            if domain in nll:
                per = [nll[domain][p][i] if p in nll[domain] else float("nan") for i, p in enumerate(picked)]
                entry[model]["nll_per_byte"] = statistics.fmean(per)
        if domain in nll:
            single = {e: statistics.fmean(v) for e, v in nll[domain].items()}
            entry["best_single"] = min(single, key=single.__getitem__)
            entry["best_single_nll"] = single[entry["best_single"]]
            entry["oracle_nll"] = statistics.fmean(
                min(nll[domain][e][i] for e in candidates) for i in range(len(rows[domain]))
            )
        table[domain] = entry
    return table


def markdown(result: dict[str, Any]) -> str:
    lat = result["latency"]
    lines = [
        f"Latency (mean of {lat['n']} requests each, {lat['max_tokens']} tokens, one at a time): "
        f"perplexity decision {lat['ppl_decision_ms']:.1f} ms = **{lat['decision_ratio']:.1f}×** the learned "
        f"router's {lat['learned_decision_ms']:.1f} ms; {lat['ppl_share']:.0%} of a perplexity-routed request "
        f"({lat['ppl_request_ms']:.0f} ms) against {lat['learned_share']:.0%} of a learned-routed one "
        f"({lat['learned_request_ms']:.0f} ms): a request takes {lat['request_ratio']:.2f}× as long.",
        "",
        "| domain | n | domain's expert | accuracy ppl | accuracy learned | NLL/byte ppl | NLL/byte learned "
        "| best single | oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, e in result["domains"].items():
        shown = {m: e[m].get("nll_per_byte") for m in (PPL, LEARNED)}
        nll = {m: "—" if v is None else f"{v:.4f}" for m, v in shown.items()}
        best = f"{e['best_single_nll']:.4f} ({e['best_single']})" if "best_single" in e else "—"
        oracle = f"{e['oracle_nll']:.4f}" if "oracle_nll" in e else "—"
        lines.append(
            f"| {domain} | {e['n']} | {e['expert']} | {e[PPL]['accuracy']:.0%} | {e[LEARNED]['accuracy']:.0%} "
            f"| {nll[PPL]} | {nll[LEARNED]} | {best} | {oracle} |"
        )
    return "\n".join(lines)


def latency(passed: dict[str, Any], learned: str, max_tokens: int) -> dict[str, Any]:
    d_ppl = passed["decision"]["ppl"]["mean_s"]
    d_learned = passed["decision"][learned]["mean_s"]
    w_ppl, w_learned = statistics.fmean(passed["wall"][PPL]), statistics.fmean(passed["wall"][LEARNED])
    return {
        "n": len(passed["wall"][PPL]),
        "max_tokens": max_tokens,
        "ppl_decision_ms": d_ppl * 1000,
        "learned_decision_ms": d_learned * 1000,
        "decision_ratio": d_ppl / d_learned,
        "ppl_request_ms": w_ppl * 1000,
        "learned_request_ms": w_learned * 1000,
        "ppl_share": d_ppl / w_ppl,
        "learned_share": d_learned / w_learned,
        "request_ratio": w_ppl / w_learned,
    }


def tiny_zoo(work: Path) -> Path:
    """A zoo-shaped folder from merge/tiny.py's zoo (math, code, text experts), for a run without the real
    zoo: a hybrid router trained on the experts' own training prompts, held-out sentences (seed 7; the
    experts trained on seeds 1 and 2) cut in two at the middle word (prompt, reference answer), and a
    serve.yaml of three in-process engines."""
    from merge.tiny import TINY_DOMAINS, build_tiny_zoo, domain_prompts
    from router.config import parse_config as router_config
    from router.train import train_router

    zoo = build_tiny_zoo(work / "tiny")
    folder = work / "tiny-zoo"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for domain in TINY_DOMAINS:
        with open(folder / "data" / f"{domain}.heldout.jsonl", "w") as fh:
            for j, text in enumerate(domain_prompts(domain, 200, seed=7)):
                words = text.split(" ")
                half = len(words) // 2
                row = {"id": f"{domain}-{j}", "domain": domain, "prompt": " ".join(words[:half])}
                fh.write(json.dumps({**row, "response": " " + " ".join(words[half:])}) + "\n")
    if not (folder / "router" / "router.json").exists():
        spec = {
            "kind": "hybrid",
            "experts": {d: {"files": [str(zoo.data[d])], "holdout": {"fraction": 0.0}} for d in TINY_DOMAINS},
            "encoder": {"model": "bundled", "max_seq_length": 64},
        }
        train_router(router_config(spec, folder), folder / "router", log=log)
    engine = {"max_model_len": 256, "enforce_eager": True}
    serve = {
        "experts": {
            d: {"backend": "vllm", "model": str(zoo.experts[d]), "engine_args": engine} for d in TINY_DOMAINS
        },
        "routers": {"learned": {"artifact": "./router"}},
    }
    (folder / "serve.yaml").write_text(yaml.safe_dump(serve, sort_keys=False))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ppl-bench")
    parser.add_argument("--rows", type=int, default=24, help="held-out prompts per domain")
    parser.add_argument("--learned", default="adapters", help="serve.yaml's trained router to compare with")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--tiny", action="store_true", help="merge/tiny.py's zoo, laid out in WORK (no --zoo)"
    )
    args = parser.parse_args()
    from quality import domains_of, heldout_rows

    from serving.app import create_app
    from tests.helpers import ThreadedServer, wait_http_ok

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    zoo = tiny_zoo(work) if args.tiny else args.zoo.resolve()
    config, candidates, expected = bench_config(zoo, work, args.learned)
    rows = {d: heldout_rows(zoo, d, args.rows) for d in domains_of(zoo)}
    log(f"candidates {candidates}; domain experts {expected}")
    with ThreadedServer(create_app(config)) as server:
        wait_http_ok(server.url + "/ready", 1800)
        with httpx.Client(base_url=server.url, timeout=600) as http:
            warm = [{"prompt": "What is 2 + 3?"}]
            routing_pass(http, {"warm-up": warm}, args.max_tokens)
            passed = routing_pass(http, rows, args.max_tokens)
            scored = [d for d in rows if all(r.get("response") for r in rows[d])]
            nll = {d: {e: reference_nll(http, config, rows[d], e) for e in candidates} for d in scored}
            log("scored the references")
    result = {
        "command": " ".join(sys.argv),
        "candidates": candidates,
        "latency": latency(passed, args.learned, args.max_tokens),
        "domains": summarise(rows, passed, nll, expected, candidates),
        "picks": passed["picks"],
        "request_errors": passed["errors"],
    }
    (work / "perplexity_bench.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
