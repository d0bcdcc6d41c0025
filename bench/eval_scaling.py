"""Two-stage evaluation time vs N (captions = videos) and top_k K, ViT-B/32-shaped cached features.

The first stage (reranker.evaluate.first_stage_sims) is timed over the whole split. The reranker pass
(reranker.evaluate.rerank) costs the same per query, so by default it is timed on the first rerank batch
of queries of each direction (512 // K captions for t2v, 512 // K videos for v2t) and scaled to N queries. `--check N,K` also times the full evaluation (_evaluate, both directions, all queries) at one size
to validate that scaling; `--full` times every size in full.

    python bench/eval_scaling.py                # N in 250..2000, K in 5, 15, 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import SHAPES, FeaturePool, Stopwatch, final, header, median_time, scratch, table, write_synthetic_cache


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y ~ a + b x: (a, b, R^2)."""
    A = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - (a + b * x)
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), r2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="250,500,1000,2000")
    ap.add_argument("--ks", default="5,15,50")
    ap.add_argument("--check", default="250,5", help="N,K timed in full with _evaluate ('' to skip)")
    ap.add_argument("--full", action="store_true", help="time every (N, K) in full (slow: ~N*K*2 pairs each)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spatial", choices=["attention", "cls", "flat"], default=None,
                    help="reranker variant [default: train-reranker's default]")
    args = ap.parse_args()
    if args.quick:
        args.ns, args.ks, args.check = "100,200,400", "5,15", "100,5"
    header("eval_scaling", args)
    ns, ks = [int(x) for x in args.ns.split(",")], [int(x) for x in args.ks.split(",")]
    if len({n * k for n in ns for k in ks}) < 2:
        raise SystemExit("eval_scaling: the linear fit needs at least two N*K sizes (--ns/--ks)")

    import torch

    from pipeline.cache import DEFAULT_COMPRESSION, FeatureCache
    from reranker.data import RERANKER_TEXT_ARRAYS, SplitFeatures, to_device
    from reranker.evaluate import _evaluate, _rerank_pairs, first_stage_sims, rerank
    from reranker.metrics import topk_candidates
    from reranker.model import CrossTVR
    from reranker.train import TrainConfig, model_config_for

    device = torch.device("cpu")
    shape = SHAPES["vitb32"]
    with scratch("eval") as tmp:
        # 256 distinct feature sets: with fewer, captions sharing a set share their top-K candidates,
        # which makes reads and encode_frames unrealistically cheap
        pool = FeaturePool(shape, distinct=min(256, max(ns)))
        path = write_synthetic_cache(tmp / "cache.zarr", shape, {"test": max(ns)}, compression=DEFAULT_COMPRESSION,
                                     pool=pool)
        cache = FeatureCache(path)
        torch.manual_seed(0)
        train_cfg = TrainConfig(**({"spatial": args.spatial} if args.spatial else {}))
        model = CrossTVR(model_config_for(cache, train_cfg)).eval()

        whole = SplitFeatures.open(cache, "test")

        def split(n: int) -> SplitFeatures:  # the first n videos and their captions (one each)
            return SplitFeatures(cache, "test", np.arange(n), np.arange(n), np.arange(n), whole.frame_masks[:n],
                                 whole.text_lengths[:n])

        rows, xs, ys, est = [], [], [], {}
        for n in ns:
            feats = split(n)
            t_first, _ = median_time(lambda: first_stage_sims(model, feats, device), reps=3)
            first = first_stage_sims(model, feats, device)
            for k in ks:
                if args.full:
                    t0 = time.perf_counter()
                    ev = _evaluate(model, feats, k, device, zero_shot=False)
                    total, q, t_rr = time.perf_counter() - t0, n, ev.seconds["two_stage"]
                else:
                    q = min(n, max(1, 512 // k))  # one rerank batch of queries, each direction
                    t0 = time.perf_counter()
                    rerank(model, feats, first[:q], k, device)  # t2v: the first q captions
                    rerank(model, feats, first[:, :q], k, device, videos_are_queries=True)  # v2t: the first q videos
                    t_rr = (time.perf_counter() - t0) * n / q  # each direction reranks N*K pairs
                    total = t_first + t_rr
                est[(n, k)] = total
                xs.append(n * k)
                ys.append(total)
                rows.append([n, k, q, t_first, t_rr, total, 2 * n * k / t_rr])
                print(f"  N={n} K={k}: {total:.1f} s", flush=True)
        a, b, r2 = fit_linear(np.array(xs, float), np.array(ys, float))
        print(f"\nseconds = first stage (all N) + two-stage rerank ({'measured in full' if args.full else 'first batch of q queries of each direction, scaled to N'})")
        print(table(["N", "K", "q timed", "first s", "rerank s", "total s", "pairs/s"], rows))
        print(f"fit: seconds ~ {a:.3g} + {b:.3g} * N*K   (R^2 = {r2:.4f}); "
              f"1000 x 15 -> {a + b * 15000:.1f} s")

        if args.check:
            n, k = (int(x) for x in args.check.split(","))
            feats = split(n)
            t0 = time.perf_counter()
            ev = _evaluate(model, feats, k, device, zero_shot=False)
            full = time.perf_counter() - t0
            predicted = est.get((n, k), a + b * n * k)
            print(f"check N={n} K={k}: full _evaluate {full:.1f} s (first stage {ev.seconds['first_stage']:.2f}, "
                  f"two-stage {ev.seconds['two_stage']:.1f}); scaled estimate {predicted:.1f} s "
                  f"(ratio {full / predicted:.2f})")

        # where one rerank batch's time goes (K=15: 34 captions x 15 candidates)
        feats = split(min(max(ns), 1000))
        first = first_stage_sims(model, feats, device)
        k = 15
        qn = 512 // k
        cand = topk_candidates(first[:qn], k)
        text_pos, video_pos = np.repeat(np.arange(qn), k), cand.reshape(-1)
        sw = Stopwatch()
        r = model.reranker
        with torch.no_grad():
            texts_u, t_inv = np.unique(text_pos, return_inverse=True)
            videos_u, v_inv = np.unique(video_pos, return_inverse=True)
            with sw("read texts+videos (cache)"):
                t = to_device(feats.read_texts(texts_u, RERANKER_TEXT_ARRAYS), device)
                v = to_device(feats.read_videos(videos_u, r.video_inputs), device)
            with sw("encode_queries"):
                queries, qmask = r.encode_queries(t["text_tokens"], t["text_lengths"])
            with sw(f"encode_frames ({len(videos_u)} videos)"):
                frames = r.encode_frames(v.get("patch_tokens"), v.get("cls_tokens"))
            ti, vi = torch.from_numpy(t_inv), torch.from_numpy(v_inv)
            if frames.keys:  # 'attention': the per-pair spatial stage alone
                with sw(f"spatial read_frames ({len(text_pos)} pairs)"):
                    r.read_frames(queries[ti], qmask[ti], frames[vi])
            with sw(f"match = spatial (attention only) + temporal + head ({len(text_pos)} pairs)"):
                r.match(queries[ti], qmask[ti], frames[vi], v["frame_mask"][vi])
            with sw("_rerank_pairs (the same pairs: one block, one batch)"):
                _rerank_pairs(model, feats, text_pos, video_pos, device)
            # a candidate change, not what the library does today: bf16 autocast on CPU too
            with sw("candidate: same, CPU bf16 autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
                _rerank_pairs(model, feats, text_pos, video_pos, device)
            with sw("_rerank_pairs again (float32, noise check)"):
                _rerank_pairs(model, feats, text_pos, video_pos, device)
        print("\none rerank batch (K=15), seconds:")
        print(table(["part", "s"], [[name, s] for name, s in sw.seconds.items()]))
    final({"seconds_n1000_k15": round(est.get((1000, 15), a + b * 15000), 2), "linear_fit_r2": round(r2, 4)})


if __name__ == "__main__":
    main()
