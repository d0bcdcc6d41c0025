"""Small file helpers shared by the encoder, the cache, the data generator and the trainer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.errors import UserError


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: a temp file beside it, then a rename over it."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(path: Path, option: str, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file goes or the other way
    round, or a path below a file."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{path}: is a {other}; pass {option} a {kind} path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{path}: {above} is a file, not a folder; pass {option} a {kind} path in a folder")
