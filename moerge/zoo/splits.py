"""Per-domain train/held-out files, split exactly as `moerge router train` splits the shared data.

The same `router.data.split_rows` with the same seed and salt (`heldout:{domain}`) and the same hold-out
specs as examples/router-shared-data.yaml: whole MMLU subjects and P3 datasets/templates are held out.
Nothing downstream ever trains on a `.heldout.jsonl` file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moerge.zoo.arithmetic import generate_rows
from moerge.zoo.config import DOMAINS, DataStage
from router.config import ExpertData
from router.data import BadRows, load_expert_rows, split_rows

END_MARKER = "<|endoftext|>"


class DataDirError(FileNotFoundError):
    """The shared data folder or one of its domain files is missing."""


def source_files(data_dir: Path) -> dict[str, Path]:
    """The five domain files of the shared data folder; a clear error names what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataDirError(
            f"data directory not found: {data_dir} (resolved {data_dir.resolve()}); pass --data DIR, the "
            f"shared data folder holding {', '.join(d + '.jsonl' for d in DOMAINS)}"
        )
    files = {d: data_dir / f"{d}.jsonl" for d in DOMAINS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataDirError(f"data directory {data_dir} lacks {', '.join(missing)}")
    return files


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as written: source fields only; P3's packaging marker removed from the reference answer."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    response = out.get("response")
    if isinstance(response, str) and response.endswith(END_MARKER):
        out["response"] = response[: -len(END_MARKER)].rstrip()
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_splits(data_dir: Path, out: Path, spec: DataStage, hetero_name: str) -> dict[str, Any]:
    """Write {domain}.train.jsonl / {domain}.heldout.jsonl under `out`; returns row counts and held groups."""
    files = source_files(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for domain, path in files.items():
        rows = load_expert_rows(
            domain, ExpertData(files=[path], where={"domain": domain}), "error", BadRows()
        )
        split = split_rows(rows, spec.holdouts[domain], spec.seed, f"heldout:{domain}")
        write_jsonl(out / f"{domain}.train.jsonl", [clean_row(r) for r in split.kept])
        write_jsonl(out / f"{domain}.heldout.jsonl", [clean_row(r) for r in split.held])
        summary[domain] = {
            "train": len(split.kept),
            "heldout": len(split.held),
            "held_groups": split.held_groups,
        }
    train, held = generate_rows(spec.arithmetic, hetero_name)
    write_jsonl(out / f"{hetero_name}.train.jsonl", train)
    write_jsonl(out / f"{hetero_name}.heldout.jsonl", held)
    summary[hetero_name] = {"train": len(train), "heldout": len(held), "held_groups": {}}
    return summary


def read_rows(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
