"""End-to-end extraction (pipeline.extract.run_extract) versus the frozen encoder alone, same model and batch.

On N generated 320x240 H.264 videos (a manifest dataset, 2 captions each):
  end-to-end:   run_extract (decoder threads running ahead, encoder, writer thread, fsync-ed Zarr chunks)
  encoder only: FrozenEncoder.encode_frames on the already-decoded frames, in the same blocks of
                --batch-videos videos, + encode_captions in the same caption chunks
and, apart, where the time goes: decode alone (the same thread pool), encode alone, write alone
(FeatureCache.write_video), and the encoder's construction (a one-off cost inside run_extract); and captions
encoded over the --max-text-tokens positions kept (what extract does) against the text tower's whole context.

    python bench/extract.py --model ViT-B-32
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock


from common import final, header, median_time, random_captions, scratch, table, write_videos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="default: shipped weights if any, else random (speed is the same)")
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--batch-videos", type=int, default=8, help="as extract --batch-videos")
    ap.add_argument("--workers", type=int, default=4, help="decoder threads, as extract --workers")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.reps = 8, 2
    header("extract", args)

    import logging

    import open_clip  # noqa: F401 - imported (~2 s the first time) before t_setup, which run_extract does not pay again
    import torch

    from pipeline.cache import TEXT_CHUNK, FeatureCache
    from pipeline.decode import decode_video
    from pipeline.encoder import FrozenEncoder
    from pipeline.extract import ExtractConfig, _encode_block, run_extract

    logging.getLogger("pipeline.encoder").setLevel(logging.ERROR)  # the random-weights warning, once per run
    device = torch.device("cpu")
    with scratch("extract") as tmp:
        root = tmp / "data"
        files = write_videos(root / "videos", args.videos)
        captions = random_captions(2 * args.videos)
        with open(root / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption", "split"])
            for i, p in enumerate(files):
                for c in (2 * i, 2 * i + 1):
                    w.writerow([f"videos/{p.name}", captions[c], "train"])

        t0 = time.perf_counter()
        encoder = FrozenEncoder(args.model, args.pretrained, device=device)
        t_setup = time.perf_counter() - t0
        size = encoder.info.image_size
        with ThreadPoolExecutor(args.workers) as pool:
            decoded = list(pool.map(lambda p: decode_video(p, args.frames, size), files))
        blocks = [decoded[k: k + args.batch_videos] for k in range(0, len(decoded), args.batch_videos)]

        def encoder_only():
            feats = [f for b in blocks for f in _encode_block(encoder, b)]
            for lo in range(0, len(captions), TEXT_CHUNK):
                encoder.encode_captions(captions[lo: lo + TEXT_CHUNK])
            return feats

        def decode_only():
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(lambda p: decode_video(p, args.frames, size), files))

        e2e, enc, dec, wrt, ratios = [], [], [], [], []
        for r in range(args.reps):
            cfg = ExtractConfig(dataset="manifest", data_root=root, cache=tmp / f"e2e{r}.zarr", model=args.model,
                                pretrained=args.pretrained, frames=args.frames, batch_videos=args.batch_videos,
                                workers=args.workers, progress=False)
            t0 = time.perf_counter()
            summary = run_extract(cfg)
            e2e.append(time.perf_counter() - t0)
            assert summary.videos_done == args.videos, summary
            t0 = time.perf_counter()
            feats = encoder_only()
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            decode_only()
            dec.append(time.perf_counter() - t0)
            cache = FeatureCache(cfg.cache, mode="r+")  # rewrite the same chunks through the writer's own call
            t0 = time.perf_counter()
            for v, (f, d) in enumerate(zip(feats, decoded)):
                cache.write_video(v, *f, d.mask)
            wrt.append(time.perf_counter() - t0)
            ratios.append(enc[-1] / (e2e[-1] - t_setup))
        m = statistics.median
        n = args.videos
        print(f"\n{n} videos x {args.frames} frames, model {args.model} ({size}px), batch {args.batch_videos} videos, "
              f"{args.workers} decoder threads; medians of {args.reps}")
        print(table(["path", "s", "videos/s", "share of e2e"], [
            ["run_extract end to end", m(e2e), n / m(e2e), 1.0],
            ["  of which encoder construction (one-off)", t_setup, "", t_setup / m(e2e)],
            ["encoder only (frames + captions)", m(enc), n / m(enc), m(enc) / m(e2e)],
            ["decode only (same pool)", m(dec), n / m(dec), m(dec) / m(e2e)],
            ["write only (write_video, fsync)", m(wrt), n / m(wrt), m(wrt) / m(e2e)],
        ]))
        print(f"end-to-end over encoder, including the one-off construction: {m(enc) / m(e2e):.3f}; "
              f"steady state (construction excluded): {m(ratios):.3f}")

        # Captions (about 40 a video in MSVD): the text tower over the positions kept vs over its whole context
        chunk = random_captions(64, seed=1)
        kept, context = encoder.max_text_tokens, encoder.info.context_length

        def whole_context():
            with mock.patch.object(encoder, "_text_positions", lambda n: contextlib.nullcontext(context)):
                encoder.encode_captions(chunk)

        t_kept = median_time(lambda: encoder.encode_captions(chunk), reps=args.reps)[0]
        t_whole = median_time(whole_context, reps=args.reps)[0]
        print(f"\n64 captions: {t_kept:.2f} s over the {kept} positions kept, {t_whole:.2f} s over all {context}: "
              f"{t_whole / t_kept:.2f}x")
    final({"end_to_end_over_encoder": round(m(ratios), 3), "captions_whole_over_kept": round(t_whole / t_kept, 2)})


if __name__ == "__main__":
    main()
