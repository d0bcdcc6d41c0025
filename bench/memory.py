"""Training peak RSS with a cache of 1k versus 10k videos: does memory grow with the cache?

Each size runs the real trainer (reranker.train.train) for --steps steps in a fresh subprocess (the epoch
plan is cut to those steps), on synthetic features of real-ish but small shapes (T=12, P=16, W=64) so
that 10k videos stay ~0.3 GB on disk. Peak RSS is the child's ru_maxrss; the RSS right after the imports
is the baseline (torch alone is a few hundred MB).

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from common import Shape, final, header, scratch, table, write_synthetic_cache

SHAPE = Shape(T=12, P=16, W=64, E=64, Wt=64, L=32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3  # kB


def child(cache: str, run: str, steps: int, batch: int) -> None:
    import torch  # noqa: F401 - the baseline includes the libraries

    import reranker.train as T

    base = rss_mb()
    plan = T._epoch_plan
    T._epoch_plan = lambda feats, cfg, epoch: plan(feats, cfg, epoch)[:steps]
    cfg = T.TrainConfig(cache=cache, run=run, epochs=1, batch_size=batch, val_split="", dim=64, heads=4,
                        checkpoint_every=max(steps, 1))
    T.train(cfg, progress=False)
    peak = peak_rss_mb()  # not ru_maxrss: on Linux it keeps the parent's peak through fork and exec
    print(json.dumps({"baseline_mb": base, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("CACHE", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.steps, args.batch)
    if args.quick:
        args.steps = 5
    header("memory", args)
    sizes = [int(x) for x in args.sizes.split(",")]
    rows, peaks = [], {}
    with scratch("memory") as tmp:
        for n in sizes:
            cache = write_synthetic_cache(tmp / f"c{n}.zarr", SHAPE, {"train": n}, compression="blosc-lz4")
            out = subprocess.run([sys.executable, str(Path(__file__)), "--child", str(cache), str(tmp / f"run{n}"),
                                  "--steps", str(args.steps), "--batch", str(args.batch)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"child for {n} videos failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[n] = res
            rows.append([n, res["baseline_mb"], res["peak_mb"], res["peak_mb"] - res["baseline_mb"]])
    print(f"\n{args.steps} train steps of {args.batch} captions, T={SHAPE.T} P={SHAPE.P} W={SHAPE.W}, reranker dim 64")
    print(table(["videos", "RSS after imports MB", "peak RSS MB", "peak - baseline MB"], rows))
    lo, hi = peaks[sizes[0]], peaks[sizes[-1]]
    growth = (hi["peak_mb"] - lo["peak_mb"]) / lo["peak_mb"]
    above = (hi["peak_mb"] - hi["baseline_mb"]) / max(lo["peak_mb"] - lo["baseline_mb"], 1e-9) - 1
    print(f"growth of peak RSS {sizes[0]} -> {sizes[-1]}: {growth:+.1%}; of the part above the baseline: {above:+.1%}")
    final({"rss_growth_1k_to_10k": round(growth, 4)})


if __name__ == "__main__":
    main()
