"""Cached, resumable stages: each writes its outputs atomically and is skipped when nothing changed.

A stage's *input hash* covers its recipe section, a code version and the output digests of the stages
it reads. Its outputs are built in a hidden temp folder beside OUT and renamed into place when the
stage succeeds; then the manifest records the input hash and an *output digest* (sha256 over every
output file's path and bytes). A stage is skipped only when the manifest's input hash matches and the
outputs still hash to the recorded digest — so a deleted or corrupted output is rebuilt, and so is
everything downstream of it (their input hashes include its digest).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHUNK = 8 * 1024 * 1024


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_outputs(root: Path, outputs: list[str]) -> str | None:
    """sha256 over (relative path, file sha256) of every file of every output; None if one is missing."""
    digest = hashlib.sha256()
    for rel in outputs:
        path = root / rel
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            if not files:
                return None
        else:
            return None
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()


class BuildLockedError(RuntimeError):
    """Another build holds OUT's lock: two builds must not write one zoo."""


@dataclass
class Stage:
    """One unit of the build. `run(tmp)` writes `outputs` (paths relative to OUT) under `tmp`."""

    name: str
    outputs: list[str]
    params: Any
    run: Callable[[Path], dict[str, Any]]
    after: list[str] = field(default_factory=list)
    version: int = 1


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    metrics: dict[str, Any]


class Manifest:
    """OUT/manifest.json: per stage, its input hash, output digest, seconds and measured numbers."""

    def __init__(self, root: Path) -> None:
        self.path = root / MANIFEST
        self.data: dict[str, Any] = {"version": 1, "stages": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if isinstance(loaded, dict) and isinstance(loaded.get("stages"), dict):
                    self.data = loaded
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # a corrupt manifest means nothing is trusted: every stage rebuilds

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


class Pipeline:
    """Runs stages in order against one OUT folder and its manifest."""

    def __init__(self, root: Path, force: bool = False, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = (self.root / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildLockedError(f"another zoo build is running in {self.root}") from None
        for stale in self.root.glob(".tmp-*"):  # left by a build that was killed mid-stage
            shutil.rmtree(stale, ignore_errors=True)
        self.manifest = Manifest(self.root)
        self.force = force
        self.log = log
        self.digests: dict[str, str] = {}

    def input_hash(self, stage: Stage) -> str:
        upstream = {name: self.digests[name] for name in stage.after}
        return hash_json(
            {"stage": stage.name, "version": stage.version, "params": stage.params, "after": upstream}
        )

    def is_current(self, stage: Stage, input_hash: str) -> bool:
        record = self.manifest.stages.get(stage.name)
        if self.force or not record or record.get("input_hash") != input_hash:
            return False
        digest = digest_outputs(self.root, stage.outputs)
        return digest is not None and digest == record.get("output_digest")

    def run(self, stage: Stage) -> StageResult:
        missing = [name for name in stage.after if name not in self.digests]
        if missing:
            raise RuntimeError(f"stage {stage.name} needs {missing} to run first")
        input_hash = self.input_hash(stage)
        record = self.manifest.stages.get(stage.name, {})
        if self.is_current(stage, input_hash):
            self.digests[stage.name] = record["output_digest"]
            self.log(f"[dim]{stage.name}: up to date, skipped (built in {record.get('seconds')} s)[/dim]")
            return StageResult(stage.name, True, float(record.get("seconds", 0)), record.get("metrics", {}))
        if record:
            why = (
                "forced"
                if self.force
                else (
                    "inputs changed"
                    if record.get("input_hash") != input_hash
                    else "outputs missing or changed"
                )
            )
            self.log(f"{stage.name}: rebuilding ({why})")
        tmp = self.root / f".tmp-{stage.name.replace(':', '-')}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.perf_counter()
        try:
            metrics = stage.run(tmp)
            for rel in stage.outputs:
                if not (tmp / rel).exists():
                    raise RuntimeError(f"stage {stage.name} did not write {rel}")
            for rel in stage.outputs:
                target = self.root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(tmp / rel, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = round(time.perf_counter() - started, 1)
        digest = digest_outputs(self.root, stage.outputs)
        assert digest is not None
        self.digests[stage.name] = digest
        self.manifest.stages[stage.name] = {
            "input_hash": input_hash,
            "output_digest": digest,
            "outputs": stage.outputs,
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": metrics,
        }
        self.manifest.save()
        self.log(f"{stage.name}: built in {seconds} s")
        return StageResult(stage.name, False, seconds, metrics)
