"""The learned routers (`hybrid`, `classifier`, `token-gates`, `centroid`, `knn`) at serving time.

One class serves every learned kind: encode the latest user turn once (sentence embedding and, where the
head needs them, token-gate aggregates), score it with the kind's head, and apply the Policy. With a fast
path (router/ngram.py), prompts the n-gram stage is sure of skip the encoder; their reason is `ngram`.
With a novelty check (router/novelty.py), encoder-scored prompts unlike the picked expert's training
prompts go to the fallback (reason `novel→fallback`).
Repeated prompts hit an LRU cache of probabilities. `decide_batch` never raises: any failure becomes a fallback
decision whose reason and details say what went wrong.
May import: router.* (never serving), numpy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from router.base import Decision, Router, RoutingRequest
from router.encoder import Encoder
from router.gates import TokenGates
from router.heads.base import Features, Head
from router.ngram import NgramModel
from router.novelty import NoveltyCheck
from router.policy import DecisionMaker, Policy
from router.text import CHARS_PER_TOKEN_CAP, RoutingText, context_text, routing_text


class Scored(NamedTuple):
    """One prompt's probabilities, whether the encoder truncated it, the stage that scored it, and
    (expert, similarity) when the novelty check found it unlike the picked expert's training prompts."""

    p: np.ndarray
    truncated: bool
    stage: str  # the head's kind, or "ngram" for the fast path
    novel: tuple[str, float] | None = None


class LearnedRouter(Router):
    def __init__(
        self,
        experts: Sequence[str],
        kind: str,
        encoder: Encoder,
        heads: dict[str, Head],
        gates: TokenGates | None,
        policy: Policy,
        version: str,
        cache_size: int = 4096,
        batch_size: int = 64,
        meta: dict[str, Any] | None = None,
        fast_path: NgramModel | None = None,
        novelty: NoveltyCheck | None = None,
    ) -> None:
        # `experts` are the classes the heads score; decisions name the experts serving them (Policy.serve_as)
        self.classes = list(experts)
        if list(policy.experts) != self.classes:
            raise ValueError(f"the policy's classes {list(policy.experts)} differ from {self.classes}")
        super().__init__(policy.served_experts)
        # class index → index of the expert serving it, for harnesses that take argmaxes of probabilities
        self.served_of = np.array([self.experts.index(policy.served(c)) for c in self.classes])
        if kind not in heads:
            raise ValueError(f"this artifact has no {kind!r} head; it has: {', '.join(sorted(heads))}")
        self.name, self.kind, self.version = kind, kind, version
        self.encoder, self.heads, self.gates, self.policy = encoder, heads, gates, policy
        self.head = heads[kind]
        self.fast_path, self.novelty = fast_path, novelty
        if self.head.needs_tokens and gates is None:
            raise ValueError(f"the {kind!r} head needs token gates, which this artifact lacks")
        self.cache_size, self.batch_size = cache_size, batch_size
        self._cache: OrderedDict[str, Scored] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._maker = DecisionMaker(policy, kind, version)
        self.max_chars = encoder.max_seq_length * CHARS_PER_TOKEN_CAP
        self.meta = meta or {}
        self._self_check()

    def _self_check(self) -> None:
        """Score one all-zero feature row with every head: shapes that disagree fail at load, not later."""
        n = len(self.classes)
        probe = Features(
            np.zeros((1, self.encoder.sentence_dim), np.float32), np.zeros((1, 3 * n), np.float32)
        )
        if self.gates is not None and self.gates.vectors.shape != (n, self.encoder.dim):
            raise ValueError(
                f"gate vectors have shape {self.gates.vectors.shape}, expected {(n, self.encoder.dim)}"
            )
        for kind, head in self.heads.items():
            shape = head.proba(probe).shape
            if shape != (1, n):
                raise ValueError(f"head {kind!r} scores {shape[-1]} classes, the artifact names {n}")
        if self.fast_path is not None and self.fast_path.proba(["probe"]).shape != (1, n):
            raise ValueError(f"the n-gram fast path does not score the artifact's {n} classes")
        if self.novelty is not None and (
            self.novelty.dim != self.encoder.sentence_dim or len(self.novelty.thresholds) != n
        ):
            raise ValueError(
                f"the novelty check has {self.novelty.dim}-d prompts and {len(self.novelty.thresholds)} "
                f"thresholds; the encoder gives {self.encoder.sentence_dim}-d and the artifact names {n} classes"
            )

    def training_counts(self) -> dict[str, int]:
        data = self.meta.get("training", {}).get("data", {})
        counts: dict[str, int] = {}
        for c in self.classes:  # per served expert: the sum over its classes
            served = self.policy.served(c)
            counts[served] = counts.get(served, 0) + int(data.get(c, {}).get("train_rows", 0))
        return counts

    # -- features and probabilities (shared with the eval harness) --------------------------------
    def features(self, texts: Sequence[str], needs_tokens: bool | None = None) -> tuple[Features, np.ndarray]:
        """Encode texts → (Features, truncated flags). Token aggregates only when some head needs them."""
        if needs_tokens is None:
            needs_tokens = self.head.needs_tokens
        n = len(texts)
        sentence = np.zeros((n, self.encoder.sentence_dim), dtype=np.float32)
        tokens = np.zeros((n, 3 * len(self.classes)), dtype=np.float32) if needs_tokens else None
        truncated = np.zeros(n, dtype=bool)
        for index, chunk in self.encoder.encode(texts, batch_size=self.batch_size):
            sentence[index] = chunk.sentence
            truncated[index] = chunk.truncated
            if tokens is not None and self.gates is not None:
                tokens[index] = self.gates.aggregate(chunk.tokens, chunk.mask)
        return Features(sentence, tokens), truncated

    def prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        """The string serving scores for each prompt sent as a single user turn (cleaned and capped)."""
        return [routing_text(RoutingRequest.from_prompt(p), self.max_chars).text for p in prompts]

    def cascade(self, texts: Sequence[str], head_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(served probabilities, n-gram probabilities, answered mask): the fast path where it is sure,
        else the head's probabilities `head_p` — what `decide_batch` picks, for the eval harnesses."""
        fast_p, answered = self.fast_path_split(texts)
        return np.where(answered[:, None], fast_p, head_p), fast_p, answered

    def novel(self, sentence: np.ndarray, p: np.ndarray) -> list[tuple[str, float] | None]:
        """Per encoder-scored prompt: (picked class, similarity) if the novelty check flags it, else None."""
        if self.novelty is None or not len(p):
            return [None] * len(p)
        picked = p.argmax(1)
        flagged, similarity = self.novelty.novel(sentence, picked)
        return [
            (self.classes[e], float(s)) if f else None
            for e, f, s in zip(picked, flagged, similarity, strict=True)
        ]

    def fast_path_split(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n-gram probabilities, answered-by-the-fast-path mask); nothing answered without a fast path."""
        n = len(self.classes)
        if self.fast_path is None or not texts:
            return np.zeros((len(texts), n), np.float32), np.zeros(len(texts), bool)
        p = self.fast_path.proba(texts)
        return p, p.max(1) >= self.fast_path.threshold

    def _probabilities(self, texts: list[str], use_cache: bool) -> list[Scored]:
        results: list[Scored | None] = [None] * len(texts)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, text in enumerate(texts):
                hit = self._cache.get(text) if use_cache else None
                if hit is not None:
                    self._cache.move_to_end(text)
                    results[i] = hit
                else:
                    missing.setdefault(text, []).append(i)
        if missing:
            unique = list(missing)
            entries: list[Scored | None] = [None] * len(unique)
            fast_p, answered = self.fast_path_split(unique)
            for j in np.flatnonzero(answered):
                entries[j] = Scored(fast_p[j], False, "ngram")
            rest = [j for j in range(len(unique)) if not answered[j]]
            if rest:
                feats, truncated = self.features([unique[j] for j in rest])
                probs = self.head.proba(feats)
                novel = self.novel(feats.sentence, probs)
                for k, j in enumerate(rest):
                    entries[j] = Scored(probs[k], bool(truncated[k]), self.kind, novel[k])
            with self._cache_lock:
                for text, entry in zip(unique, entries, strict=True):
                    assert entry is not None
                    for i in missing[text]:
                        results[i] = entry
                    if use_cache and self.cache_size > 0:
                        self._cache[text] = entry
                        if len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
        return [r for r in results if r is not None]

    # -- decisions --------------------------------------------------------------------------------
    def decide_batch(self, requests: Sequence[RoutingRequest], use_cache: bool = True) -> list[Decision]:
        try:
            return self._decide_batch(requests, use_cache)
        except Exception as error:  # noqa: BLE001 - routing must never fail a request
            details: dict[str, Any] = {"error": repr(error)[:300]}
            return [self._maker.no_text(_previous(r), dict(details), why="router-error") for r in requests]

    def _decide_batch(self, requests: Sequence[RoutingRequest], use_cache: bool) -> list[Decision]:
        texts = [routing_text(r, self.max_chars) for r in requests]
        scored = [i for i, t in enumerate(texts) if not t.empty]
        probs = self._probabilities([texts[i].text for i in scored], use_cache) if scored else []
        by_index = dict(zip(scored, probs, strict=True))
        with_context = self._rescore_with_context(requests, by_index, use_cache)
        out = []
        for i, (request, text) in enumerate(zip(requests, texts, strict=True)):
            previous = _previous(request)
            details: dict[str, Any] = dict(text.notes)
            if i not in by_index:
                out.append(self._maker.no_text(previous, details))
                continue
            p, truncated, reason, novel = by_index[i]
            if i in with_context:
                (p, truncated, stage, novel), context = with_context[i]
                details.update({k: v for k, v in context.notes.items() if k not in details})
                details["context_turns"] = self.policy.settings.context_turns
                reason = f"{stage}+context"
            if truncated or "chars_cut" in details:
                details["truncated"] = True
                details["max_seq_length"] = self.encoder.max_seq_length
            out.append(self._maker.decide(p, previous, reason, details, novel))
        return out

    def _rescore_with_context(
        self,
        requests: Sequence[RoutingRequest],
        by_index: dict[int, Scored],
        use_cache: bool,
    ) -> dict[int, tuple[Scored, RoutingText]]:
        """Multi-turn step 2: undecided latest turns are scored again with earlier user turns appended."""
        policy, settings = self.policy, self.policy.settings
        if settings.context_turns <= 0 or settings.context_threshold <= 0:
            return {}
        contexts: dict[int, RoutingText] = {}
        catch_all = self.classes.index(policy.fallback)
        for i, (p, _, _, _) in by_index.items():
            if float(p.max()) < settings.context_threshold or int(p.argmax()) == catch_all:
                context = context_text(requests[i], settings.context_turns, self.max_chars)
                if context is not None and not context.empty:
                    contexts[i] = context
        if not contexts:
            return {}
        rescored = self._probabilities([c.text for c in contexts.values()], use_cache)
        return {i: (scored, c) for (i, c), scored in zip(contexts.items(), rescored, strict=True)}


def _previous(request: Any) -> str | None:
    previous = getattr(request, "previous_expert", None)
    return previous if isinstance(previous, str) else None
