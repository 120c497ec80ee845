"""The router artifact: a directory that a gateway loads with `load_router(path)`.

    router.json         the spec (router/schema.py): kind, classes, head parameters, policy, encoder
                        reference (model, sha256 of its files, …), training metadata
    weights.safetensors every array (classifier coef/intercept, gate vectors, centroids, kNN and novelty banks)
    heldout.jsonl       the held-out evaluation split (never trained on), for `moerge router eval`
    manifest.json       sha256 and byte size of every file above

Nothing is pickled. The artifact's *digest* is the sha256 of its manifest's file entries: it names the
whole content (`moerge router digest DIR` prints it; `Decision.version` is its first 12 hex digits).
Loading reads every file once and checks it against the manifest, and the manifest against a pinned
digest when the caller gives one, before anything is parsed; then the encoder folder's files against the
hash router.json records, before the encoder is loaded; the weights are parsed from the bytes that were
checked. There is no switch to skip a check.

What this proves: without a pinned digest, that no file changed since the manifest was written (a
truncated copy, a stray edit); whoever can write the folder can rewrite the manifest too. With the
digest pinned (a serve config's `digest: sha256:…`), that this is the artifact that was pinned.

May import: router.* (never serving), numpy, safetensors (lazily).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from router.base import Router
from router.schema import FORMAT, READABLE, SHA256_HEX, EncoderRef, RouterSpec, SpecError, parse_spec
from router.validation import Strict, format_errors

MANIFEST = "manifest.json"
REQUIRED = ("router.json", "weights.safetensors")
DIGEST_PREFIX = "sha256:"


class ArtifactError(ValueError):
    """An artifact that is incomplete, tampered with, not the pinned one, or does not match its encoder."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_digest(files: dict[str, Any]) -> str:
    """`sha256:<hex>` over the manifest's file entries (name → {sha256, bytes}): two artifacts share it
    only if every file does."""
    canonical = json.dumps(files, sort_keys=True).encode()
    return DIGEST_PREFIX + hashlib.sha256(canonical).hexdigest()


def version_of(digest: str) -> str:
    """The short form decisions carry."""
    return digest.removeprefix(DIGEST_PREFIX)[:12]


def write_artifact(
    out_dir: Path, spec: RouterSpec, tensors: dict[str, np.ndarray], files: dict[str, bytes]
) -> str:
    """Write spec, weights and extra files, then the manifest over all of them; returns the digest."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / MANIFEST
    if stale.exists():
        stale.unlink()
    (out_dir / "router.json").write_text(json.dumps(spec.as_json(), indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "weights.safetensors"))
    for name, content in files.items():
        (out_dir / name).write_bytes(content)
    names = [*REQUIRED, *files]
    entries = {n: {"sha256": _sha256(out_dir / n), "bytes": (out_dir / n).stat().st_size} for n in names}
    manifest = {"format": FORMAT, "algorithm": "sha256", "files": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return artifact_digest(entries)


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose files matched its manifest (and pinned digest) and whose encoder folder matched
    its recorded hash; `weights` are the checked bytes of weights.safetensors."""

    path: Path
    digest: str
    spec: RouterSpec
    weights: bytes

    @property
    def version(self) -> str:
        return version_of(self.digest)


class FileEntry(Strict):
    sha256: str = Field(pattern=SHA256_HEX)
    bytes: int = Field(ge=0)


class Manifest(Strict):
    format: str
    algorithm: Literal["sha256"]
    files: dict[str, FileEntry]


def _read_manifest(path: Path) -> Manifest:
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a router artifact directory")
    try:
        manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no {MANIFEST}; refusing an unverifiable artifact") from None
    except ValidationError as error:
        raise ArtifactError(f"{path / MANIFEST}: unreadable manifest:\n{format_errors(error)}") from None
    if manifest.format not in READABLE:
        raise ArtifactError(
            f"{path}: manifest format {manifest.format!r}, this moerge reads {', '.join(READABLE)}; "
            "retrain it with `moerge router train CONFIG OUT_DIR --overwrite`"
        )
    for name in manifest.files:
        if Path(name).name != name or name in ("", ".", "..", MANIFEST):
            raise ArtifactError(f"{path}: manifest names a file outside the artifact: {name!r}")
    for required in REQUIRED:
        if required not in manifest.files:
            raise ArtifactError(f"{path}: manifest does not list {required}")
    return manifest


def _checked_bytes(path: Path, name: str, entry: FileEntry, keep: bool) -> bytes:
    """Read one file once, checking size and sha256; its bytes if `keep` (else b'', hashed streaming)."""
    target = path / name
    if not target.is_file():
        raise ArtifactError(f"{path}: {name} listed in the manifest is missing")
    size = target.stat().st_size
    if size != entry.bytes:
        raise ArtifactError(
            f"{path}: {name} is {size} bytes, the manifest says {entry.bytes} (truncated or modified)"
        )
    if keep:
        content = target.read_bytes()
        actual = hashlib.sha256(content).hexdigest()
    else:
        content, actual = b"", _sha256(target)
    if actual != entry.sha256 or (keep and len(content) != entry.bytes):
        raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest (modified)")
    return content


def check_encoder_files(ref: EncoderRef) -> None:
    """The encoder folder's files must hash to what router.json records: checked before it is loaded."""
    from router.encoder import EncoderMismatch, hash_model_dir, resolve_model_path

    folder = resolve_model_path(ref.model)
    actual = hash_model_dir(folder)
    if actual != ref.sha256:
        raise EncoderMismatch(
            f"encoder at {folder} has sha256 {actual[:16]}…, the artifact was trained with "
            f"{ref.sha256[:16]}…; refusing to load it (embeddings would not match the weights)"
        )


def verify_artifact(path: Path, digest: str | None = None) -> VerifiedArtifact:
    """Check the manifest (against `digest` when given), every file, the spec and the encoder's files;
    nothing of the artifact or its encoder is loaded before its bytes are checked."""
    path = Path(path)
    manifest = _read_manifest(path)
    actual = artifact_digest({n: e.model_dump() for n, e in manifest.files.items()})
    if digest is not None and digest != actual:
        raise ArtifactError(
            f"{path}: artifact digest {actual} is not the pinned {digest} (a different or modified "
            "artifact; `moerge router digest DIR` prints an artifact's digest)"
        )
    kept = {
        name: _checked_bytes(path, name, entry, keep=name in REQUIRED)
        for name, entry in manifest.files.items()
    }
    try:
        raw = json.loads(kept["router.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: router.json is not JSON ({error})") from None
    if isinstance(raw, dict) and raw.get("format") != manifest.format:
        raise ArtifactError(
            f"{path}: router.json format {raw.get('format')!r} differs from the manifest's {manifest.format!r}"
        )
    try:
        spec = parse_spec(raw)
    except SpecError as error:
        raise ArtifactError(f"{path}: {error}") from None
    from router.encoder import EncoderError

    try:
        check_encoder_files(spec.encoder)
    except EncoderError as error:
        raise ArtifactError(f"{path}: {error}") from None
    return VerifiedArtifact(path, actual, spec, kept["weights.safetensors"])


_ENCODERS: dict[tuple[Any, ...], Any] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_encoder(ref: EncoderRef) -> Any:
    """One encoder per reference per process (routers loaded side by side share it); a new one is
    loaded only after its folder hashed to `ref.sha256`."""
    from router.encoder import Encoder

    pooled = tuple(ref.pool_layers) if ref.pool_layers else None
    key = (ref.model, ref.sha256, ref.max_seq_length, ref.precision, ref.layers, ref.truncation, pooled)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(
                ref.model,
                ref.max_seq_length,
                ref.precision,
                layers=ref.layers,
                truncation=ref.truncation,
                pool_layers=pooled,
                expected_sha256=ref.sha256,
            )
        return _ENCODERS[key]


def load_router(
    path: Path,
    *,
    kind: str | None = None,
    cache_size: int = 4096,
    fast_path: bool | None = None,
    digest: str | None = None,
    serve_as: dict[str, str] | None = None,
) -> Router:
    """Load a trained router artifact (verified first; ArtifactError otherwise) as a Router.

    `kind` picks another head it holds. The n-gram fast path (if the artifact has one) fronts the
    artifact's own kind; `fast_path=False` turns it off, `True` puts it in front of another `kind` too.
    `digest` (`sha256:…`) pins the artifact: any other content is refused. `serve_as` re-maps some of
    its classes to other served experts (over the artifact's own map): one trained router can then send
    the same domains to a merged MoE or to the adapters it was merged from.
    """
    return load_verified(
        verify_artifact(Path(path), digest),
        kind=kind,
        cache_size=cache_size,
        fast_path=fast_path,
        serve_as=serve_as,
    )


def load_verified(
    artifact: VerifiedArtifact,
    *,
    kind: str | None = None,
    cache_size: int = 4096,
    fast_path: bool | None = None,
    serve_as: dict[str, str] | None = None,
) -> Router:
    """Build the Router from a verified artifact's checked bytes (the folder is not read again, but
    for the encoder, whose files were hashed)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_safetensors

    from router.encoder import EncoderError
    from router.policy import serve_as_problem

    path, spec = artifact.path, artifact.spec
    if serve_as:
        mapping = {**spec.serve_as, **serve_as}
        problem = serve_as_problem(spec.experts, mapping)
        if problem is not None:
            raise ArtifactError(f"{path}: serve_as: {problem}")
        spec = spec.model_copy(update={"serve_as": mapping})
    try:
        tensors = load_safetensors(artifact.weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path}: weights.safetensors unreadable ({error})") from None
    try:
        encoder = shared_encoder(spec.encoder)
    except EncoderError as error:
        raise ArtifactError(f"{path}: encoder {spec.encoder.model!r}: {error}") from None
    try:
        return _assemble(spec, tensors, encoder, artifact.version, kind, cache_size, fast_path)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path}: inconsistent artifact ({error!r})") from None


def _assemble(
    spec: RouterSpec,
    tensors: dict[str, np.ndarray],
    encoder: Any,
    version: str,
    kind: str | None,
    cache_size: int,
    fast_path: bool | None,
) -> Router:
    from router.gates import TokenGates
    from router.heads.base import load_heads
    from router.learned import LearnedRouter
    from router.ngram import NgramModel
    from router.novelty import NoveltyCheck
    from router.policy import Policy, PolicySettings

    gates = None
    if spec.gates is not None:
        gates = TokenGates(tensors["gates.center"], tensors["gates.vectors"], spec.gates.top_k)
    heads = load_heads(tensors, spec.heads, len(spec.experts))
    chosen = kind or spec.kind
    ngram = None
    if spec.fast_path is not None and (fast_path or (fast_path is None and chosen == spec.kind)):
        ngram = NgramModel.from_artifact(tensors, spec.fast_path.model_dump())
    novelty = None
    if spec.novelty is not None:
        novelty = NoveltyCheck.from_artifact(tensors, spec.novelty.model_dump())
    settings = PolicySettings.model_validate(spec.policy.model_dump(exclude={"fallback"}))
    policy = Policy(spec.experts, spec.policy.fallback, settings, dict(spec.serve_as))
    return LearnedRouter(
        spec.experts,
        chosen,
        encoder,
        heads,
        gates,
        policy,
        version,
        cache_size=cache_size,
        meta=spec.as_json(),
        fast_path=ngram,
        novelty=novelty,
    )
