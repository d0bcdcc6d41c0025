"""Shared fixtures: tiny real videos made with ffmpeg, a tiny manifest dataset, the random-init tiny encoder."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from pipeline.ffmpeg import ffmpeg_exe

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "real-data"


def write_video(path: Path, frames: np.ndarray, fps: int = 12) -> Path:
    """Encode uint8 RGB frames [N, H, W, 3] losslessly-ish into an .mp4 (H.264, yuv444p, qp 0)."""
    n, h, w, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
        .output(str(path), vcodec="libx264", pix_fmt="yuv444p", qp=0, loglevel="error")
        .overwrite_output()
        .run(cmd=ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes())
    )
    return path


def level_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames whose grey level encodes their index (frame i is filled with 8 * i), to check sampling."""
    return np.stack([np.full((h, w, 3), 8 * i, dtype=np.uint8) for i in range(n)])


def noise_frames(n: int, seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth random colour frames, distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A manifest dataset of five short videos (one only 3 frames long), 2 captions each, three splits."""
    root = tmp_path / "data"
    rows = []
    splits = ["train", "train", "val", "test", "test"]
    for i, split in enumerate(splits):
        n = 3 if i == 4 else 20 + i
        write_video(root / "videos" / f"clip{i}.mp4", noise_frames(n, seed=i))
        rows += [(f"videos/clip{i}.mp4", f"clip number {i} with noise", split),
                 (f"videos/clip{i}.mp4", f"another caption for clip {i}", split)]
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "split"])
        writer.writerows(rows)
    return root


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    logging.getLogger("root").setLevel(logging.ERROR)
