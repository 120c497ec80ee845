"""`moerge router train`: data → split → one encoding pass → every head fit → calibrated → artifact.

Order of work, and why (each step is one function below, called in this order by `train_router`):
1. `read_training_rows`: each expert's rows are read strictly and split: whole groups and a share of
   rows are held out (written to heldout.jsonl, never trained on).
2. `validation_mask`: a validation split (same hold-out recipe, another salt, so it too contains unseen
   groups) is held back from fitting, to calibrate on.
3. `encode_training`: the training rows are encoded once (sentence embeddings, per-row token sums for
   the gates, token states kept in fp16 for the gate aggregates).
4. `calibrate`: every head (router/heads/) is fit on the rest and its temperature fit on validation —
   calibration for unseen phrasing; a head with several forms (the hybrid's `combine: auto`) keeps the
   most accurate one here.
5. `fit_final`: every head is refit on all training rows in its kept form, keeping the temperatures.
6. `fit_fast_path`, `fit_novelty`: the n-gram stage and the novelty check, when configured.
7. `artifact_spec` → `write_artifact`: router.json (router/schema.py), weights, manifest.

May import: router.* (never serving), numpy; torch and sentence-transformers only through router.encoder.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from router.encoder import Encoder
from router.gates import TokenGates
from router.heads import head_type
from router.heads.base import Features, FitData, Head
from router.heads.token_gates import TokenGatesOptions
from router.linear import fit_temperature
from router.ngram import fit_ngram
from router.novelty import NoveltyCheck
from router.schema import FORMAT, ArtifactPolicy, FastPathSpec, GatesRef, NoveltySpec, RouterSpec

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total) → advance(n)
Log = Callable[[str], None]


@dataclass
class TrainingRows:
    """Every expert's training rows (after hold-out and caps) with their class, and what was held out."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    heldout_lines: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # per expert: files, rows, held-out groups, …
    bad: BadRows = field(default_factory=BadRows)

    @property
    def y(self) -> np.ndarray:
        return np.array(self.labels)

    @property
    def texts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]


@dataclass
class Encoded:
    sentence: np.ndarray  # (n, d)
    token_sums: np.ndarray  # (n, d) sum of unit token states per row
    token_counts: np.ndarray  # (n,)
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (row indices, fp16 tokens, mask)
    truncated: np.ndarray  # (n,)


@dataclass
class Calibration:
    """What the validation pass decided: temperatures and accuracies by form (`kind` or `kind:form`),
    and the form each head keeps ('' for a head with one form)."""

    temperatures: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)


def read_training_rows(cfg: TrainConfig, log: Log) -> TrainingRows:
    """Step 1: read, hold out, cap; an expert left with fewer than `min_examples` rows is an error."""
    out = TrainingRows()
    for label, (name, spec) in enumerate(cfg.experts.items()):
        rows = load_expert_rows(name, spec, cfg.on_bad_rows, out.bad)
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
        out.heldout_lines += [json.dumps(public_row(r, name), ensure_ascii=False) for r in split.held]
        out.rows += pool
        out.labels += [label] * len(pool)
        out.meta[name] = {
            "files": [str(f) for f in spec.files],
            "where": spec.where,
            "rows": len(rows),
            "heldout_rows": len(split.held),
            "heldout_groups": split.held_groups,
            "train_rows": len(pool),
        }
        held = split.held_groups or ""
        log(f"{name}: {len(rows)} rows → {len(pool)} train, {len(split.held)} held out {held}")
    if out.bad.counts:
        log(f"skipped bad rows: {dict(out.bad.counts)} e.g. {out.bad.examples}")
    return out


def validation_mask(cfg: TrainConfig, data: TrainingRows) -> np.ndarray:
    """Step 2: the rows held back from fitting (an expert keeps at least min_examples/2 and 2 to fit)."""
    y = data.y
    valid = np.zeros(len(y), bool)
    for label, (name, spec) in enumerate(cfg.experts.items()):
        idx = np.flatnonzero(y == label)
        own = [data.rows[i] for i in idx]
        recipe = spec.holdout.model_copy(update={"fraction": cfg.validation_fraction})
        held_keys = {row_key(r) for r in split_rows(own, recipe, cfg.seed, f"validation:{name}").held}
        chosen = [i for i, r in zip(idx, own, strict=True) if row_key(r) in held_keys]
        if len(idx) - len(chosen) >= cfg.min_examples // 2 and len(idx) - len(chosen) >= 2:
            valid[chosen] = True
        data.meta[name]["validation_rows"] = int(valid[idx].sum())
    return valid


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


def encode_training(
    cfg: TrainConfig, texts: list[str], progress: ProgressFactory | None, log: Log
) -> tuple[Encoder, Encoded, float]:
    """Step 3: the encoder the config names, and one pass over the training prompts (with its seconds)."""
    e = cfg.encoder
    encoder = Encoder(
        e.model,
        e.max_seq_length,
        e.precision,
        layers=e.layers,
        truncation=e.truncation,
        pool_layers=e.pool_layers,
    )
    advance = progress("encoding training prompts", len(texts)) if progress else None
    t0 = time.time()
    encoded = encode_rows(encoder, texts, e.batch_size, advance)
    seconds = time.time() - t0
    log(f"encoded {len(texts)} prompts in {seconds:.1f}s ({int(encoded.truncated.sum())} truncated)")
    return encoder, encoded, seconds


def gate_features(encoded: Encoded, gates: TokenGates, n_experts: int) -> np.ndarray:
    out = np.zeros((len(encoded.sentence), 3 * n_experts), np.float32)
    for index, tokens, mask in encoded.chunks:
        out[index] = gates.aggregate(tokens.astype(np.float32), mask)
    return out


def fit_pass_data(
    cfg: TrainConfig, encoded: Encoded, y: np.ndarray, rows: np.ndarray, n: int
) -> tuple[TokenGates, FitData]:
    """The token gates fit on `rows`, and what every head of this pass is fit on."""
    sums = np.stack([encoded.token_sums[rows & (y == i)].sum(0) for i in range(n)])
    counts = np.array([encoded.token_counts[rows & (y == i)].sum() for i in range(n)])
    options = cfg.head_options()
    gate_options = options["token-gates"]
    assert isinstance(gate_options, TokenGatesOptions)
    gates = TokenGates.fit(sums, counts, gate_options.top_k)
    tokens = gate_features(encoded, gates, n)
    return gates, FitData(encoded.sentence, tokens, y, rows, n, cfg.seed, options)


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean()) if len(y) else float("nan")


def calibrate(
    cfg: TrainConfig, encoded: Encoded, y: np.ndarray, valid: np.ndarray, kinds: list[str], log: Log
) -> Calibration:
    """Step 4: fit every form of every head on the non-validation rows; temperatures and accuracies on
    validation; each head keeps its most accurate form (the first on ties)."""
    _, data = fit_pass_data(cfg, encoded, y, ~valid, len(cfg.experts))
    features, yv = Features(encoded.sentence[valid], data.tokens[valid]), y[valid]
    out = Calibration()
    fitted: dict[str, Head] = {}
    for kind in kinds:
        head_kind, options = head_type(kind), data.options[kind]
        for variant in head_kind.forms(options):
            head = head_kind.fit(replace(data, fitted=fitted), options, variant)
            key = head_kind.key(variant)
            if head.calibrated:
                out.temperatures[key] = fit_temperature(head.logits(features), yv) if valid.any() else 1.0
                head.temperature = out.temperatures[key]
            out.validation[key] = accuracy(head.proba(features), yv)
            kept = out.chosen.get(kind)
            if kept is None or out.validation[key] > out.validation[head_kind.key(kept)]:
                out.chosen[kind], fitted[kind] = variant, head
    log(f"validation accuracy {out.validation}; forms kept {out.chosen}")
    return out


def fit_final(
    cfg: TrainConfig, encoded: Encoded, y: np.ndarray, kinds: list[str], calibration: Calibration
) -> tuple[TokenGates, dict[str, Head]]:
    """Step 5: every head refit on all training rows in the form it kept, with its temperature."""
    gates, data = fit_pass_data(cfg, encoded, y, np.ones(len(y), bool), len(cfg.experts))
    final: dict[str, Head] = {}
    for kind in kinds:
        head_kind, variant = head_type(kind), calibration.chosen[kind]
        head = head_kind.fit(replace(data, fitted=final), data.options[kind], variant)
        if head.calibrated:
            head.temperature = calibration.temperatures[head_kind.key(variant)]
        final[kind] = head
    return gates, final


def fit_fast_path(
    cfg: TrainConfig, texts: list[str], y: np.ndarray, valid: np.ndarray, log: Log
) -> tuple[dict[str, np.ndarray], FastPathSpec | None]:
    """Step 6a: the n-gram stage (fit on the fitting rows, threshold chosen on validation)."""
    if not cfg.fast_path.enabled:
        return {}, None
    fp = cfg.fast_path
    t0 = time.time()
    ngram, report = fit_ngram(
        texts,
        y,
        len(cfg.experts),
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
    report["seconds"] = round(time.time() - t0, 1)
    log(f"n-gram fast path: {report}")
    return ngram.tensors(), FastPathSpec.model_validate({**ngram.params(), "report": report})


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


def artifact_spec(
    cfg: TrainConfig,
    encoder: Encoder,
    gates: TokenGates,
    heads: dict[str, Head],
    fallback: str,
    fast_path: FastPathSpec | None,
    novelty: NoveltySpec | None,
    training: dict[str, Any],
) -> RouterSpec:
    """Step 7: router.json, every value explicit (the schema has no defaults for a reader to disagree with)."""
    return RouterSpec.model_validate(
        {
            "format": FORMAT,
            "kind": cfg.kind,
            "experts": list(cfg.experts),
            "heads": {name: head.params() for name, head in heads.items()},
            "gates": GatesRef(top_k=gates.top_k, method="standardised contrastive mean direction, cosine"),
            "fast_path": fast_path,
            "novelty": novelty,
            "policy": ArtifactPolicy(fallback=fallback, **cfg.policy.model_dump(exclude={"fallback"})),
            "encoder": encoder.reference(),
            "label_field": cfg.label_field,
            "label_map": cfg.served_label_map(),
            "serve_as": cfg.serve_as or {},
            "training": training,
        }
    )


def train_router(
    cfg: TrainConfig,
    out_dir: Path,
    progress: ProgressFactory | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train and write the artifact; returns router.json's content with its `version` and `digest`."""
    from router.artifact import version_of, write_artifact

    started = time.time()
    data = read_training_rows(cfg, log)
    y, experts = data.y, list(cfg.experts)
    valid = validation_mask(cfg, data)
    encoder, encoded, encode_s = encode_training(cfg, data.texts, progress, log)
    kinds = cfg.trained_kinds()
    calibration = calibrate(cfg, encoded, y, valid, kinds, log)
    gates, heads = fit_final(cfg, encoded, y, kinds, calibration)
    counts = Counter(int(v) for v in y)
    fallback = cfg.policy.fallback or experts[max(range(len(experts)), key=lambda i: counts[i])]
    tensors: dict[str, np.ndarray] = {"gates.center": gates.center, "gates.vectors": gates.vectors}
    for head in heads.values():
        tensors.update(head.tensors())
    fast_tensors, fast_path = fit_fast_path(cfg, data.texts, y, valid, log)
    tensors.update(fast_tensors)
    novelty = None
    if cfg.novelty.enabled:
        check = fit_novelty(cfg, encoded.sentence, y, valid, len(experts), experts.index(fallback))
        log(f"novelty check: {check.params()}")
        tensors.update(check.tensors())
        novelty = NoveltySpec.model_validate(check.params())
    training = {
        "config": cfg.model_dump(mode="json"),
        "data": data.meta,
        "train_rows": len(y),
        "validation_rows": int(valid.sum()),
        "validation_accuracy": calibration.validation,
        "temperatures": calibration.temperatures,
        "forms": calibration.chosen,
        "truncated_train_prompts": int(encoded.truncated.sum()),
        "skipped_bad_rows": dict(data.bad.counts),
        "encode_seconds": round(encode_s, 1),
        "seconds": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    spec = artifact_spec(cfg, encoder, gates, heads, fallback, fast_path, novelty, training)
    heldout = ("\n".join(data.heldout_lines) + "\n").encode() if data.heldout_lines else b""
    digest = write_artifact(Path(out_dir), spec, tensors, {"heldout.jsonl": heldout})
    log(f"wrote {out_dir} (digest {digest}, kind {cfg.kind}, heads {sorted(heads)})")
    return {"version": version_of(digest), "digest": digest, **spec.as_json()}


def _versions() -> dict[str, str]:
    import sentence_transformers
    import sklearn
    import torch

    return {
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
