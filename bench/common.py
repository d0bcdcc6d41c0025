"""Shared benchmark helpers: timing (median of repetitions), tables, the final JSON line, synthetic caches and videos.

Benchmarks print ratios measured side by side in one run, so a noisy, shared machine moves both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

# Before torch is imported: OpenMP workers that spin while idle (the default) steal the CPU from the work
# itself when the machine is shared or oversubscribed; measured 2-4x on a reranker train step on a shared
# 2-core box (docs/benchmarks.md). Export OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))


# -- shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Feature shapes of one frozen encoder: T frames, P patches, W width, E joint dim, Wt text width, L text tokens."""

    T: int
    P: int
    W: int
    E: int
    Wt: int
    L: int = 32

    def video_bytes(self) -> int:
        """Uncompressed fp16 bytes of one video's patch tokens, class tokens and frame embeddings (+ mask)."""
        return 2 * (self.T * self.P * self.W + self.T * self.W + self.T * self.E) + self.T


SHAPES = {
    "vitb32": Shape(T=12, P=49, W=768, E=512, Wt=512),
    "vitl14": Shape(T=12, P=256, W=1024, E=768, Wt=768),
}


# -- timing and printing --------------------------------------------------------------------------
def median_time(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of fn() over reps runs after warmup runs, and all the runs."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


class Stopwatch:
    """Accumulates named wall-clock sections: `with sw("decode"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (floats with 3 significant digits)."""
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)
    cells = [[fmt(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    """One line about where this ran (ratios are what to compare across machines)."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load avg {load:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")


def header(name: str, args) -> None:
    print(f"# {name}: {machine()}")
    print(f"# options: {vars(args)}")


def final(result: dict) -> None:
    """The one machine-readable last line of every benchmark."""
    print(json.dumps(result), flush=True)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder deleted afterwards, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=f"crosstvr-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- realistic synthetic features -----------------------------------------------------------------
def smooth_features(rng: np.random.Generator, shape: tuple[int, ...], rank: int = 16, noise: float = 0.05) -> np.ndarray:
    """fp16 tensors like frozen ViT tokens: a large shared mean, a low-rank part that varies slowly, small noise.

    Random normal fp16 barely compresses; real tokens are dominated by a few directions (last-block
    patch tokens of a frame have mean cosine ~0.98), which is what codecs can exploit.
    """
    *lead, width = shape
    n = int(np.prod(lead)) if lead else 1
    mean = rng.normal(size=width).astype(np.float32) * 2
    basis = rng.normal(size=(rank, width)).astype(np.float32)
    coeff = np.cumsum(rng.normal(size=(n, rank)).astype(np.float32), axis=0) / np.sqrt(np.arange(1, n + 1))[:, None]
    x = mean + coeff @ basis * 0.3 + noise * rng.normal(size=(n, width)).astype(np.float32)
    return x.reshape(shape).astype(np.float16)


class FeaturePool:
    """A few distinct synthetic videos cycled over many cache rows: writing big caches stays cheap."""

    def __init__(self, shape: Shape, distinct: int = 16, seed: int = 0, realistic: bool = True) -> None:
        rng = np.random.default_rng(seed)
        make = (lambda s: smooth_features(rng, s)) if realistic else (lambda s: rng.normal(size=s).astype(np.float16))
        self.patch = make((distinct, shape.T, shape.P, shape.W))
        self.cls = make((distinct, shape.T, shape.W))
        self.emb = make((distinct, shape.T, shape.E))
        self.text_tokens = make((distinct, shape.L, shape.Wt))
        self.text_emb = make((distinct, shape.E))
        self.distinct = distinct

    def video(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = i % self.distinct
        return self.patch[k], self.cls[k], self.emb[k]


def caption_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Token counts like MSR-VTT captions (about 9 words: 8 to 20 tokens with BOS/EOT), capped at max_len."""
    return np.minimum(rng.integers(8, 21, size=n), max_len)


def write_synthetic_cache(path: Path, shape: Shape, splits: dict[str, int], captions: int = 1, compression: str = "none",
                          seed: int = 0, durable: bool = False, pool: FeaturePool | None = None,
                          seconds: dict | None = None) -> Path:
    """A finished cache of synthetic features: the schema comes from FeatureCache.open_or_create (the one place
    that defines it), the data is written in large slices through a plain (non-fsync) store unless durable.
    `seconds` (if given) receives the time spent creating the group and writing the videos."""
    import zarr
    from zarr.storage import LocalStore

    from pipeline.cache import DONE, CacheSpec, FeatureCache
    from pipeline.records import VideoRecord

    rng = np.random.default_rng(seed)
    records = [VideoRecord(f"{split}{i}", path.parent / f"{split}{i}.mp4",
                           tuple(f"caption {c} of {split} video {i}" for c in range(captions)), split)
               for split, n in splits.items() for i in range(n)]
    spec = CacheSpec(dataset="manifest", model="bench", pretrained="", pretrained_sha256="", frames=shape.T,
                     image_size=224, patch_layer=0, text_layer=0, max_text_tokens=shape.L, num_patches=shape.P,
                     patch_width=shape.W, text_width=shape.Wt, embed_dim=shape.E, compression=compression)
    n_texts = len(records) * captions
    lengths = caption_lengths(rng, n_texts, shape.L)
    pool = pool or FeaturePool(shape, seed=seed)
    t0 = time.perf_counter()
    cache = FeatureCache.open_or_create(path, spec, records, lengths, 0)
    t1 = time.perf_counter()
    V = len(records)
    if durable:  # the extractor's own path: one video at a time, fsync-ed
        for v in range(V):
            cache.write_video(v, *pool.video(v), np.ones(shape.T, dtype=bool))
        g = cache.group
    else:
        g = zarr.open_group(LocalStore(path), mode="r+")
        block = 64
        for lo in range(0, V, block):
            hi = min(lo + block, V)
            ks = np.arange(lo, hi) % pool.distinct
            g["patch_tokens"][lo:hi] = pool.patch[ks]
            g["cls_tokens"][lo:hi] = pool.cls[ks]
            g["frame_embeds"][lo:hi] = pool.emb[ks]
        g["frame_mask"][:] = True
        g["video_status"][:] = DONE
    if seconds is not None:
        seconds.update(create=t1 - t0, videos=time.perf_counter() - t1)
    for c in range(cache.n_text_chunks):
        lo, hi = cache.text_chunk_range(c)
        ks = np.arange(lo, hi) % pool.distinct
        tokens = pool.text_tokens[ks].copy()
        tokens[np.arange(shape.L)[None, :] >= lengths[lo:hi, None]] = 0
        g["text_tokens"][lo:hi] = tokens
        g["text_embeds"][lo:hi] = pool.text_emb[ks]
    g["text_chunk_status"][:] = DONE
    return path


# -- small real videos ----------------------------------------------------------------------------
def smooth_frames(n: int, seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """Frames of a slowly moving smooth colour pattern (compresses like real footage, decodes like it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    big = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)
    frames = np.stack([np.roll(big, shift=(i, 2 * i), axis=(0, 1))[:h, :w] for i in range(n)])
    return frames.clip(0, 255).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int = 24) -> Path:
    """Encode uint8 RGB frames [N, H, W, 3] as an ordinary H.264 .mp4 (yuv420p, crf 23)."""
    import ffmpeg

    from pipeline.ffmpeg import ffmpeg_exe

    n, h, w, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
        .output(str(path), vcodec="libx264", pix_fmt="yuv420p", crf=23, preset="veryfast", loglevel="error")
        .overwrite_output()
        .run(cmd=ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes())
    )
    return path


def write_videos(folder: Path, n: int, frames: int = 72, h: int = 240, w: int = 320) -> list[Path]:
    """n distinct 320x240, 3 s (72 frames at 24 fps) videos."""
    return [write_video(folder / f"clip{i:04d}.mp4", smooth_frames(frames, seed=i, h=h, w=w)) for i in range(n)]


WORDS = "a man woman dog cat car plays runs on the in with red blue ball street kitchen guitar talks about".split()


def random_captions(n: int, seed: int = 0) -> list[str]:
    """n captions of 6 to 14 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(6, 15))) for _ in range(n)]


# -- the training step, as reranker/train.py runs it --------------------------------------------
def train_step(model, opt, batch: dict, device, grad_clip: float = 1.0) -> float:
    """One optimisation step of the real trainer's forward (reranker.train._forward) and update."""
    import torch

    from pipeline.encoder import autocast
    from reranker.train import TrainConfig, _forward

    model.train()
    with autocast(device):
        loss, _ = _forward(model, batch, device, TrainConfig.batch_negatives)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.item())


def make_optimizer(model, lr: float = 2e-3, first_stage_lr: float = 1e-4):
    """AdamW with the trainer's two parameter groups."""
    import torch

    return torch.optim.AdamW([
        {"params": model.first_stage.parameters(), "lr": first_stage_lr},
        {"params": model.reranker.parameters(), "lr": lr},
    ], weight_decay=0.01)


def random_negatives(rng: np.random.Generator, vids: np.ndarray, n_videos: int, n_neg: int) -> np.ndarray:
    """n_neg other videos per row (mining is amortised over checkpoint_every steps; not what is timed here)."""
    out = np.empty((len(vids), n_neg), dtype=np.int64)
    for r, v in enumerate(vids):
        out[r] = rng.choice(np.delete(np.arange(n_videos), v), size=n_neg, replace=False)
    return out
