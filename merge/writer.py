"""Writing a checkpoint safely: shards as they fill, into a folder beside the target, renamed at the end.

A crash, Ctrl-C or SIGTERM mid-merge leaves no half-written OUT_DIR: the partial folder is removed, and
an existing OUT_DIR is only replaced (with --overwrite) once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

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
        self._buffered_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._shards = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._buffer:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to(self.dtype, copy=True).contiguous()  # own storage: safetensors refuses aliases
        self._buffer[name] = t
        self._buffered_bytes += t.numel() * t.element_size()
        if self._buffered_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self._shards += 1
        file = f"model-{self._shards:05d}.safetensors"
        save_file(self._buffer, str(self.folder / file), metadata={"format": "pt"})
        for name in self._buffer:
            self.weight_map[name] = file
        self.total_bytes += self._buffered_bytes
        self._buffer, self._buffered_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the cleanup below runs for `kill` as for Ctrl-C."""

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
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
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
                out_dir.rename(old)
                partial.rename(out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
