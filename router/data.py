"""Reading labelled prompts (JSONL) strictly, and the deterministic held-out split.

Bad rows are errors that name the file and line (or are skipped and counted, if the config says so):
non-UTF-8 bytes, invalid JSON, a missing or non-string `prompt`, an empty or whitespace prompt.

The split holds out whole groups first (e.g. MMLU `subject`s, P3 `dataset`s or templates via `source`),
chosen by a seeded shuffle of the sorted group values, then a share of the remaining rows chosen by a
seeded hash of each row — so the split does not depend on file order and never changes between runs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.config import ExpertData, Holdout


class DataError(ValueError):
    """Training or evaluation data that cannot be used; the message names the file and line."""


@dataclass
class BadRows:
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {kind}")


def read_jsonl(path: Path, on_bad_rows: str = "error", bad: BadRows | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each with `prompt` a non-blank string; `_file`/`_line` record the origin."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    bad = bad if bad is not None else BadRows()
    rows: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            problem = None
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problem = "not valid UTF-8"
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg})"
            if problem is None:
                if not isinstance(record, dict):
                    problem = "not a JSON object"
                elif not isinstance(record.get("prompt"), str):
                    problem = "missing `prompt` string"
                elif not record["prompt"].strip():
                    problem = "empty or whitespace-only `prompt`"
            if problem is not None:
                if on_bad_rows == "error":
                    raise DataError(f"{where}: {problem} (set on_bad_rows: skip to drop such rows)")
                bad.add(problem, where)
                continue
            record["_file"], record["_line"] = str(path), number
            rows.append(record)
    if not rows:
        raise DataError(f"{path}: no usable rows (the file is empty or every row is bad)")
    return rows


def load_expert_rows(name: str, spec: ExpertData, on_bad_rows: str, bad: BadRows) -> list[dict[str, Any]]:
    rows = [row for f in spec.files for row in read_jsonl(f, on_bad_rows, bad)]
    kept = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in spec.where.items())]
    if not kept:
        seen = {k: sorted({str(r.get(k)) for r in rows})[:12] for k in spec.where}
        raise DataError(
            f"expert {name!r}: no row of {[str(f) for f in spec.files]} matches {spec.where}; values seen: {seen}"
        )
    return kept


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def row_key(row: dict[str, Any]) -> str:
    return str(row.get("id") or row["prompt"])


@dataclass
class Split:
    kept: list[dict[str, Any]]
    held: list[dict[str, Any]]
    held_groups: dict[str, list[str]]  # field → values held out whole


def split_rows(rows: list[dict[str, Any]], spec: Holdout, seed: int, salt: str) -> Split:
    """Hold out whole groups (in the order given), then a hashed share of the remaining rows."""
    kept, held = list(rows), []
    held_groups: dict[str, list[str]] = {}
    for level in spec.groups:
        values = sorted({str(r[level.field]) for r in kept if level.field in r})
        if len(values) < 2:
            continue
        rng = random.Random(f"{seed}:{salt}:{level.field}")
        rng.shuffle(values)
        count = min(len(values) - 1, max(1, round(level.fraction * len(values))))
        chosen = set(values[:count])
        held_groups[level.field] = sorted(chosen)
        for r in kept:
            if level.field in r and str(r[level.field]) in chosen:
                held.append({**r, "heldout": f"group:{level.field}"})
        kept = [r for r in kept if not (level.field in r and str(r[level.field]) in chosen)]
    if spec.fraction > 0:
        chosen_rows = [r for r in kept if _unit_hash(seed, salt, row_key(r)) < spec.fraction]
        held.extend({**r, "heldout": "rows"} for r in chosen_rows)
        ids = {id(r) for r in chosen_rows}
        kept = [r for r in kept if id(r) not in ids]
    return Split(kept, held, held_groups)


def cap_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A deterministic sample of at most `limit` rows (by seeded hash), in the original order."""
    if limit is None or len(rows) <= limit:
        return rows
    ranked = sorted(range(len(rows)), key=lambda i: _unit_hash(seed, "cap", row_key(rows[i])))
    keep = set(ranked[:limit])
    return [r for i, r in enumerate(rows) if i in keep]


def cap_rows_balanced(
    rows: list[dict[str, Any]], limit: int | None, seed: int, field: str
) -> list[dict[str, Any]]:
    """Like cap_rows, but the `limit` is shared evenly across the values of `field` (what a small value
    does not use goes to the others), so a small source is not drowned by a large one."""
    if limit is None or len(rows) <= limit:
        return rows
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(field)), []).append(r)
    quota: dict[str, int] = {}
    left, open_groups = limit, sorted(groups, key=lambda g: len(groups[g]))
    while open_groups:
        share = left // len(open_groups)
        smallest = open_groups[0]
        if len(groups[smallest]) <= share:  # fits whole: give the rest more
            quota[smallest] = len(groups[smallest])
            left -= quota[smallest]
            open_groups.pop(0)
            continue
        for i, g in enumerate(open_groups):  # the remainder goes one by one to the first groups
            quota[g] = share + (1 if i < left - share * len(open_groups) else 0)
        break
    keep = {id(r) for g, members in groups.items() for r in cap_rows(members, quota[g], seed)}
    return [r for r in rows if id(r) in keep]


def public_row(row: dict[str, Any], expert: str) -> dict[str, Any]:
    """A held-out row as written to heldout.jsonl: the source fields plus `expert` (the true label)."""
    out = {k: v for k, v in row.items() if not k.startswith("_") and k != "response"}
    out["expert"] = expert
    return out
