"""Reranker training throughput: from the Zarr cache vs from memory vs live decoding + frozen encoder every step.

(a) cache:  the trainer's reader (reranker.train._read_step on SplitFeatures, one step prefetched in a thread,
            as train() does) + the train step
(b) memory: the same batches already in memory + the same train step (the upper bound)
(c) live:   pipeline.decode.decode_video on real mp4s + FrozenEncoder.encode_frames / encode_captions for
            every video and caption of the step (positives and hard negatives), then the same train step

    python bench/cache_vs_live.py --model ViT-B-32 --frames 12
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import (Shape, Stopwatch, final, header, make_optimizer, random_captions, random_negatives, scratch,
                    table, train_step, write_synthetic_cache, write_videos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="CrossTVR-Tiny")
    ap.add_argument("--pretrained", default=None, help="default: shipped weights if any, else random (speed is the same)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="captions per step (the trainer's --batch-size)")
    ap.add_argument("--negatives", type=int, default=2, help="negatives per caption (the trainer's default: 1 + 1)")
    ap.add_argument("--videos", type=int, default=64, help="videos in the cache")
    ap.add_argument("--captions", type=int, default=20, help="captions per video (MSR-VTT has 20): a step's captions "
                    "then lie in different caption chunks, as in real training")
    ap.add_argument("--files", type=int, default=12, help="distinct mp4 files decoded by the live path")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round, cache and memory")
    ap.add_argument("--live-steps", type=int, default=1, help="timed steps per round, live")
    ap.add_argument("--reps", type=int, default=3, help="rounds (a, b, c side by side); medians are reported")
    ap.add_argument("--workers", type=int, default=2, help="decoder threads of the live path")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.files, args.steps, args.live_steps, args.reps = 32, 6, 3, 1, 2
    header("cache_vs_live", args)

    import torch

    from pipeline.cache import DEFAULT_COMPRESSION, FeatureCache
    from pipeline.decode import decode_video
    from pipeline.encoder import FrozenEncoder
    from pipeline.extract import _encode_block
    from reranker.data import SplitFeatures
    from reranker.model import CrossTVR
    from reranker.train import TrainConfig, _epoch_plan, _read_step, model_config_for

    device = torch.device("cpu")
    encoder = FrozenEncoder(args.model, args.pretrained, device=device)
    info = encoder.info
    shape = Shape(T=args.frames, P=info.num_patches, W=info.patch_width, E=info.embed_dim, Wt=info.text_width,
                  L=encoder.max_text_tokens)
    rng = np.random.default_rng(0)
    with scratch("live") as tmp:
        files = write_videos(tmp / "videos", args.files)
        path = write_synthetic_cache(tmp / "cache.zarr", shape, {"train": args.videos}, captions=args.captions,
                                     compression=DEFAULT_COMPRESSION)
        cache = FeatureCache(path)
        feats = SplitFeatures.open(cache, "train")
        captions = random_captions(feats.n_texts)
        cfg = TrainConfig(batch_size=args.batch, hard_negatives=args.negatives, neighbour_negatives=0)
        plan = [p for e in range(1 + (args.steps * (args.reps + 1)) * args.batch // args.videos + 1)
                for p in _epoch_plan(feats, cfg, e)]
        captions_of = feats.captions_of

        def group(vids, caps):  # the trainer's step layout: each anchor with its negatives, each with a caption
            negs = random_negatives(rng, vids, feats.n_videos, args.negatives)
            neg_caps = np.array([[captions_of[u][0] for u in row] for row in negs])
            return np.concatenate([vids[:, None], negs], 1), np.concatenate([caps[:, None], neg_caps], 1)

        steps = [group(v, c) for v, c in plan]
        torch.manual_seed(0)
        model = CrossTVR(model_config_for(cache, cfg))
        read_step = functools.partial(_read_step, feats, video_inputs=model.reranker.video_inputs)
        opt = make_optimizer(model)
        B = len(plan[0][0])  # anchors per step, as the trainer counts samples
        n_neg = args.negatives

        def run_cache(chunk):
            reader = ThreadPoolExecutor(1)  # the trainer's one prefetch thread
            times, pending = [], reader.submit(read_step, *chunk[0])
            t_prev = time.perf_counter()
            for i in range(len(chunk)):
                batch = pending.result()
                if i + 1 < len(chunk):
                    pending = reader.submit(read_step, *chunk[i + 1])
                train_step(model, opt, batch, device)
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
            reader.shutdown()
            return times

        def run_memory(batches):
            times = []
            for batch in batches:
                t0 = time.perf_counter()
                train_step(model, opt, batch, device)
                times.append(time.perf_counter() - t0)
            return times

        decoders = ThreadPoolExecutor(args.workers)
        sw = Stopwatch()

        def live_batch(groups, group_caps) -> dict:
            videos, caps = groups.reshape(-1), group_caps.reshape(-1)
            with sw("decode"):
                decoded = list(decoders.map(lambda v: decode_video(files[v % len(files)], args.frames, info.image_size),
                                            videos))
            with sw("encode_frames"):
                feats_v = _encode_block(encoder, decoded)
            with sw("encode_captions"):
                tokens, lengths, emb = encoder.encode_captions([captions[c] for c in caps])
            stack = lambda k: torch.from_numpy(np.stack([f[k] for f in feats_v]))  # noqa: E731
            anchor = np.arange(len(groups)) * groups.shape[1]  # rows of column 0
            return {"texts": {"text_tokens": tokens, "text_lengths": torch.from_numpy(lengths).long()},
                    "videos": {"patch_tokens": stack(0), "cls_tokens": stack(1),
                               "frame_mask": torch.from_numpy(np.stack([d.mask for d in decoded]))},
                    "anchor_text_embeds": emb[anchor], "anchor_frame_embeds": stack(2)[anchor],
                    "video_ids": groups, "caption_ids": group_caps}

        def run_live(chunk):
            times = []
            for groups, group_caps in chunk:
                t0 = time.perf_counter()
                batch = live_batch(groups, group_caps)
                with sw("train_step"):
                    train_step(model, opt, batch, device)
                times.append(time.perf_counter() - t0)
            return times

        # warm-up: one step of each path (allocator, open_clip and zarr first calls)
        run_cache(steps[:1]), run_live(steps[:1])
        sw.seconds.clear()
        rows, ratios_live, ratios_mem = [], [], []
        for r in range(args.reps):
            chunk = steps[(r + 1) * args.steps: (r + 2) * args.steps]
            batches = [read_step(*s) for s in chunk]
            if r % 2:  # alternate the order of (a) and (b): a load that drifts within a round hits both alike
                b = statistics.median(run_memory(batches))
                a = statistics.median(run_cache(chunk))
            else:
                a = statistics.median(run_cache(chunk))
                b = statistics.median(run_memory(batches))
            c = statistics.median(run_live(chunk[: args.live_steps]))
            rows.append([r, B / a, B / b, B / c, c / a, b / a])
            ratios_live.append(c / a)
            ratios_mem.append(b / a)
        decoders.shutdown()
    print(f"\nsamples/s = captions per step / median step time; {B} anchors x (1 + {n_neg} negatives) videos and captions per step, "
          f"model {args.model} (P={shape.P}, W={shape.W}), T={shape.T}")
    print(table(["round", "a cache", "b memory", "c live", "a/c", "a/b"], rows))
    n_live = args.reps * args.live_steps
    print("\nlive path, seconds per step: " + ", ".join(f"{k} {v / n_live:.3g}" for k, v in sw.seconds.items()))
    final({"cache_over_live": round(statistics.median(ratios_live), 3),
           "cache_over_memory": round(statistics.median(ratios_mem), 3)})


if __name__ == "__main__":
    main()
