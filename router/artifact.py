"""The router artifact: a directory that a gateway loads with `load_router(path)`.

    router.json         kind, experts, head parameters (temperatures …), policy, encoder reference
                        (model, sha256 of its files, max_seq_length, precision), training metadata
    weights.safetensors every array (classifier coef/intercept, gate vectors, centroids, kNN and novelty banks)
    heldout.jsonl       the held-out evaluation split (never trained on), for `moerge router eval`
    manifest.json       sha256 and byte size of every file above

Nothing is pickled. Loading verifies the manifest first: a missing, truncated or modified file, or an
encoder whose files differ from the recorded hash, is refused with an ArtifactError that says which.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from router.base import Router

FORMAT = "moerge-router/1"
MANIFEST = "manifest.json"
REQUIRED = ("router.json", "weights.safetensors")


class ArtifactError(ValueError):
    """An artifact that is incomplete, tampered with, or does not match its encoder."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(
    out_dir: Path, spec: dict[str, Any], tensors: dict[str, np.ndarray], files: dict[str, bytes]
) -> str:
    """Write spec, weights and extra files, then the manifest over all of them; returns the version."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / MANIFEST
    if stale.exists():
        stale.unlink()
    (out_dir / "router.json").write_text(json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "weights.safetensors"))
    for name, content in files.items():
        (out_dir / name).write_bytes(content)
    names = [*REQUIRED, *files]
    entries = {n: {"sha256": _sha256(out_dir / n), "bytes": (out_dir / n).stat().st_size} for n in names}
    manifest = {"format": FORMAT, "algorithm": "sha256", "files": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_version(manifest)


def manifest_version(manifest: dict[str, Any]) -> str:
    """A short content hash: two artifacts share a version only if every file is identical."""
    canonical = json.dumps(manifest["files"], sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:12]


def verify_artifact(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the parsed router.json (with `version` added)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a router artifact directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no {MANIFEST}; refusing an unverifiable artifact") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path / MANIFEST}: unreadable manifest ({error})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r}, this moerge reads {FORMAT!r}")
    for required in REQUIRED:
        if required not in files:
            raise ArtifactError(f"{path}: manifest does not list {required}")
    for name, entry in files.items():
        target = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{path}: manifest names a file outside the artifact: {name!r}")
        if not target.is_file():
            raise ArtifactError(f"{path}: {name} listed in the manifest is missing")
        size = target.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"{path}: {name} is {size} bytes, the manifest says {entry['bytes']} (truncated or modified)"
            )
        if _sha256(target) != entry["sha256"]:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest (modified)")
    spec = json.loads((path / "router.json").read_text())
    if spec.get("format") != FORMAT:
        raise ArtifactError(f"{path}: router.json format {spec.get('format')!r}, expected {FORMAT!r}")
    spec["version"] = manifest_version(manifest)
    return spec


_ENCODERS: dict[tuple[str, int, str, int | None, str, tuple[int, ...] | None], Any] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_encoder(
    model: str,
    max_seq_length: int,
    precision: str,
    layers: int | None = None,
    truncation: str = "head",
    pool_layers: list[int] | None = None,
) -> Any:
    """One encoder per (model, length, precision, …) per process: routers loaded side by side share it."""
    from router.encoder import Encoder

    pooled = tuple(pool_layers) if pool_layers else None
    key = (model, max_seq_length, precision, layers, truncation, pooled)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(
                model, max_seq_length, precision, layers=layers, truncation=truncation, pool_layers=pooled
            )
        return _ENCODERS[key]


def load_router(
    path: Path,
    *,
    kind: str | None = None,
    verify_encoder: bool = True,
    cache_size: int = 4096,
    fast_path: bool | None = None,
) -> Router:
    """Load a trained router artifact (verified) as a Router; `kind` picks another head it holds.

    The n-gram fast path (if the artifact has one) fronts the artifact's own kind; `fast_path=False`
    turns it off, `True` puts it in front of another `kind` too.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from router.encoder import EncoderError
    from router.gates import TokenGates
    from router.learned import LearnedRouter
    from router.ngram import NgramModel
    from router.novelty import NoveltyCheck
    from router.policy import Policy
    from router.scorers import build_heads

    path = Path(path)
    spec = verify_artifact(path)
    try:
        tensors = load_file(str(path / "weights.safetensors"))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path}: weights.safetensors unreadable ({error})") from None
    try:
        experts = list(spec["experts"])
        ref = spec["encoder"]
        encoder = shared_encoder(
            ref["model"],
            int(ref["max_seq_length"]),
            ref["precision"],
            ref.get("layers"),
            ref.get("truncation", "head"),
            ref.get("pool_layers"),
        )
    except EncoderError as error:
        raise ArtifactError(f"{path}: encoder {spec['encoder'].get('model')!r}: {error}") from None
    except (KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: router.json lacks {error}") from None
    if verify_encoder and encoder.sha256 != ref["sha256"]:
        raise ArtifactError(
            f"{path}: encoder at {encoder.path} has sha256 {encoder.sha256[:16]}…, the artifact was trained "
            f"with {ref['sha256'][:16]}…; refusing (embeddings would not match the weights)"
        )
    try:
        gates = None
        if "gates.vectors" in tensors:
            gates = TokenGates(tensors["gates.center"], tensors["gates.vectors"], int(spec["gates"]["top_k"]))
        heads = build_heads(tensors, spec["heads"], len(experts))
        chosen = kind or spec["kind"]
        ngram = None
        if spec.get("fast_path") and (fast_path or (fast_path is None and chosen == spec["kind"])):
            ngram = NgramModel.from_artifact(tensors, spec["fast_path"])
        novelty = None
        if spec.get("novelty"):
            novelty = NoveltyCheck.from_artifact(tensors, spec["novelty"])
        p = spec["policy"]
        policy = Policy(
            experts,
            p["fallback"],
            float(p["confidence_floor"]),
            float(p["stickiness"]),
            float(p.get("context_threshold", 0.0)),
            int(p.get("context_turns", 0)),
            dict(spec.get("serve_as") or {}),
        )
        return LearnedRouter(
            experts,
            chosen,
            encoder,
            heads,
            gates,
            policy,
            spec["version"],
            cache_size=cache_size,
            meta=spec,
            fast_path=ngram,
            novelty=novelty,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path}: inconsistent artifact ({error!r})") from None
