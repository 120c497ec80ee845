"""`moerge router train`: data → split → one encoding pass → every head fit → calibrated → artifact.

Order of work, and why:
1. Each expert's rows are read strictly and split: whole groups and a share of rows are held out
   (written to heldout.jsonl, never trained on).
2. The remaining rows are encoded once (sentence embeddings, per-row token sums for the gates, token
   states kept in fp16 for the gate aggregates).
3. A validation split (same hold-out recipe, another salt, so it too contains unseen groups) is held back;
   every head is fit on the rest and its temperature fit on validation — calibration for unseen phrasing.
   `hybrid.combine: auto` picks features or tie-breaker by validation accuracy here.
4. Every head is refit on all training rows, keeping the temperatures, and saved.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.config import TrainConfig
from router.data import (
    BadRows,
    DataError,
    cap_rows,
    cap_rows_balanced,
    load_expert_rows,
    public_row,
    row_key,
    split_rows,
)
from router.gates import TokenGates
from router.linear import fit_linear, fit_temperature
from router.ngram import fit_ngram
from router.novelty import NoveltyCheck
from router.scorers import (
    CentroidHead,
    Features,
    Head,
    HybridFeaturesHead,
    HybridTiebreakHead,
    KnnHead,
    LinearHead,
    TokenGateHead,
)

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total) → advance(n)


@dataclass
class Encoded:
    sentence: np.ndarray  # (n, d)
    token_sums: np.ndarray  # (n, d) sum of unit token states per row
    token_counts: np.ndarray  # (n,)
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (row indices, fp16 tokens, mask)
    truncated: np.ndarray  # (n,)


def encode_rows(
    encoder: Any, texts: list[str], batch_size: int, advance: Callable[[int], None] | None
) -> Encoded:
    n = len(texts)
    sentence = np.zeros((n, getattr(encoder, "sentence_dim", encoder.dim)), np.float32)
    sums = np.zeros((n, encoder.dim), np.float32)
    counts = np.zeros(n, np.float32)
    truncated = np.zeros(n, bool)
    chunks = []
    for index, chunk in encoder.encode(texts, batch_size=batch_size, progress=advance):
        sentence[index] = chunk.sentence
        truncated[index] = chunk.truncated
        m = chunk.mask[..., None]
        sums[index] = (chunk.tokens * m).sum(1)
        counts[index] = chunk.mask.sum(1)
        chunks.append((index, chunk.tokens.astype(np.float16), chunk.mask))
    return Encoded(sentence, sums, counts, chunks, truncated)


def gate_features(encoded: Encoded, gates: TokenGates, n_experts: int) -> np.ndarray:
    out = np.zeros((len(encoded.sentence), 3 * n_experts), np.float32)
    for index, tokens, mask in encoded.chunks:
        out[index] = gates.aggregate(tokens.astype(np.float32), mask)
    return out


def fit_heads(
    cfg: TrainConfig,
    encoded: Encoded,
    y: np.ndarray,
    rows: np.ndarray,
    kinds: list[str],
    n: int,
    hybrid_features: bool = True,
) -> tuple[TokenGates, np.ndarray, dict[str, Head]]:
    """Fit gates and the requested heads on the rows selected by the boolean mask `rows`
    (`hybrid_features=False` skips the hybrid's own classifier, when its tie-break form is the one kept)."""
    sums = np.stack([encoded.token_sums[rows & (y == i)].sum(0) for i in range(n)])
    counts = np.array([encoded.token_counts[rows & (y == i)].sum() for i in range(n)])
    gates = TokenGates.fit(sums, counts, cfg.token_gates.top_k)
    tokens = gate_features(encoded, gates, n)
    x, yy = encoded.sentence[rows], y[rows]
    weight = None if cfg.classifier.class_weight == "none" else "balanced"
    clf = dict(model=cfg.classifier.model, c=cfg.classifier.C, class_weight=weight, seed=cfg.seed)
    heads: dict[str, Head] = {}
    if "centroid" in kinds:
        heads["centroid"] = CentroidHead.fit(x, yy, n)
    if "knn" in kinds:
        bank = np.flatnonzero(rows)
        if len(bank) > cfg.knn.max_examples:
            bank = np.random.default_rng(cfg.seed).choice(bank, cfg.knn.max_examples, replace=False)
        heads["knn"] = KnnHead(encoded.sentence[bank], y[bank], n, cfg.knn.k)
    if {"classifier", "hybrid"} & set(kinds):
        heads["classifier"] = LinearHead(fit_linear(x, yy, n, **clf))
    if {"token-gates", "hybrid"} & set(kinds):
        heads["token-gates"] = TokenGateHead(n, cfg.token_gates.aggregate)
    if "hybrid" in kinds and hybrid_features:
        both = np.concatenate([encoded.sentence, tokens], axis=1)[rows]
        heads["hybrid:features"] = HybridFeaturesHead(fit_linear(both, yy, n, **clf))
    return gates, tokens, heads


def fit_novelty(
    cfg: TrainConfig, sentence: np.ndarray, y: np.ndarray, valid: np.ndarray, n: int, fallback: int
) -> NoveltyCheck:
    """Thresholds from the validation rows against a bank of the fitting rows; the served bank then holds
    every training row of the checked classes (`novelty.classes`, never the fallback)."""
    names = list(cfg.experts)
    classes = cfg.novelty.classes or names  # the fallback is never checked, named or not
    checked = np.isin(y, [names.index(c) for c in classes]) & (y != fallback)

    def bank(rows: np.ndarray) -> np.ndarray:
        chosen = np.flatnonzero(rows & checked)
        if len(chosen) > cfg.novelty.max_examples:
            chosen = np.sort(np.random.default_rng(cfg.seed).choice(chosen, cfg.novelty.max_examples, False))
        return chosen

    fit_rows = bank(~valid)
    check = NoveltyCheck.fit(
        sentence[fit_rows],
        y[fit_rows],
        sentence[valid],
        y[valid],
        n,
        skip=fallback,
        k=cfg.novelty.k,
        quantile=cfg.novelty.quantile,
    )
    served = bank(np.ones(len(y), bool))
    return NoveltyCheck(sentence[served], y[served], check.thresholds, check.k, check.quantile)


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean()) if len(y) else float("nan")


def train_router(
    cfg: TrainConfig,
    out_dir: Path,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from router.artifact import write_artifact
    from router.encoder import Encoder

    started = time.time()
    experts = list(cfg.experts)
    n = len(experts)
    bad = BadRows()
    train_rows: list[tuple[dict[str, Any], int]] = []
    heldout_lines: list[str] = []
    data_meta: dict[str, Any] = {}
    for label, (name, spec) in enumerate(cfg.experts.items()):
        rows = load_expert_rows(name, spec, cfg.on_bad_rows, bad)
        split = split_rows(rows, spec.holdout, cfg.seed, f"heldout:{name}")
        if spec.balance_field:
            pool = cap_rows_balanced(split.kept, spec.max_train, cfg.seed, spec.balance_field)
        else:
            pool = cap_rows(split.kept, spec.max_train, cfg.seed)
        if len(pool) < cfg.min_examples:
            raise DataError(
                f"expert {name!r} has {len(pool)} training rows after the hold-out (of {len(rows)}); "
                f"at least min_examples={cfg.min_examples} are needed"
            )
        heldout_lines += [json.dumps(public_row(r, name), ensure_ascii=False) for r in split.held]
        train_rows += [(r, label) for r in pool]
        data_meta[name] = {
            "files": [str(f) for f in spec.files],
            "where": spec.where,
            "rows": len(rows),
            "heldout_rows": len(split.held),
            "heldout_groups": split.held_groups,
            "train_rows": len(pool),
        }
        log(
            f"{name}: {len(rows)} rows → {len(pool)} train, {len(split.held)} held out {split.held_groups or ''}"
        )
    if bad.counts:
        log(f"skipped bad rows: {dict(bad.counts)} e.g. {bad.examples}")

    y = np.array([label for _, label in train_rows])
    valid = np.zeros(len(train_rows), bool)
    for label, (name, spec) in enumerate(cfg.experts.items()):
        idx = np.flatnonzero(y == label)
        own = [train_rows[i][0] for i in idx]
        recipe = spec.holdout.model_copy(update={"fraction": cfg.validation_fraction})
        held_keys = {row_key(r) for r in split_rows(own, recipe, cfg.seed, f"validation:{name}").held}
        chosen = [i for i, r in zip(idx, own, strict=True) if row_key(r) in held_keys]
        if len(idx) - len(chosen) >= cfg.min_examples // 2 and len(idx) - len(chosen) >= 2:
            valid[chosen] = True
        data_meta[name]["validation_rows"] = int(valid[idx].sum())

    encoder = Encoder(
        cfg.encoder.model,
        cfg.encoder.max_seq_length,
        cfg.encoder.precision,
        layers=cfg.encoder.layers,
        truncation=cfg.encoder.truncation,
        pool_layers=cfg.encoder.pool_layers,
    )
    texts = [r["prompt"] for r, _ in train_rows]
    advance = progress("encoding training prompts", len(texts)) if progress else None
    t0 = time.time()
    encoded = encode_rows(encoder, texts, cfg.encoder.batch_size, advance)
    encode_s = time.time() - t0
    log(f"encoded {len(texts)} prompts in {encode_s:.1f}s ({int(encoded.truncated.sum())} truncated)")

    kinds = ["hybrid", "classifier", "token-gates", "centroid", "knn"] if cfg.all_heads else [cfg.kind]
    fit_rows = ~valid
    _, val_tokens, heads = fit_heads(cfg, encoded, y, fit_rows, kinds, n)
    vf = Features(encoded.sentence[valid], val_tokens[valid])
    yv = y[valid]
    temperatures: dict[str, float] = {}
    validation: dict[str, float] = {}
    for name, head in heads.items():
        temperatures[name] = fit_temperature(head.logits(vf), yv) if valid.any() else 1.0
        head.temperature = temperatures[name]
        validation[name] = accuracy(head.proba(vf), yv)
    combine = cfg.hybrid.combine
    if "hybrid" in kinds:
        clf, tok = heads["classifier"], heads["token-gates"]
        assert isinstance(clf, LinearHead) and isinstance(tok, TokenGateHead)
        validation["hybrid:tiebreak"] = accuracy(
            HybridTiebreakHead(clf, tok, cfg.hybrid.tie_margin).proba(vf), yv
        )
        if combine == "auto":
            better = validation["hybrid:tiebreak"] > validation["hybrid:features"]
            combine = "tiebreak" if better else "features"
        log(f"hybrid combine: {combine} (validation accuracy {validation})")

    # the final fit on every row skips the hybrid's feature classifier when the tie-break form won (a
    # linear SVM fit saved, 12 s on the demo zoo)
    every = np.ones(len(y), bool)
    gates, _, final = fit_heads(cfg, encoded, y, every, kinds, n, hybrid_features=combine == "features")
    for name, head in final.items():
        head.temperature = temperatures[name]
    if "hybrid" in kinds:
        features_head = final.pop("hybrid:features", None)
        clf, tok = final["classifier"], final["token-gates"]
        assert isinstance(clf, LinearHead) and isinstance(tok, TokenGateHead)
        final["hybrid"] = (
            features_head
            if features_head is not None
            else HybridTiebreakHead(clf, tok, cfg.hybrid.tie_margin)
        )

    counts = Counter(int(v) for v in y)
    fallback = cfg.policy.fallback or experts[max(range(n), key=lambda i: counts[i])]
    tensors: dict[str, np.ndarray] = {"gates.center": gates.center, "gates.vectors": gates.vectors}
    for head in final.values():
        tensors.update(head.tensors())
    fast_path = None
    if cfg.fast_path.enabled:
        fp = cfg.fast_path
        t0 = time.time()
        ngram, fast_report = fit_ngram(
            texts,
            y,
            n,
            ~valid,
            valid,
            analyzer=fp.analyzer,
            ngram_range=fp.ngram_range,
            n_features=fp.n_features,
            c=fp.C,
            min_precision=fp.min_precision,
            threshold=fp.threshold,
            seed=cfg.seed,
        )
        fast_report["seconds"] = round(time.time() - t0, 1)
        log(f"n-gram fast path: {fast_report}")
        tensors.update(ngram.tensors())
        fast_path = {**ngram.params(), "report": fast_report}
    novelty = None
    if cfg.novelty.enabled:
        check = fit_novelty(cfg, encoded.sentence, y, valid, n, experts.index(fallback))
        log(f"novelty check: {check.params()}")
        tensors.update(check.tensors())
        novelty = check.params()
    spec: dict[str, Any] = {
        "kind": cfg.kind,
        "experts": experts,
        "heads": {name: head.params() for name, head in final.items()},
        "fast_path": fast_path,
        "novelty": novelty,
        "gates": {"top_k": gates.top_k, "method": "standardised contrastive mean direction, cosine"},
        "policy": {
            "confidence_floor": cfg.policy.confidence_floor,
            "fallback": fallback,
            "stickiness": cfg.policy.stickiness,
            "context_threshold": cfg.policy.context_threshold,
            "context_turns": cfg.policy.context_turns,
        },
        "encoder": encoder.reference(),
        "label_field": cfg.label_field,
        "label_map": cfg.served_label_map(),
        "serve_as": cfg.serve_as or {},
        "training": {
            "config": cfg.model_dump(mode="json"),
            "data": data_meta,
            "train_rows": len(y),
            "validation_rows": int(valid.sum()),
            "validation_accuracy": validation,
            "temperatures": temperatures,
            "hybrid_combine": combine if "hybrid" in kinds else None,
            "truncated_train_prompts": int(encoded.truncated.sum()),
            "skipped_bad_rows": dict(bad.counts),
            "encode_seconds": round(encode_s, 1),
            "seconds": round(time.time() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "versions": _versions(),
        },
    }
    heldout = ("\n".join(heldout_lines) + "\n").encode() if heldout_lines else b""
    version = write_artifact(Path(out_dir), spec, tensors, {"heldout.jsonl": heldout})
    log(f"wrote {out_dir} (version {version}, kind {cfg.kind}, heads {sorted(final)})")
    return {"version": version, **spec}


def _versions() -> dict[str, str]:
    import sentence_transformers
    import sklearn
    import torch

    return {
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
