"""The novelty check: a prompt unlike a specialist's training prompts goes to the generalist instead.

Why: a fine-tuned expert is better than the base on prompts like the ones it was trained on, and can be
worse on everything else. The classifier must still name a class for a prompt from none of them (the
demo's `general` catch-all, a P3 template the text expert never saw), and it often names a specialist.
This check asks a second question of the encoder's verdict: is the prompt near the picked expert's own
training prompts? Its score is the mean cosine similarity to the k nearest training prompts of that
expert; below the expert's threshold the prompt is "novel" and the policy sends it to the fallback.
Only the classes with rows in the bank are checked (`novelty.classes`; default all but the fallback).
A narrow specialist is the clearest case: the demo's arithmetic model, trained from scratch on sums,
is useless for anything else, so a prompt unlike its training prompts should never reach it.

Each expert's threshold is the `quantile` of the same score over its validation prompts (the training
rows held out from fitting), so about that share of in-distribution prompts fall back. The fallback
expert itself is never checked. Prompts the n-gram fast path answers are not checked either: it answers
only prompts it is sure of, and they never reach the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class NoveltyCheck:
    bank: np.ndarray  # (m, d) unit sentence embeddings of training prompts (float16 on disk)
    labels: np.ndarray  # (m,) expert index of each bank row
    thresholds: np.ndarray  # (n,) per expert; -inf: never novel (the fallback, or no bank rows)
    k: int = 5
    quantile: float = 0.05

    def __post_init__(self) -> None:
        self.bank = np.asarray(self.bank, np.float32)
        self.labels = np.asarray(self.labels, np.int32)
        self.thresholds = np.asarray(self.thresholds, np.float32)
        if self.bank.ndim != 2 or len(self.labels) != len(self.bank):
            raise ValueError(f"novelty bank {self.bank.shape} and labels {self.labels.shape} disagree")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.thresholds)):
            raise ValueError(f"novelty labels must name one of the {len(self.thresholds)} experts")
        if self.k < 1:
            raise ValueError(f"novelty k must be ≥ 1, got {self.k}")

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def similarity(self, sentence: np.ndarray, experts: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """Mean cosine similarity of each row to the k nearest bank prompts of its expert (nan: none).

        `exclude_self` drops each row's single best match (leave-one-out, for rows that are in the bank)."""
        sentence, experts = np.asarray(sentence, np.float32), np.asarray(experts)
        out = np.full(len(experts), np.nan, np.float32)
        for expert in np.unique(experts):  # one product per expert, against its own bank rows only
            rows, own = np.flatnonzero(experts == expert), self.bank[self.labels == expert]
            sims = sentence[rows] @ own.T
            if exclude_self and sims.shape[1]:
                sims = np.sort(sims, axis=1)[:, :-1]
            k = min(self.k, sims.shape[1])
            if k:
                out[rows] = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(1)
        return out

    def novel(self, sentence: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(novel mask, similarity) for prompts whose picked experts are `experts`; only prompts whose
        expert is checked are scored (the others get similarity nan)."""
        experts = np.asarray(experts)
        limit = self.thresholds[experts]
        checked = np.isfinite(limit)
        similarity = np.full(len(experts), np.nan, np.float32)
        if checked.any():
            similarity[checked] = self.similarity(np.asarray(sentence)[checked], experts[checked])
        return np.nan_to_num(similarity, nan=np.inf) < limit, similarity

    @classmethod
    def fit(
        cls,
        bank: np.ndarray,
        labels: np.ndarray,
        valid: np.ndarray,
        valid_labels: np.ndarray,
        n: int,
        *,
        skip: int,
        k: int = 5,
        quantile: float = 0.05,
    ) -> NoveltyCheck:
        """Thresholds from validation prompts scored against the bank; expert `skip` is never checked."""
        check = cls(bank, labels, np.full(n, -np.inf, np.float32), k, quantile)
        scores = check.similarity(valid, valid_labels)
        for expert in range(n):
            own = scores[(valid_labels == expert) & ~np.isnan(scores)]
            if expert != skip and len(own):
                check.thresholds[expert] = float(np.quantile(own, quantile))
        return check

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "novelty.bank": self.bank.astype(np.float16),
            "novelty.labels": self.labels,
            "novelty.thresholds": self.thresholds,
        }

    def params(self) -> dict[str, Any]:
        finite = {int(i): round(float(t), 4) for i, t in enumerate(self.thresholds) if np.isfinite(t)}
        return {"k": self.k, "quantile": self.quantile, "thresholds": finite}

    @classmethod
    def from_artifact(cls, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> NoveltyCheck:
        return cls(
            tensors["novelty.bank"],
            tensors["novelty.labels"],
            tensors["novelty.thresholds"],
            int(params["k"]),
            float(params["quantile"]),
        )
