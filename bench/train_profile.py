"""Where a reranker training step's time goes on this machine's device: each phase of `train-reranker`
timed on its own, with the trainer's own functions.

    python bench/train_profile.py                                   # ViT-B/32-shaped synthetic cache, 600 + 100 videos
    python bench/train_profile.py --cache cache/s0.zarr [--spatial attention] [--steps 20]

Per step: cache reads (`_read_step`, the prefetch thread's share), hard-negative mining (`_mine_groups`),
the video bank (`video_bank`, once every --checkpoint-every steps), the update (forward, backward,
clipping, AdamW; `loss.item()` waits for the device), and validation (`evaluate_split` once an epoch).
The last two are spread over the steps they serve. The trainer reads the next step while this one
computes, so a step costs about max(reads, the rest). The final JSON line gives the phases in ms,
reads_over_rest (above 1: the reads bound training) and the steps per second that follow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import SHAPES, final, header, make_optimizer, scratch, table, train_step, write_synthetic_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="a cache written by `cli.py extract` [default: a synthetic one "
                    "of ViT-B/32's shapes, 600 train and 100 val videos, 5 captions each]")
    ap.add_argument("--spatial", choices=["attention", "cls", "flat"], default="flat")
    ap.add_argument("--steps", type=int, default=20, help="steps timed (after 2 untimed ones)")
    ap.add_argument("--quick", action="store_true", help="5 steps")
    args = ap.parse_args()
    header("train_profile", args)

    if args.cache:
        profile(Path(args.cache), args)
        return
    from pipeline.cache import DEFAULT_COMPRESSION

    with scratch("train-profile") as tmp:
        path = write_synthetic_cache(tmp / "cache.zarr", SHAPES["vitb32"], {"train": 600, "val": 100}, captions=5,
                                     compression=DEFAULT_COMPRESSION)
        profile(path, args)


def profile(path: Path, args) -> None:
    """Time each phase on the cache at path; print the table and the JSON line."""
    import torch

    from pipeline.cache import FeatureCache
    from pipeline.encoder import default_device
    from reranker.data import SplitFeatures
    from reranker.evaluate import evaluate_split
    from reranker.model import CrossTVR
    from reranker.train import TrainConfig, _epoch_plan, _mine_groups, _read_step, model_config_for, video_bank

    cache = FeatureCache(path)
    cfg = TrainConfig(cache=str(path), spatial=args.spatial)
    feats = SplitFeatures.open(cache, cfg.split)
    val = SplitFeatures.open(cache, cfg.val_split) if cfg.val_split in set(cache.video_split().tolist()) else None
    device = default_device()
    torch.manual_seed(cfg.seed)
    model = CrossTVR(model_config_for(cache, cfg)).to(device)
    opt = make_optimizer(model, cfg.lr, cfg.first_stage_lr)
    plan = _epoch_plan(feats, cfg, 0)
    steps = min(5 if args.quick else args.steps, len(plan) - 2)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    model.eval()
    bank, bank_s = timed(lambda: video_bank(model, feats, device))
    rng = np.random.default_rng(0)
    mine, read, update = [], [], []
    for s in range(steps + 2):
        vids, caps = plan[s]
        groups, t_mine = timed(lambda: _mine_groups(model, feats, bank, caps, vids, cfg, device, rng))
        batch, t_read = timed(lambda: _read_step(feats, *groups, model.reranker.video_inputs))
        _, t_update = timed(lambda: train_step(model, opt, batch, device, cfg.grad_clip))
        if s >= 2:  # the first steps pay for allocator and kernel warm-up
            mine.append(t_mine), read.append(t_read), update.append(t_update)
    val_s = timed(lambda: evaluate_split(model, val, min(cfg.top_k, val.n_videos), device, v2t=False))[1] if val else 0.0

    ms = {"read": 1e3 * statistics.median(read), "mine": 1e3 * statistics.median(mine),
          "bank": 1e3 * bank_s / cfg.checkpoint_every, "update": 1e3 * statistics.median(update),
          "validation": 1e3 * val_s / len(plan)}
    rest = ms["mine"] + ms["bank"] + ms["update"] + ms["validation"]
    print(f"device {device}, {len(plan)} steps an epoch of {len(plan[0][0])} anchors, {steps} timed; "
          f"validation {val_s:.2f} s an epoch ({val.n_videos if val else 0} videos)")
    print(table(["phase", "ms per step"], [[k, v] for k, v in ms.items()]))
    anchors = len(plan[0][0])
    final({**{f"{k}_ms": round(v, 2) for k, v in ms.items()}, "reads_over_rest": round(ms["read"] / rest, 3),
           "steps_per_s": round(1e3 / max(ms["read"], rest), 2),
           "anchors_per_s": round(anchors * 1e3 / max(ms["read"], rest), 1)})


if __name__ == "__main__":
    main()
