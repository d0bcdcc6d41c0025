"""Small file helpers shared by the encoder, the cache, the data generator and both trainers (the reranker's and
pretrain-tiny's checkpoints)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def written_atomically(path: Path, tmp_name: str = ".{}.part") -> Iterator[Path]:
    """A file written whole or not at all: the block writes the temp path it is given (beside `path`, named by
    tmp_name from path's name: one name, so a killed write's is written over next time), which is renamed over
    `path` when the block ends without an error and removed otherwise."""
    tmp = path.with_name(tmp_name.format(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def held_lock(path: Path, exclusive: bool, busy: str) -> Iterator[None]:
    """An flock on the file at path (made if need be) for the with block, taken without waiting: UserError(busy) when
    another process holds it (at all, for an exclusive one; exclusively, for a shared one). The kernel releases it
    when the process ends, however it ends, so a killed run never leaves a stale lock."""
    with open(path, "a") as f:  # not "w": a refused run leaves the file as it was, its time included
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (written_atomically)."""
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def check_output_path(path: Path, option: str, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file goes or the other way
    round, or a path below a file."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{path}: is a {other}; pass {option} a {kind} path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{path}: {above} is a file, not a folder; pass {option} a {kind} path in a folder")


def previous_checkpoint(path: Path) -> Path:
    """Where save_checkpoint keeps the checkpoint before `path` (last.pt: last.prev.pt)."""
    return path.with_suffix(".prev.pt")


def kept_checkpoint(path: Path) -> Path | None:
    """The copy of the checkpoint at `path` that is on disk, as load_checkpoint tries them: `path`, else the one
    before it; None when neither is (nothing to resume or load yet)."""
    return next((p for p in (path, previous_checkpoint(path)) if p.exists()), None)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write; the previous checkpoint is kept as <name>.prev.pt as a fallback. torch is imported here, not at
    import time: most users of this module never touch a checkpoint."""
    import torch

    with written_atomically(path, ".{}.partial") as tmp:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_checkpoint(path))


def load_checkpoint(path: Path, fix: str) -> dict:
    """Load with weights_only=True; a damaged file falls back to its .prev.pt copy with a clear warning, and is moved
    aside to <name>.damaged.pt, so that the next save keeps the good copy as .prev.pt instead of rotating the damaged
    one over it. Neither loadable: one line naming `path`, ending with `fix` (what the caller's user can do)."""
    import torch

    refused = None
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, empty, corrupt or a pickled payload: all refused alike
            log.warning("%s is damaged or unsafe (%s); refused", candidate, first_line(e, 120))
            refused = refused or candidate
            continue
        if refused == path:
            os.replace(path, path.with_suffix(".damaged.pt"))
        return state
    raise UserError(f"{path}: no loadable checkpoint (missing, damaged or not weights-only); {fix}")
