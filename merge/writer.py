"""Writing a checkpoint safely: shards as they fill, into a folder beside the target, renamed at the end.

A crash, Ctrl-C or SIGTERM mid-merge leaves no half-written OUT_DIR: the partial folder is removed, and
an existing OUT_DIR is only replaced (with --overwrite) once the new one is complete and on disk. The
swap is one atomic exchange where the OS has one (Linux renameat2 RENAME_EXCHANGE), so OUT_DIR always
names a complete checkpoint, old or new; elsewhere it is two renames, and if the second fails the old
output is put back. The parent folder is fsynced after the swap, so the rename itself is durable.
Every tensor is checked for NaN/Inf before it is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ShardWriter:
    """Buffers tensors and writes a safetensors shard whenever `max_shard_bytes` is reached.

    Shards are small (256 MiB) because the buffer is what a merge holds in memory beyond one layer.
    """

    def __init__(self, folder: Path, dtype: str, max_shard_bytes: int = 256 * 1024**2) -> None:
        self.folder = folder
        self.dtype = DTYPES[dtype]
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._buffered_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._shards = 0

    def add(self, name: str, tensor: torch.Tensor, *, finite: bool = False) -> None:
        """Buffer `tensor` as `name`. `finite=True`: the caller has checked it for NaN/Inf already (an input
        tensor copied through as read); it is checked again only if the output dtype changes it."""
        if name in self.weight_map or name in self._buffer:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach()
        if t.dtype != self.dtype:
            t = t.to(self.dtype).contiguous()  # a fresh tensor
            finite = False  # a narrower dtype can overflow to Inf
        else:
            # Kept without a copy: the caller hands the tensor over and does not modify it afterwards. A
            # view into a bigger storage, or a storage already buffered, is copied (safetensors refuses aliases).
            t = t.contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in self._storages or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
        # A sum is finite iff every entry is (barring overflow near the dtype's max, which the full check sees).
        if (
            not finite
            and t.is_floating_point()
            and not torch.isfinite(t.sum())
            and not torch.isfinite(t).all()
        ):
            bad = "NaN" if torch.isnan(t).any() else "Inf"
            raise ValueError(f"merged tensor {name} contains {bad} (in {self.dtype}): nothing was written")
        self._buffer[name] = t
        self._storages.add(t.untyped_storage().data_ptr())
        self._buffered_bytes += t.numel() * t.element_size()
        if self._buffered_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self._shards += 1
        file = f"model-{self._shards:05d}.safetensors"
        write_safetensors(self.folder / file, self._buffer, {"format": "pt"})
        for name in self._buffer:
            self.weight_map[name] = file
        self.total_bytes += self._buffered_bytes
        self._buffer, self._buffered_bytes, self._storages = {}, 0, set()

    def close(self) -> None:
        self.flush()
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file straight from the tensors' memory (safetensors' `save_file` first copies
    every tensor into a bytes object: a whole shard more of peak memory). Same format: an 8-byte
    little-endian header length, the JSON header padded with spaces to 8 bytes, then the raw data.

    Writeback of the file is started at once (POSIX_FADV_DONTNEED), so the final fsync has little left to do.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    names = sorted(tensors)
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in names:
            t = tensors[name]
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the cleanup below runs for `kill` as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> NoReturn:  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists; pass --overwrite to replace it")
    if not out_dir.parent.exists():
        raise FileNotFoundError(f"parent folder of the output {out_dir.parent} does not exist")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where the OS or the filesystem has no such call (the caller falls back to two renames).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _replace(partial: Path, out_dir: Path) -> None:
    """Put the complete `partial` at `out_dir`, keeping any old `out_dir` until the new one is there."""
    if not out_dir.exists():
        partial.rename(out_dir)
    elif exchange(partial, out_dir):
        shutil.rmtree(partial, ignore_errors=True)  # now the old output
    else:
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        try:
            partial.rename(out_dir)
        except BaseException:
            old.rename(out_dir)  # the new merge could not be put in place: the old output comes back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh folder beside `out_dir`; on success it replaces `out_dir`, on any failure it vanishes."""
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        with _sigterm_as_interrupt():
            yield partial
            for file in partial.iterdir():  # durable before the rename makes it visible
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(partial)
            _replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
