"""Cache I/O: bytes per video, codecs (pipeline.cache.COMPRESSORS) and the training loader's read speed.

1. For ViT-B/32 and ViT-L/14 shapes, every codec: bytes on disk per video, write throughput through the
   extractor's own path (FeatureCache.write_video: atomic, fsync-ed chunk writes) and sequential read
   throughput. Features are smooth low-rank + noise fp16 tensors (see common.smooth_features); a
   random-normal row shows why: random fp16 barely compresses.
2. The training loader (SplitFeatures.read_videos on shuffled batches, fp16 as stored) versus a plain sequential
   read of the same arrays (zarr slices in index order, fp16), default codec, in the same process. The loader
   as it was before issue #6 (zarr orthogonal selection, float32 on the CPU) and raw reads of the chunk files
   (no decoding) are shown too.
   Data written moments before sits in the page cache: this measures CPU cost (decode, copies, zarr
   overhead), not the disk.

    python bench/cache_io.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from common import SHAPES, FeaturePool, final, header, scratch, table, write_synthetic_cache

VIDEO_ARRAYS = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask")


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def read_sequential(cache, n: int, block: int) -> int:
    """Every video's arrays by zarr slices in index order, those the loader reads from disk (its frame masks are
    in memory: SplitFeatures.open reads them outside the timed loop); returns the decoded bytes."""
    total = 0
    for lo in range(0, n, block):
        for name in (a for a in VIDEO_ARRAYS if a != "frame_mask"):
            total += cache[name][lo: min(lo + block, n)].nbytes
    return total


def read_orthogonal(feats, positions: np.ndarray) -> dict:
    """The loader before issue #6 (not library code): one zarr orthogonal selection of the sorted rows per
    array, put back in the asked order, features made float32 on the CPU."""
    idx = feats.videos[positions]
    order = np.argsort(idx, kind="stable")
    unique, inverse = np.unique(idx[order], return_inverse=True)
    out = {}
    for name in VIDEO_ARRAYS:
        arr = feats.cache[name]
        rows = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
        rows[order] = arr.get_orthogonal_selection((unique,))[inverse]
        out[name] = rows if rows.dtype == bool else rows.astype(np.float32)
    return out


def read_raw(path, n: int) -> int:
    """The chunk files of every video array, read as bytes in index order (no decoding)."""
    total = 0
    for name in VIDEO_ARRAYS:
        for root, _, files in os.walk(path / name):
            for f in sorted(files):
                with open(os.path.join(root, f), "rb") as fh:
                    total += len(fh.read())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=24, help="videos per codec run (ViT-L/14 uses half)")
    ap.add_argument("--loader-videos", type=int, default=256, help="ViT-B/32 videos in the loader comparison")
    ap.add_argument("--batch", type=int, default=32, help="training batch: videos per read_videos call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.loader_videos, args.reps = 8, 96, 3
    header("cache_io", args)

    from pipeline.cache import COMPRESSORS, DEFAULT_COMPRESSION, FeatureCache
    from reranker.data import SplitFeatures

    rows, bytes_vitb32 = [], None
    with scratch("io") as tmp:
        for shape_name in ("vitb32", "vitl14"):
            shape = SHAPES[shape_name]
            n = args.videos if shape_name == "vitb32" else max(2, args.videos // 2)
            raw_mb = shape.video_bytes() * n / 1e6
            kinds = [("smooth", True), ("normal", False)] if shape_name == "vitb32" else [("smooth", True)]
            for kind, realistic in kinds:
                pool = FeaturePool(shape, distinct=min(n, 8), realistic=realistic)
                for codec in COMPRESSORS:
                    if kind == "normal" and codec not in ("none", DEFAULT_COMPRESSION, "zstd"):
                        continue
                    path = tmp / f"{shape_name}-{kind}-{codec}.zarr"
                    sec: dict = {}
                    write_synthetic_cache(path, shape, {"train": n}, compression=codec, durable=True, pool=pool,
                                          seconds=sec)
                    t_write = sec["videos"]  # write_video calls only; creating the group is a one-off
                    per_video = sum(dir_bytes(path / a) for a in VIDEO_ARRAYS) / n
                    cache = FeatureCache(path)
                    reads = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        read_sequential(cache, n, args.batch)
                        reads.append(time.perf_counter() - t0)
                    t_read = statistics.median(reads)
                    rows.append([shape_name, kind, codec, per_video / 1e6, shape.video_bytes() / per_video,
                                 raw_mb / t_write, raw_mb / t_read])
                    if shape_name == "vitb32" and kind == "smooth" and codec == DEFAULT_COMPRESSION:
                        bytes_vitb32 = int(per_video)
                    print(f"  {shape_name} {kind} {codec}: {per_video / 1e6:.3f} MB/video", flush=True)
        print("\nper video: patch + class tokens + frame embeddings + mask (text features not included); "
              "MB/s of uncompressed fp16 features")
        print(table(["shape", "features", "codec", "MB/video", "ratio", "write MB/s", "read MB/s"], rows))

        # -- the training loader vs a sequential read of the same arrays ---------------------------
        shape, n = SHAPES["vitb32"], args.loader_videos
        path = write_synthetic_cache(tmp / "loader.zarr", shape, {"train": n}, compression=DEFAULT_COMPRESSION)
        cache = FeatureCache(path)
        feats = SplitFeatures.open(cache, "train")
        rng = np.random.default_rng(0)
        mb = shape.video_bytes() * n / 1e6
        loader, seq, raw, before, ratios = [], [], [], [], []
        for _ in range(args.reps):
            order = rng.permutation(n)
            t0 = time.perf_counter()
            for lo in range(0, n, args.batch):
                feats.read_videos(order[lo: lo + args.batch])
            loader.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_sequential(cache, n, args.batch)
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_raw(path, n)
            raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for lo in range(0, n, args.batch):
                read_orthogonal(feats, order[lo: lo + args.batch])
            before.append(time.perf_counter() - t0)
            ratios.append(seq[-1] / loader[-1])
        print(f"\nloader: {n} ViT-B/32 videos, batches of {args.batch}, codec {DEFAULT_COMPRESSION}, "
              f"{mb:.0f} MB of fp16 features; medians of {args.reps}")
        print(table(["read", "s", "MB/s", "vs sequential"], [
            ["SplitFeatures.read_videos, shuffled, fp16", statistics.median(loader), mb / statistics.median(loader),
             statistics.median(ratios)],
            ["before #6: orthogonal selection, float32", statistics.median(before), mb / statistics.median(before),
             statistics.median(seq) / statistics.median(before)],
            ["zarr slices, sequential", statistics.median(seq), mb / statistics.median(seq), 1.0],
            ["raw chunk files (no decode)", statistics.median(raw), mb / statistics.median(raw),
             statistics.median(seq) / statistics.median(raw)],
        ]))
    final({"loader_over_sequential": round(statistics.median(ratios), 3), "bytes_per_video_vitb32": bytes_vitb32})


if __name__ == "__main__":
    main()
