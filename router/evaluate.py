"""`moerge router eval`: metrics of a trained router on any JSONL with `prompt` and a label field.

Quality is computed from one encoding pass: the artifact's own head goes through the same decision
policy as serving (confidence floor → fallback), and with `compare` every other head of the artifact plus
the majority and random baselines are scored on the same features. Latency is measured separately on
real unbatched `decide` calls with the cache off (p50/p99), and batched throughput likewise.
May import: router.*, numpy; matplotlib inside `plot_confusion` only.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.base import RoutingRequest
from router.data import BadRows, DataError, read_jsonl
from router.heads.base import Features
from router.learned import LearnedRouter
from router.policy import DecisionMaker


def load_labelled(
    paths: Sequence[Path],
    label_field: str,
    label_map: dict[str, str],
    experts: Sequence[str],
    skip_unknown: bool = False,
    on_bad_rows: str = "error",
) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, int]]:
    """Rows and their expert indices; labels the map does not know are an error (or skipped, counted)."""
    index = {e: i for i, e in enumerate(experts)}
    rows: list[dict[str, Any]] = []
    labels: list[int] = []
    unknown: Counter[str] = Counter()
    for path in paths:
        for row in read_jsonl(path, on_bad_rows, BadRows()):
            value = row.get(label_field)
            expert = label_map.get(str(value)) if value is not None else None
            if expert not in index:
                unknown[str(value)] += 1
                continue
            rows.append(row)
            labels.append(index[expert])
    if unknown and not skip_unknown:
        raise DataError(
            f"labels in field {label_field!r} that map to no expert: {dict(unknown)}; known: {sorted(label_map)}"
            " (map them with --map LABEL=EXPERT or pass --skip-unknown)"
        )
    if not rows:
        raise DataError(f"no evaluable rows in {[str(p) for p in paths]}")
    return rows, np.array(labels), dict(unknown)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def classification_metrics(
    y: np.ndarray, pred: np.ndarray, confidence: np.ndarray, experts: Sequence[str]
) -> dict[str, Any]:
    n = len(experts)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (y, pred), 1)
    per_class = {}
    f1s = []
    for i, e in enumerate(experts):
        tp = matrix[i, i]
        precision = tp / matrix[:, i].sum() if matrix[:, i].sum() else 0.0
        recall = tp / matrix[i].sum() if matrix[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[e] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(matrix[i].sum()),
        }
        if matrix[i].sum():
            f1s.append(f1)
    return {
        "n": int(len(y)),
        "accuracy": round(float((y == pred).mean()), 4),
        "macro_f1": round(float(np.mean(f1s)), 4),
        "ece": round(expected_calibration_error(confidence, y == pred), 4),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(experts), "rows_true_cols_predicted": matrix.tolist()},
    }


def plot_confusion(matrix: list[list[int]], labels: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(matrix, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted expert")
    ax.set_ylabel("true expert")
    ax.set_title(title, fontsize=9)
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def policy_decisions(
    router: LearnedRouter, kind: str, p: np.ndarray, novel: Sequence[tuple[str, float] | None] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Head probabilities (and novelty verdicts, see `served_novelty`) → (expert indices, confidences,
    fallbacks) through the serving policy."""
    maker = DecisionMaker(router.policy, kind, router.version)
    index = {e: i for i, e in enumerate(router.experts)}
    verdicts = novel if novel is not None else [None] * len(p)
    decided = [maker.decide(row, None, kind, {}, v) for row, v in zip(p, verdicts, strict=True)]
    pred = np.array([index[d.expert] for d in decided])
    fallbacks = sum(d.reason.startswith(("below-floor", "novel")) for d in decided)
    return pred, p.max(1), fallbacks


def served_novelty(
    router: LearnedRouter, feats: Features, served_p: np.ndarray, answered: np.ndarray
) -> list[tuple[str, float] | None]:
    """The novelty verdicts serving reaches: only prompts the fast path left to the encoder are checked."""
    verdicts = router.novel(feats.sentence, served_p)
    return [None if done else v for v, done in zip(verdicts, answered, strict=True)]


def measure_latency(
    router: LearnedRouter, prompts: Sequence[str], samples: int, batch: int = 64
) -> dict[str, Any]:
    """Unbatched decide() latency (cache off) and batched decisions/s, on real prompts of the eval set."""
    if samples <= 0 or not prompts:
        return {}
    # evenly spaced over the file (eval files are often sorted by domain: the first N would be one domain)
    chosen = [prompts[(i * len(prompts)) // samples] for i in range(samples)]
    router.decide_batch([RoutingRequest.from_prompt(chosen[0])], use_cache=False)  # warm-up
    times = []
    for prompt in chosen:
        t = time.perf_counter()
        router.decide_batch([RoutingRequest.from_prompt(prompt)], use_cache=False)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    requests = [RoutingRequest.from_prompt(p) for p in chosen]
    t = time.perf_counter()
    for start in range(0, len(requests), batch):
        router.decide_batch(requests[start : start + batch], use_cache=False)
    rate = len(requests) / (time.perf_counter() - t)
    return {
        "latency_ms": {
            "p50": round(statistics.median(times), 3),
            "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
            "samples": len(times),
            "mode": "unbatched decide(), cache off",
        },
        "throughput_per_s": {"value": round(rate, 1), "batch_size": batch, "mode": "decide_batch, cache off"},
    }


def evaluate(
    router: LearnedRouter,
    rows: list[dict[str, Any]],
    y: np.ndarray,
    compare: bool = False,
    latency_samples: int = 200,
    group_field: str | None = None,
) -> dict[str, Any]:
    # the very string serving scores (the latest user turn, cleaned and capped)
    texts = router.prompt_texts([r["prompt"] for r in rows])
    needs_tokens = compare or router.head.needs_tokens
    feats, truncated = router.features(texts, needs_tokens=needs_tokens)
    head_p = router.head.proba(feats)
    p, fast_p, answered = router.cascade(texts, head_p)  # what serving decides
    novel = served_novelty(router, feats, p, answered)
    pred, confidence, fallbacks = policy_decisions(router, router.kind, p, novel)
    result: dict[str, Any] = {
        "router": router.kind,
        "version": router.version,
        **classification_metrics(y, pred, confidence, router.experts),
        "accuracy_without_floor": round(float((router.served_of[p.argmax(1)] == y).mean()), 4),
        "fallback_rate": round(fallbacks / len(y), 4),
        "novel_rate": round(sum(v is not None for v in novel) / len(y), 4),
        "truncated_prompts": int(truncated.sum()),
    }
    if group_field:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(str(r.get(group_field)), []).append(i)
        result["by_group"] = {
            g: {"n": len(ix), "accuracy": round(float((pred[ix] == y[ix]).mean()), 4)}
            for g, ix in sorted(groups.items())
        }
    if router.fast_path is not None:
        right = router.served_of[p.argmax(1)] == y
        result["fast_path"] = {
            "threshold": router.fast_path.threshold,
            "share": round(float(answered.mean()), 4),
            "accuracy_answered": round(float(right[answered].mean()), 4) if answered.any() else None,
            "accuracy_rest": round(float(right[~answered].mean()), 4) if (~answered).any() else None,
        }
    if compare:
        result["compare"] = compare_heads(router, feats, y)
        if router.fast_path is not None:
            result["compare"].update(compare_fast_path(router, fast_p, p, y))
    result.update(measure_latency(router, texts, latency_samples))
    return result


def compare_heads(router: LearnedRouter, feats: Features, y: np.ndarray) -> dict[str, Any]:
    """Every head of the artifact under the same policy, plus majority and random baselines."""
    out: dict[str, Any] = {}
    n = len(router.experts)
    train_counts = router.training_counts()
    majority = max(range(n), key=lambda i: train_counts.get(router.experts[i], 0))
    baselines = {
        "majority": np.full(len(y), majority),
        "random": np.random.default_rng(0).integers(0, n, len(y)),
    }
    for name, pred in baselines.items():
        m = classification_metrics(
            y, pred, np.full(len(y), 1.0 if name == "majority" else 1.0 / n), router.experts
        )
        out[name] = _summary(m)
    for kind, head in sorted(router.heads.items()):
        p = head.proba(feats)
        pred, confidence, fallbacks = policy_decisions(router, kind, p)
        m = classification_metrics(y, pred, confidence, router.experts)
        out[kind] = {
            **_summary(m),
            "accuracy_without_floor": round(float((router.served_of[p.argmax(1)] == y).mean()), 4),
        }
        if "combine" in head.params():  # the hybrid's kept form
            out[kind]["combine"] = head.params()["combine"]
    return out


def compare_fast_path(
    router: LearnedRouter, fast_p: np.ndarray, cascade: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """The n-gram stage alone, and the cascade (n-gram where sure, else the served head)."""
    out: dict[str, Any] = {}
    for name, p in (("ngram", fast_p), (f"ngram→{router.kind}", cascade)):
        pred, confidence, _ = policy_decisions(router, name, p)
        m = classification_metrics(y, pred, confidence, router.experts)
        out[name] = {
            **_summary(m),
            "accuracy_without_floor": round(float((router.served_of[p.argmax(1)] == y).mean()), 4),
        }
    return out


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m["ece"],
        "per_class_f1": {e: c["f1"] for e, c in m["per_class"].items()},
        "per_class_recall": {e: c["recall"] for e, c in m["per_class"].items()},
    }
