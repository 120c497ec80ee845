"""Registers every built-in router kind, so `create_router(kind, ...)` knows them all by name.

Untrained kinds (`fixed`, `random`, `rules`) are built from parameters; `perplexity` needs a scorer from
serving; every learned kind is a registered head (router/heads/: `hybrid`, `classifier`, …) and needs
`artifact=PATH` (any artifact holding that head). Heavy imports stay inside the factories.
May import: router.* (never serving).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import router.fixed
import router.perplexity
import router.rules  # noqa: F401  (registration side effects)
from router.base import Router, RouterFactory, register
from router.heads import head_kinds


def _learned_factory(kind: str) -> RouterFactory:
    def factory(
        experts: Sequence[str] | None = None, artifact: str | Path | None = None, **options: Any
    ) -> Router:
        if artifact is None:
            raise ValueError(
                f"router kind {kind!r} is trained: pass artifact=PATH (build one with `moerge router train`)"
            )
        from router.artifact import load_router

        loaded = load_router(Path(artifact), kind=kind, **options)
        if experts is not None and list(experts) != loaded.experts:
            raise ValueError(
                f"artifact {artifact} routes to {loaded.experts}, not the requested {list(experts)}"
            )
        return loaded

    return factory


for _kind in head_kinds():
    register(_kind)(_learned_factory(_kind))
