"""The A/B report of an experiment, from the decision log: per-arm statistics, tests against control, SRM.

Latency and time to first token are compared with Mann-Whitney U (skewed, heavy-tailed: no normality
assumed), feedback scores with Welch's t-test (unequal variances and sizes), error rates with Fisher's
exact test. The sample-ratio-mismatch check compares each arm's count of assignment units (distinct sticky
keys such as users; a request without a key is its own unit) with its configured weight (chi-square;
requests are not independent draws when users are sticky); a p-value below 0.001 means assignment or logging is broken and the comparison
should not be trusted.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sqlalchemy import select

from serving.decision_log import decisions, feedback, make_engine

SRM_ALPHA = 0.001
DECISION_COLUMNS = (
    "request_id",
    "arm",
    "unit",
    "expert",
    "served_expert",
    "status",
    "latency_s",
    "ttft_s",
    "tokens_in",
    "tokens_out",
)


def load_experiment(
    url: str, experiment: str
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Decision rows of the experiment's attributed requests, and feedback rows by request id."""
    engine = make_engine(url)
    cols = [decisions.c[c] for c in DECISION_COLUMNS]
    try:
        with engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    select(*cols).where(decisions.c.experiment == experiment, decisions.c.arm.is_not(None))
                )
            ]
            fb: dict[str, list[dict[str, Any]]] = defaultdict(list)
            query = (
                select(feedback.c.request_id, feedback.c.score, feedback.c.label)
                .join(decisions, decisions.c.request_id == feedback.c.request_id)
                .where(decisions.c.experiment == experiment)
            )
            for r in conn.execute(query):
                fb[r.request_id].append({"score": r.score, "label": r.label})
    finally:
        engine.dispose()
    return rows, dict(fb)


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean with a t-distribution confidence interval (None bounds below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def _arm_stats(rows: list[dict[str, Any]], fb: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    experts = Counter(r["served_expert"] or r["expert"] for r in rows)
    n = len(rows)
    errors = sum(1 for r in rows if r["status"] >= 400)
    scores = _scores(rows, fb)
    labels: Counter[str] = Counter(
        f["label"] for r in rows for f in fb.get(r["request_id"], []) if f["label"]
    )
    return {
        "n": n,
        "units": units(rows),
        "errors": errors,
        "error_rate": errors / n if n else None,
        "expert_mix": {e: c / n for e, c in experts.most_common()},
        "latency_s": _quantiles([r["latency_s"] for r in rows if r["latency_s"] is not None]),
        "ttft_s": _quantiles([r["ttft_s"] for r in rows if r["ttft_s"] is not None]),
        "tokens_in": _quantiles([r["tokens_in"] for r in rows if r["tokens_in"] is not None])["mean"],
        "tokens_out": _quantiles([r["tokens_out"] for r in rows if r["tokens_out"] is not None])["mean"],
        "feedback": {**mean_ci(scores), "labels": dict(labels.most_common())},
    }


def units(rows: list[dict[str, Any]]) -> int:
    """Units of assignment: distinct sticky keys, plus each request assigned on its own."""
    return len({r["unit"] for r in rows if r.get("unit")}) + sum(1 for r in rows if not r.get("unit"))


def _scores(rows: list[dict[str, Any]], fb: dict[str, list[dict[str, Any]]]) -> list[float]:
    """One score per request that got any: the mean of its scored feedback."""
    out = []
    for r in rows:
        s = [f["score"] for f in fb.get(r["request_id"], []) if f["score"] is not None]
        if s:
            out.append(sum(s) / len(s))
    return out


def _compare(
    arm: list[dict[str, Any]], control: list[dict[str, Any]], fb: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("latency_s", "ttft_s"):
        a = [r[field] for r in arm if r[field] is not None]
        c = [r[field] for r in control if r[field] is not None]
        if len(a) >= 2 and len(c) >= 2:
            p = float(stats.mannwhitneyu(a, c, alternative="two-sided").pvalue)
            out[field] = {"median_diff": float(np.median(a) - np.median(c)), "test": "mann-whitney", "p": p}
        else:
            out[field] = None
    sa, sc = _scores(arm, fb), _scores(control, fb)
    if len(sa) >= 2 and len(sc) >= 2:
        t = stats.ttest_ind(sa, sc, equal_var=False)
        ci = t.confidence_interval(0.95)
        out["feedback_score"] = {
            "mean_diff": float(np.mean(sa) - np.mean(sc)),
            "low": float(ci.low),
            "high": float(ci.high),
            "test": "welch-t",
            "p": float(t.pvalue),
        }
    else:
        out["feedback_score"] = None
    ea, ec = sum(r["status"] >= 400 for r in arm), sum(r["status"] >= 400 for r in control)
    if arm and control:
        p = float(stats.fisher_exact([[ea, len(arm) - ea], [ec, len(control) - ec]]).pvalue)
        out["error_rate"] = {"diff": ea / len(arm) - ec / len(control), "test": "fisher-exact", "p": p}
    else:
        out["error_rate"] = None
    return out


def srm_check(counts: dict[str, int], weights: dict[str, float]) -> dict[str, Any]:
    """Chi-square of observed arm counts against the configured weights (p < 0.001 flags a mismatch)."""
    arms = list(weights)
    observed = np.asarray([counts.get(a, 0) for a in arms], dtype=float)
    total = observed.sum()
    shares = np.asarray([weights[a] for a in arms], dtype=float)
    shares = shares / shares.sum()
    if total == 0 or len(arms) < 2:
        return {"p": None, "chi2": None, "mismatch": False, "expected": {}, "observed": counts}
    expected = shares * total
    res = stats.chisquare(observed, expected)
    return {
        "chi2": float(res.statistic),
        "p": float(res.pvalue),
        "mismatch": bool(res.pvalue < SRM_ALPHA),
        "expected": {a: float(e) for a, e in zip(arms, expected, strict=True)},
        "observed": {a: int(o) for a, o in zip(arms, observed, strict=True)},
    }


def build_report(
    experiment: str,
    rows: list[dict[str, Any]],
    fb: dict[str, list[dict[str, Any]]],
    weights: dict[str, float] | None = None,
    control: str | None = None,
) -> dict[str, Any]:
    """The whole report as plain JSON-able data. `weights` default: equal over the arms seen."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    assumed = weights is None
    weights = weights or dict.fromkeys(sorted(by_arm), 1.0)
    arms = list(weights) + sorted(set(by_arm) - set(weights))
    control = control or (arms[0] if arms else None)
    report: dict[str, Any] = {
        "experiment": experiment,
        "control": control,
        "requests": len(rows),
        "weights": weights,
        "weights_assumed_equal": assumed,
        "arms": {a: _arm_stats(by_arm.get(a, []), fb) for a in arms},
        "vs_control": {
            a: _compare(by_arm.get(a, []), by_arm.get(control, []) if control else [], fb)
            for a in arms
            if a != control
        },
        "srm": srm_check({a: units(by_arm.get(a, [])) for a in arms}, weights),
    }
    unknown = sorted(set(by_arm) - set(weights))
    if unknown:
        report["unconfigured_arms"] = unknown
    return report


# -- presentation --------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" + (" *" if p < 0.05 else "")


def print_report(report: dict[str, Any], console: Any) -> None:
    """Rich tables: per arm, then differences against control, then the SRM verdict."""
    from rich.table import Table

    t = Table(title=f"experiment {report['experiment']} — {report['requests']} requests")
    for col in (
        "arm",
        "requests",
        "units",
        "errors",
        "expert mix",
        "p50 ms",
        "p95 ms",
        "TTFT p50 ms",
        "tok in",
        "tok out",
        "feedback (95% CI)",
    ):
        t.add_column(col, justify="left" if col in ("arm", "expert mix", "feedback (95% CI)") else "right")
    for arm, s in report["arms"].items():
        fb = s["feedback"]
        ci = f"{_fmt(fb['mean'])} [{_fmt(fb['low'])}, {_fmt(fb['high'])}] n={fb['n']}" if fb["n"] else "—"
        mix = ", ".join(f"{e} {v:.0%}" for e, v in list(s["expert_mix"].items())[:4])
        name = f"{arm} (control)" if arm == report["control"] else arm
        t.add_row(
            name,
            str(s["n"]),
            str(s["units"]),
            str(s["errors"]),
            mix,
            _ms(s["latency_s"]["p50"]),
            _ms(s["latency_s"]["p95"]),
            _ms(s["ttft_s"]["p50"]),
            _fmt(s["tokens_in"], 1),
            _fmt(s["tokens_out"], 1),
            ci,
        )
    console.print(t)
    if report["vs_control"]:
        d = Table(title=f"vs control `{report['control']}` (p < 0.05 marked *)")
        for col in (
            "arm",
            "Δ p50 latency ms (MWU p)",
            "Δ p50 TTFT ms (MWU p)",
            "Δ feedback [95% CI] (Welch p)",
            "Δ error rate (Fisher p)",
        ):
            d.add_column(col)
        for arm, c in report["vs_control"].items():
            lat, ttft, fbd, err = c["latency_s"], c["ttft_s"], c["feedback_score"], c["error_rate"]
            d.add_row(
                arm,
                f"{lat['median_diff'] * 1000:+.1f} ({_p(lat['p'])})" if lat else "—",
                f"{ttft['median_diff'] * 1000:+.1f} ({_p(ttft['p'])})" if ttft else "—",
                f"{fbd['mean_diff']:+.3f} [{fbd['low']:+.3f}, {fbd['high']:+.3f}] ({_p(fbd['p'])})"
                if fbd
                else "—",
                f"{err['diff']:+.3f} ({_p(err['p'])})" if err else "—",
            )
        console.print(d)
    srm = report["srm"]
    basis = (
        "equal weights (assumed: pass --config or --weights)"
        if report["weights_assumed_equal"]
        else "configured weights"
    )
    if srm["p"] is None:
        console.print(f"sample ratio check: not enough data ({basis})")
    elif srm["mismatch"]:
        console.print(
            f"[bold red]SAMPLE RATIO MISMATCH[/]: p = {srm['p']:.2g} < {SRM_ALPHA} against {basis}; "
            f"observed units {srm['observed']} vs expected { {a: round(e, 1) for a, e in srm['expected'].items()} }. "
            "Do not trust the comparison: check assignment and logging."
        )
    else:
        console.print(f"sample ratio check: ok (chi-square p = {srm['p']:.2g} against {basis})")


def plot_report(report: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """A 2×2 PNG: latency by arm, feedback mean with 95% CI, expert mix, observed vs expected counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    data = [
        [r["latency_s"] * 1000 for r in rows if r["arm"] == a and r["latency_s"] is not None] for a in arms
    ]
    if any(data):
        ax.boxplot([d or [float("nan")] for d in data], showfliers=False)
        ax.set_xticks(range(1, len(arms) + 1), arms)
    ax.set_title("latency (ms)")
    ax = axes[0][1]
    means = [report["arms"][a]["feedback"]["mean"] for a in arms]
    lows = [report["arms"][a]["feedback"]["low"] for a in arms]
    highs = [report["arms"][a]["feedback"]["high"] for a in arms]
    xs = [i for i, m in enumerate(means) if m is not None]
    if xs:
        err = [
            [means[i] - lows[i] if lows[i] is not None else 0 for i in xs],
            [highs[i] - means[i] if highs[i] is not None else 0 for i in xs],
        ]
        ax.errorbar(xs, [means[i] for i in xs], yerr=err, fmt="o", capsize=6)
        ax.set_xticks(xs, [arms[i] for i in xs])
    ax.set_title("feedback score (mean, 95% CI)")
    ax = axes[1][0]
    experts = sorted({e for a in arms for e in report["arms"][a]["expert_mix"]})
    bottom = np.zeros(len(arms))
    for e in experts:
        vals = np.asarray([report["arms"][a]["expert_mix"].get(e, 0.0) for a in arms])
        ax.bar(arms, vals, bottom=bottom, label=e)
        bottom += vals
    if experts:
        ax.legend(fontsize=8)
    ax.set_title("expert mix")
    ax = axes[1][1]
    srm = report["srm"]
    x = np.arange(len(arms))
    ax.bar(x - 0.2, [srm["observed"].get(a, 0) for a in arms], 0.4, label="observed")
    ax.bar(x + 0.2, [srm["expected"].get(a, 0.0) for a in arms], 0.4, label="expected")
    ax.set_xticks(x, arms)
    ax.legend(fontsize=8)
    verdict = "MISMATCH" if srm["mismatch"] else "ok"
    ax.set_title(f"assignment units per arm (SRM {verdict}, p={_fmt(srm['p'], 3)})")
    fig.suptitle(f"A/B report: {report['experiment']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
