"""Common records that every dataset adapter produces and everything downstream consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class VideoRecord:
    """One video: its id, where it lies on disk, its captions and its split."""

    video_id: str
    path: Path
    captions: tuple[str, ...]
    split: str


def missing_videos(records: list[VideoRecord]) -> list[VideoRecord]:
    """Records whose video file is not on disk."""
    return [r for r in records if not r.path.is_file()]
