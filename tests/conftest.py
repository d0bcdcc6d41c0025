"""Shared fixtures: tiny real videos made with ffmpeg, a tiny manifest dataset, the random-init tiny encoder."""

from __future__ import annotations

import csv
import importlib
import os
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from pipeline.ffmpeg import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "real-data"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child `python cli.py`: the repo first on PYTHONPATH, whatever was there kept (the
    dependencies may live there), plus extra variables."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def interrupt_call(monkeypatch, target: str, n: int) -> None:
    """The n-th call of `target` ("package.module.function") raises KeyboardInterrupt (a kill or a Ctrl-C) instead of
    running; the calls before it run as usual."""
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def write_video(path: Path, frames: np.ndarray, fps: int = 12, **options: str) -> Path:
    """Encode uint8 RGB frames [N, H, W, 3] losslessly-ish into an .mp4 (H.264, yuv444p, qp 0); options add to or
    replace ffmpeg's output options (None leaves one out)."""
    n, h, w, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"vcodec": "libx264", "pix_fmt": "yuv444p", "qp": 0, "loglevel": "error", **options}
    (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
        .output(str(path), **{k: v for k, v in options.items() if v is not None})
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


def write_manifest_dataset(root: Path, splits: list[str], lengths: list[int], h: int = 48, w: int = 64) -> Path:
    """Noise videos videos/clip<i>.mp4 of the given frame counts, two captions each, and their manifest.csv."""
    rows = []
    for i, (split, n) in enumerate(zip(splits, lengths)):
        write_video(root / "videos" / f"clip{i}.mp4", noise_frames(n, seed=i, h=h, w=w))
        rows += [(f"videos/clip{i}.mp4", f"clip number {i} with noise", split),
                 (f"videos/clip{i}.mp4", f"another caption for clip {i}", split)]
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "split"])
        writer.writerows(rows)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A manifest dataset of five short videos (one only 3 frames long), 2 captions each, three splits."""
    return write_manifest_dataset(tmp_path / "data", ["train", "train", "val", "test", "test"], [20, 21, 22, 23, 3])


def make_feature_cache(path: Path, splits: dict[str, int], captions: int = 2, frames: int = 4, patches: int = 4,
                       width: int = 16, embed: int = 8, text_width: int = 16, text_len: int = 8, seed: int = 0,
                       finish: bool = True, partial_masks: bool = False) -> Path:
    """A small cache of features written straight through the cache API (no decoding, no CLIP).

    Each video has a random latent; its frames, patches and its captions are noisy linear views of it,
    so a model can learn which caption goes with which video. Every frame slot holds a frame, or with
    partial_masks the first 1..frames of them (drawn per video; the features are the same either way).
    """
    from pipeline.cache import CacheSpec, FeatureCache
    from pipeline.records import VideoRecord

    rng = np.random.default_rng(seed)
    records = [VideoRecord(f"{split}{i}", path.parent / f"{split}{i}.mp4",
                           tuple(f"caption {c} of {split} video {i}" for c in range(captions)), split)
               for split, n in splits.items() for i in range(n)]
    spec = CacheSpec(dataset="manifest", model="fake", pretrained="", pretrained_sha256="", frames=frames,
                     image_size=32, patch_layer=0, text_layer=0, max_text_tokens=text_len, num_patches=patches,
                     patch_width=width, text_width=text_width, embed_dim=embed)
    n_texts = len(records) * captions
    lengths = rng.integers(3, text_len + 1, size=n_texts)
    cache = FeatureCache.open_or_create(path, spec, records, lengths, 0)
    if not finish:
        return path
    latent = rng.normal(size=(len(records), embed))
    views = {name: rng.normal(size=(embed, w)) for name, w in
             (("patch", width), ("cls", width), ("frame", embed), ("tokens", text_width), ("text", embed))}

    def view(name, z, shape):
        return z @ views[name] + 0.5 * rng.normal(size=shape)

    valid = [frames] * len(records)  # frames per video; its own generator leaves the features as they are
    if partial_masks:
        valid = np.random.default_rng([seed, 1]).integers(1, frames + 1, len(records))
    for v, (z, n) in enumerate(zip(latent, valid)):
        cache.write_video(v, view("patch", z, (frames, patches, width)), view("cls", z, (frames, width)),
                          view("frame", z, (frames, embed)), np.arange(frames) < n)
    text_latent = np.repeat(latent, captions, axis=0)
    for c in range(cache.n_text_chunks):
        lo, hi = cache.text_chunk_range(c)
        z = text_latent[lo:hi]
        tokens = z[:, None, :] @ views["tokens"] + 0.5 * rng.normal(size=(hi - lo, text_len, text_width))
        tokens[np.arange(text_len)[None, :] >= lengths[lo:hi, None]] = 0
        cache.write_text_chunk(c, tokens, view("text", z, (hi - lo, embed)))
    return path


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(set, cache, run): a 60-video synthetic set (about 40 train, 8 val, 12 test videos, 3 to 5 captions each), its
    cache from the shipped encoder, and a reranker trained on it with the default options but its length (60 epochs:
    the default 12 is meant for 1000 videos; here an epoch is 3 steps of 10 anchors)."""
    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.synthetic import make_synthetic
    from reranker.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("synthetic_run")
    data = make_synthetic(tmp / "data", videos=60, seed=0)
    summary = run_extract(ExtractConfig(dataset="synthetic", data_root=data, cache=tmp / "cache.zarr", progress=False))
    assert summary.videos_done == 60 and not summary.failed
    # No validation split: at this size it holds about 8 videos, and best.pt chosen on them is an early,
    # noisy checkpoint (measured: 0.39 of search's queries instead of 0.90); validating every epoch would
    # also cost more than the training. best.pt is then the epoch with the lowest loss.
    cfg = TrainConfig(cache=str(summary.cache), run=str(tmp / "run"), epochs=60, val_split="")
    return data, summary.cache, train(cfg, progress=False)
