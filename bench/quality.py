"""Quality tables of the demo zoo (`moerge zoo build`): merge, routing, end to end.

    .venv/bin/python bench/quality.py [--zoo runs/zoo] [--rows 64] [--tables merge,routing,e2e]

1. Merge: held-out perplexity per domain (reference answers given the chat-formatted prompt; MMLU has no
   answers, so its prompts are scored) for the base, each dense expert (a LoRA expert materialised:
   peft's merge_and_unload), dense merges by each shared-weight method (linear, task arithmetic, TIES,
   DARE-TIES), the MoE for every shared-weight method × gate initialisation (ridge, hidden, arrow,
   random), and mergekit-moe's MoE of the same (materialised) experts; with the share of each domain's
   tokens that the MoE's gates (top-1, mean over the layers where the experts differ) send to the domain's
   own expert, and experts that receive < 1% flagged.
2. Routing: per-domain accuracy, per-expert F1 and macro-F1 of every head of the zoo's router artifact
   and of the random / majority baselines on the zoo's held-out split.
3. End to end: on each domain's held-out prompts with reference answers, the mean reference NLL per
   UTF-8 byte (comparable across tokenizers) under each served expert (the MoE, each LoRA adapter as its
   engine applies it, the base, the arithmetic expert), under the expert each of serve.yaml's trained
   routers picks (the real `decide_batch`: `learned` → the merged MoE, `adapters` → the unmerged
   adapters), and under the per-prompt oracle.

Writes WORK/quality.json, the markdown tables (stdout and WORK/quality.md) and two PNGs
(bench/results/quality-merge-heatmap.png, bench/results/quality-routing-confusion.png).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import hashlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from quality_variants import base_recipe, build, digest, materialised, variants  # noqa: E402

from merge.evaluate import load_causal_lm, routing_load, score_references  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RESPONSE_CHARS = 400  # every model scores the same characters of each reference answer


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def heldout_rows(zoo: Path, domain: str, n: int) -> list[dict]:
    """A fixed sample of a domain's held-out rows (ordered by a hash of their id, not file order)."""
    path = zoo / "data" / f"{domain}.heldout.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    rows.sort(key=lambda r: hashlib.sha256(str(r.get("id", r["prompt"])).encode()).hexdigest())
    out = []
    for row in rows[:n]:
        response = row.get("response")
        if response:
            response = response.replace("<|endoftext|>", "").strip()[:RESPONSE_CHARS]
        out.append({**row, "response": response or None})
    return out


def domains_of(zoo: Path) -> list[str]:
    return sorted(p.name.removesuffix(".heldout.jsonl") for p in (zoo / "data").glob("*.heldout.jsonl"))


def release(*objects) -> None:
    del objects
    gc.collect()


# ---------------------------------------------------------------- table 1: merge


def merge_table(
    zoo: Path,
    work: Path,
    n: int,
    with_mergekit: bool,
    with_tuned: bool,
    only_domains: list[str],
    only_variants: list[str] | None = None,
) -> dict:
    full_experts = materialised(zoo, work, log)
    all_variants = variants(zoo, with_mergekit, with_tuned, full_experts)
    if only_variants:
        all_variants = [v for v in all_variants if any(fnmatch.fnmatch(v.name, p) for p in only_variants)]
        if not all_variants:
            sys.exit(f"--variants {','.join(only_variants)} matches none of the merge table's variants")
    expert_names = [e["name"] for e in base_recipe(zoo)["experts"]]
    routed_layers = differing_layers(zoo, expert_names)
    domains = [d for d in ("math", "code", "text", "knowledge", "general") if d in only_domains]
    domains = [d for d in domains if (zoo / "data" / f"{d}.heldout.jsonl").exists()]
    rows = {d: heldout_rows(zoo, d, n) for d in domains}
    models: list[tuple[str, str, Path, str | None]] = [("base", "dense", zoo / "base", None)]
    models += [(f"dense expert {e}", "dense", full_experts[e], None) for e in expert_names]
    built: dict[str, Path] = {}
    for variant in all_variants:
        try:
            built[variant.name] = build(variant, work, built, log)
            models.append((variant.name, variant.kind, built[variant.name], digest(variant)))
        except (RuntimeError, OSError) as error:
            log(f"skipping {variant.name}: {error}")
    results = []
    for name, kind, folder, key in models:
        # Each model's scores are kept beside the variants, so an interrupted run resumes where it stopped;
        # they are reused only for the very build they were measured on.
        cache = work / "evals" / f"{name.replace(' ', '_').replace('/', '_')}-{n}-{'_'.join(domains)}.json"
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached and cached.get("build") == key:
            results.append(cached)
            continue
        log(f"evaluating {name}")
        model, tokenizer = load_causal_lm(folder)
        entry = {
            "model": name,
            "kind": kind,
            "build": key,
            "perplexity": perplexities(model, tokenizer, rows),
        }
        if kind == "moe":
            own_rows = {e: rows[e] for e in expert_names if e in rows}
            entry.update(gate_shares(model, tokenizer, own_rows, layers=routed_layers))
        results.append(entry)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(entry))
        release(model, tokenizer)
    dense_experts = {e: next(r for r in results if r["model"] == f"dense expert {e}") for e in expert_names}
    for entry in results:
        entry["vs_own_dense_expert"] = {
            e: entry["perplexity"][e] / dense_experts[e]["perplexity"][e] - 1
            for e in expert_names
            if e in entry["perplexity"]
        }
    return {"domains": domains, "experts": expert_names, "rows": results, "n_per_domain": n}


def perplexities(model, tokenizer, rows: dict[str, list[dict]]) -> dict[str, float]:
    """Held-out perplexity per domain: the reference answers' tokens given the chat-formatted prompt."""
    out = {}
    for domain, domain_rows in rows.items():
        scores = score_references(model, tokenizer, domain_rows)
        out[domain] = math.exp(sum(s.nll for s in scores) / max(1, sum(s.tokens for s in scores)))
    return out


def differing_layers(zoo: Path, experts: list[str]) -> list[int] | None:
    """The layers where some expert's FFN differs from the base's (LoRA experts: their adapters' layers);
    None (every layer) for full-checkpoint experts. Elsewhere every expert computes the same FFN, so
    which one a gate picks says nothing."""
    from merge.adapter import is_adapter
    from moerge.zoo.lm import adapter_layers

    folders = [zoo / "experts" / e for e in experts]
    if not all(is_adapter(f) for f in folders):
        return None
    return sorted({layer for f in folders for layer in adapter_layers(f)})


def gate_shares(
    model,
    tokenizer,
    rows: dict[str, list[dict]],
    own: dict[str, int] | None = None,
    layers: list[int] | None = None,
) -> dict:
    """Per domain, the share of tokens sent to its own expert (`own`: domain → expert index; default: the
    i-th domain's is expert i), over `layers` (default all); each expert's load; experts that get under
    1 % of tokens. An MoE that writes each expert twice (mirrored Arrow gates: experts i and i + N) has
    its counts folded onto the N experts."""
    prompts = {
        d: [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            for r in rs
        ]
        for d, rs in rows.items()
    }
    counts = routing_load(model, tokenizer, prompts)  # [layer, domain, expert]
    if layers is not None:
        counts = counts[layers]
    n = max(own.values()) + 1 if own else len(prompts)
    if counts.shape[-1] == 2 * n:
        counts = counts[..., :n] + counts[..., n:]
    share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    own = own if own is not None else {d: i for i, d in enumerate(prompts)}
    own_share = {d: float(share[:, i, own[d]].mean()) for i, d in enumerate(prompts) if d in own}
    load = counts.sum((0, 1)) / counts.sum().clamp_min(1)
    unused = [int(i) for i in torch.nonzero(load < 0.01).flatten()]
    return {"own_share": own_share, "expert_load": [float(x) for x in load], "unused_experts": unused}


# ---------------------------------------------------------------- table 2: routing


def routing_table(zoo: Path, n: int) -> dict:
    from router.artifact import load_router
    from router.evaluate import classification_metrics, policy_decisions, served_novelty

    router = load_router(zoo / "router", cache_size=0)
    label_map = dict(router.meta.get("label_map") or {})
    domains = [d for d in domains_of(zoo) if d in label_map]
    rows = [r for d in domains for r in heldout_rows(zoo, d, n)]
    y = np.array([router.experts.index(label_map[r["domain"]]) for r in rows])
    feats, _ = router.features([r["prompt"] for r in rows], needs_tokens=True)
    counts = router.training_counts()
    majority = max(range(len(router.experts)), key=lambda i: counts.get(router.experts[i], 0))
    predictions = {
        "majority": np.full(len(y), majority),
        "random": np.random.default_rng(0).integers(0, len(router.experts), len(y)),
    }
    for kind, head in sorted(router.heads.items()):
        predictions[kind], _, _ = policy_decisions(router, kind, head.proba(feats))
    if router.fast_path is not None:  # what serving decides: n-grams where sure, else the default head
        texts = router.prompt_texts([r["prompt"] for r in rows])
        served, fast_p, answered = router.cascade(texts, router.heads[router.kind].proba(feats))
        predictions["ngram"], _, _ = policy_decisions(router, "ngram", fast_p)
        novel = served_novelty(router, feats, served, answered)
        if router.novelty is not None:
            predictions[f"ngram→{router.kind}"], _, _ = policy_decisions(router, router.kind, served)
        predictions[f"ngram→{router.kind}{' + novelty' if router.novelty else ''} (served)"], _, _ = (
            policy_decisions(router, router.kind, served, novel)
        )
    out = {}
    domain_of = np.array([r["domain"] for r in rows])
    for kind, pred in predictions.items():
        m = classification_metrics(y, pred, np.ones(len(y)), router.experts)
        out[kind] = {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "per_domain_accuracy": {d: float((pred == y)[domain_of == d].mean()) for d in domains},
            "per_expert_f1": {e: c["f1"] for e, c in m["per_class"].items()},
            "domain_by_expert": [
                [int(((domain_of == d) & (pred == j)).sum()) for j in range(len(router.experts))]
                for d in domains
            ],
        }
    return {
        "domains": domains,
        "experts": list(router.experts),
        "label_map": label_map,
        "default_kind": router.kind,
        "heads": out,
        "n": len(rows),
    }


# ---------------------------------------------------------------- table 3: end to end


def e2e_candidates(zoo: Path, work: Path, config) -> dict[str, Path]:
    """Every expert serve.yaml serves in-process, as a folder transformers loads: vLLM engines as they are,
    a LoRA family's base as its engine's model, each adapter materialised (its merge_and_unload, what the
    engine computes with the adapter applied)."""
    from serving.config import LoraMember, VllmExpert

    full = materialised(zoo, work, log)
    by_adapter_path = {(zoo / "experts" / name).resolve(): folder for name, folder in full.items()}
    out: dict[str, Path] = {}
    for name, expert in config.experts.items():
        if isinstance(expert, VllmExpert):
            out[name] = Path(expert.model)
        elif isinstance(expert, LoraMember):
            family = config.lora[expert.family]
            if expert.adapter is None:
                assert isinstance(family.base, VllmExpert)
                out[name] = Path(family.base.model)
            else:
                path = family.adapters[expert.adapter].path
                assert path is not None
                out[name] = by_adapter_path[Path(path).resolve()]
    return out


def e2e_routers(config) -> dict:
    """serve.yaml's trained routers, each loaded as serving loads it (its `serve_as` applied): `learned`
    sends the MoE's domains to the merged MoE, `adapters` the same decisions to the unmerged adapters."""
    from router.artifact import load_router

    return {
        name: load_router(Path(spec.artifact), cache_size=0, serve_as=spec.serve_as)
        for name, spec in config.routers.items()
        if spec.artifact is not None
    }


def e2e_table(zoo: Path, work: Path, n: int) -> dict:
    from router.base import RoutingRequest
    from serving.config import load_config

    config = load_config(zoo / "serve.yaml")  # one read: the served experts and the trained routers
    candidates = e2e_candidates(zoo, work, config)
    routers = e2e_routers(config)
    domains = [d for d in domains_of(zoo) if all(r["response"] for r in heldout_rows(zoo, d, 1))]
    rows = {d: heldout_rows(zoo, d, n) for d in domains}
    per_byte: dict[str, dict[str, np.ndarray]] = {d: {} for d in domains}
    for name, folder in candidates.items():
        log(f"scoring references under {name}")
        model, tokenizer = load_causal_lm(folder)
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 1024)
        for d in domains:
            scores = score_references(
                model, tokenizer, rows[d], max_tokens=min(1024, limit), max_prompt_tokens=min(512, limit // 2)
            )
            per_byte[d][name] = np.array([s.nll / max(1, s.bytes) for s in scores])
        release(model, tokenizer)
    names = list(candidates)
    table = {}
    for d in domains:
        matrix = np.stack([per_byte[d][e] for e in names])  # [expert, row]
        single = {e: float(matrix[j].mean()) for j, e in enumerate(names)}
        best = min(single, key=single.get)
        oracle = float(matrix.min(0).mean())
        entry: dict = {
            "n": len(rows[d]),
            "single": single,
            "best_single": best,
            "oracle": oracle,
            "routers": {},
        }
        for router_name, router in routers.items():
            decisions = router.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows[d]])
            picked = [dec.expert for dec in decisions]
            routed = np.array(
                [matrix[names.index(p), i] if p in names else np.nan for i, p in enumerate(picked)]
            )
            low, high = bootstrap_interval(routed - matrix[names.index(best)])
            by_label = router.meta.get("label_map", {}).get(d)
            entry["routers"][router_name] = {
                "routed": float(np.nanmean(routed)),
                # 95 % interval of the mean paired difference routed − best single, over prompts
                "regret_interval": [low, high],
                # a perfect sequence-level router: every prompt to the expert its true domain is served by
                "true_domain": single.get(by_label, float("nan")),
                "routed_share": {e: picked.count(e) / len(picked) for e in sorted(set(picked))},
            }
        table[d] = entry
    # every domain weighted alike: the routed systems against each single expert serving everything
    overall = {e: float(np.mean([table[d]["single"][e] for d in domains])) for e in candidates}
    table["all (mean of domains)"] = {
        "n": sum(table[d]["n"] for d in domains),
        "single": overall,
        "best_single": min(overall, key=overall.get),
        "oracle": float(np.mean([table[d]["oracle"] for d in domains])),
        "routers": {
            r: {
                "routed": float(np.mean([table[d]["routers"][r]["routed"] for d in domains])),
                "regret_interval": [float("nan"), float("nan")],
                "true_domain": float(np.mean([table[d]["routers"][r]["true_domain"] for d in domains])),
            }
            for r in routers
        },
    }
    return {"domains": domains, "experts": names, "routers": list(routers), "rows": table, "n_per_domain": n}


def bootstrap_interval(diff: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of mean(diff) over prompts (NaN rows dropped)."""
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        return float("nan"), float("nan")
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (draws, len(diff)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


# ---------------------------------------------------------------- output


def markdown(results: dict) -> str:
    lines: list[str] = []
    if "merge" in results:
        m = results["merge"]
        lines += [
            f"**Merge** — held-out perplexity ({m['n_per_domain']} prompts a domain; lower is better), "
            "share of each domain's tokens the gates send to its own expert, unused experts:",
            "",
            "| model | "
            + " | ".join(f"ppl {d}" for d in m["domains"])
            + " | vs own dense expert "
            + "/".join(m["experts"])
            + " | own-expert share "
            + "/".join(m["experts"])
            + " | unused |",
            "|---|" + "---:|" * len(m["domains"]) + "---|---|---|",
        ]
        for r in m["rows"]:
            ppl = " | ".join(
                f"{v:.3f}" if (v := r["perplexity"][d]) < 10 else f"{v:.2f}" for d in m["domains"]
            )
            versus = "/".join(f"{r['vs_own_dense_expert'][e]:+.1%}" for e in m["experts"])
            share = "/".join(f"{r['own_share'][e]:.2f}" for e in m["experts"]) if "own_share" in r else "—"
            unused = ", ".join(m["experts"][i] for i in r.get("unused_experts", []) if i < len(m["experts"]))
            lines.append(
                f"| {r['model']} | {ppl} | {versus} | {share} | "
                f"{unused or ('none' if 'own_share' in r else '—')} |"
            )
        lines.append("")
    if "routing" in results:
        t = results["routing"]
        lines += [
            f"**Routing** — {t['n']} held-out prompts, scored by the served expert each is sent to "
            f"({', '.join(f'{d}→{e}' for d, e in t['label_map'].items())}):",
            "",
            "| router | "
            + " | ".join(f"acc {d}" for d in t["domains"])
            + " | accuracy | macro-F1 | "
            + " | ".join(f"F1 {e}" for e in t["experts"])
            + " |",
            "|---|" + "---:|" * (len(t["domains"]) + 2 + len(t["experts"])),
        ]
        order = [t["default_kind"]] + [k for k in t["heads"] if k != t["default_kind"]]
        for kind in order:
            h = t["heads"][kind]
            accs = " | ".join(f"{h['per_domain_accuracy'][d]:.3f}" for d in t["domains"])
            f1s = " | ".join(f"{h['per_expert_f1'][e]:.3f}" for e in t["experts"])
            lines.append(f"| {kind} | {accs} | {h['accuracy']:.3f} | {h['macro_f1']:.3f} | {f1s} |")
        lines.append("")
    if "e2e" in results:
        e = results["e2e"]
        routers = e["routers"]
        lines += [
            f"**End to end** — mean reference NLL per byte (up to {e['n_per_domain']} held-out prompts a "
            "domain; lower is better). One column per served expert (the MoE, each adapter on the base's "
            "engine, the base, the arithmetic expert), then each trained router of serve.yaml ("
            + ", ".join(f"`{r}`" for r in routers)
            + "), each routed system's change against the best single model [95 % bootstrap interval of "
            "the paired difference over prompts], and the per-prompt oracle:",
            "",
            "| domain | n | "
            + " | ".join(e["experts"])
            + " | best single | "
            + " | ".join(f"routed `{r}` | `{r}` − best [95 %]" for r in routers)
            + " | oracle |",
            "|---|---:|" + "---:|" * (len(e["experts"]) + 1 + 2 * len(routers) + 1),
        ]
        for d, r in e["rows"].items():
            single = " | ".join(f"{r['single'][x]:.4f}" for x in e["experts"])
            best = r["single"][r["best_single"]]
            routed_cells = []
            for name in routers:
                got = r["routers"][name]
                low, high = got.get("regret_interval", [float("nan")] * 2)
                interval = f" [{low:+.4f}, {high:+.4f}]" if not math.isnan(low) else ""
                routed_cells.append(f"{got['routed']:.4f} | {got['routed'] - best:+.4f}{interval}")
            lines.append(
                f"| {d} | {r.get('n', '')} | {single} | {r['best_single']} | "
                + " | ".join(routed_cells)
                + f" | {r['oracle']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    if "merge" in results:
        m = results["merge"]
        names = [r["model"] for r in m["rows"]]
        values = np.array([[math.log(r["perplexity"][d]) for d in m["domains"]] for r in m["rows"]])
        fig, ax = plt.subplots(figsize=(1.6 * len(m["domains"]) + 3, 0.45 * len(names) + 1.5))
        ax.imshow(values - values.min(0), cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(m["domains"])), m["domains"])
        ax.set_yticks(range(len(names)), names)
        for i, r in enumerate(m["rows"]):
            for j, d in enumerate(m["domains"]):
                v = r["perplexity"][d]
                ax.text(
                    j,
                    i,
                    f"{v:.3f}" if v < 10 else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w",
                )
        ax.set_title("held-out perplexity\n(colour: log-ppl above the column's best)", fontsize=10)
        fig.tight_layout()
        fig.savefig(RESULTS / "quality-merge-heatmap.png", dpi=110)
        plt.close(fig)
    if "routing" in results:
        t = results["routing"]
        matrix = np.array(t["heads"][t["default_kind"]]["domain_by_expert"], dtype=float)
        fig, ax = plt.subplots(figsize=(1.4 * len(t["experts"]) + 2.5, 0.6 * len(t["domains"]) + 1.5))
        ax.imshow(matrix / matrix.sum(1, keepdims=True).clip(1), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(t["experts"])), t["experts"])
        ax.set_yticks(range(len(t["domains"])), t["domains"])
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=9)
        ax.set_xlabel("expert chosen")
        ax.set_ylabel("held-out domain")
        ax.set_title(f"router `{t['default_kind']}` on held-out prompts")
        fig.tight_layout()
        fig.savefig(RESULTS / "quality-routing-confusion.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo", help="built by `moerge zoo build`")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "quality", help="merge variants, results"
    )
    parser.add_argument("--rows", type=int, default=64, help="held-out prompts per domain (table 1)")
    parser.add_argument(
        "--e2e-rows", type=int, default=96, help="held-out prompts per domain (table 3; general has 36)"
    )
    parser.add_argument("--tables", default="merge,routing,e2e", help="comma-separated subset")
    parser.add_argument("--skip-mergekit", action="store_true", help="leave mergekit-moe out of table 1")
    parser.add_argument(
        "--domains", default="math,code,text,knowledge,general", help="table 1's columns (comma-separated)"
    )
    parser.add_argument("--skip-tuned", action="store_true", help="leave the tuned-gates MoE out of table 1")
    parser.add_argument(
        "--variants",
        default="",
        help="table 1's merges to build and score, comma-separated name patterns ('MoE TIES*,dense*'); "
        "default all. Results are cached per build, so a later run of all reuses them.",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    needs = {
        "merge": ("data", "base", "moe-recipe.yaml"),
        "routing": ("data", "router"),
        "e2e": ("data", "router", "serve.yaml"),
    }
    for needed in sorted({n for t in tables for n in needs.get(t, ())}):
        if not (args.zoo / needed).exists():
            sys.exit(
                f"{args.zoo}/{needed} is missing: build the zoo first (moerge zoo build --out {args.zoo})"
            )
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "quality.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = time.perf_counter()
    if "merge" in tables:
        results["merge"] = merge_table(
            args.zoo,
            args.work,
            args.rows,
            not args.skip_mergekit,
            not args.skip_tuned,
            args.domains.split(","),
            [p.strip() for p in args.variants.split(",") if p.strip()],
        )
    if "routing" in tables:
        results["routing"] = routing_table(args.zoo, max(args.rows, 200))
    if "e2e" in tables:
        results["e2e"] = e2e_table(args.zoo, args.work, args.e2e_rows)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results_path.write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.work / "quality.md").write_text(text)
    plots(results)
    print(text)


if __name__ == "__main__":
    main()
