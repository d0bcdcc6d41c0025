"""First stage versus two-stage text-to-video R@1 on the synthetic test split, overall and per twin kind.

    python bench/synthetic_twins.py --data-root data/synthetic --cache cache/synthetic/demo.zarr \
        --run runs/demo [--run runs/cls ...] [--top-k 15]

Prints three tables and a JSON line:
- R@1: first a fact oracle's (it knows which test videos each caption is true of and guesses among them: 1/n
  for a caption true of n videos; a scale, not a bound, since a model may favour the captioned video among the
  n), then one row per run and stage;
- how often the top-1 video is one the caption is true of (R@1 with the ambiguity forgiven: the oracle's is
  100), ranked by the first stage, by the two stages and by the reranker's logit alone over the top-K;
- twin separation: among the captions whose video and its twin are both in the caption's top-K, how often the
  video scores above its twin by the first-stage cosine, the reranker's logit alone and the final score;
- {"fact_oracle": {kind: R@1}, run: {stage: {kind: R@1}, "top1_true": {ranking: {kind: %}},
  "twin_separation": {kind: {"pairs": n, score: %}}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import FeatureCache  # noqa: E402
from pipeline.encoder import default_device  # noqa: E402
from pipeline.synthetic import read_plan, true_of  # noqa: E402
from reranker import metrics as M  # noqa: E402
from reranker.data import SplitFeatures  # noqa: E402
from reranker.evaluate import first_stage_sims, rerank  # noqa: E402
from reranker.train import check_compatible, load_model  # noqa: E402

KINDS = ("colour", "direction", "order", "position", None)


def per_kind_mean(values: np.ndarray, truth: np.ndarray, kind_of_video: np.ndarray) -> dict[str, float]:
    """The mean of a per-caption value over all captions and over the captions of videos of each twin kind
    (None: no twin)."""
    out = {"all": float(values.mean())}
    for kind in KINDS:
        rows = kind_of_video[truth] == str(kind)
        if rows.any():
            out[str(kind) if kind else "no twin"] = float(values[rows].mean())
    return out


def per_kind_r1(sims: np.ndarray, truth: np.ndarray, kind_of_video: np.ndarray) -> dict[str, float]:
    """t2v R@1 over all captions and over the captions of videos of each twin kind."""
    return per_kind_mean(100.0 * (M.t2v_ranks(sims, truth) == 1), truth, kind_of_video)


def top1_true(sims: np.ndarray, true_videos: list[set[int]]) -> np.ndarray:
    """Per caption, 100 when its top-ranked video is one of true_videos (split positions it is true of), else 0."""
    return 100.0 * np.array([int(top) in videos for top, videos in zip(sims.argmax(1), true_videos)])


def twin_separation(first: np.ndarray, candidates: np.ndarray, scores: dict[str, np.ndarray], truth: np.ndarray,
                    twin_of: np.ndarray, kind_of_video: np.ndarray) -> dict[str, dict]:
    """Per twin kind, among the captions whose video and its twin (twin_of: split position or -1) are both among
    the caption's candidates [texts, K]: the number of such captions and the % whose video scores above the twin,
    by the first-stage cosine and by each of `scores` (name -> [texts, K], aligned with candidates)."""
    video, twin = truth, twin_of[truth]
    at_video, at_twin = candidates == video[:, None], candidates == twin[:, None]
    both = at_video.any(1) & at_twin.any(1) & (twin >= 0)
    jv, jt = at_video.argmax(1), at_twin.argmax(1)
    rows = np.arange(len(truth))
    above = {"first_stage": first[rows, video] > first[rows, np.maximum(twin, 0)]}
    above |= {name: s[rows, jv] > s[rows, jt] for name, s in scores.items()}
    out = {}
    for kind in KINDS[:-1]:
        sel = both & (kind_of_video[truth] == kind)
        if sel.any():
            out[kind] = {"pairs": int(sel.sum()), **{name: 100.0 * float(a[sel].mean()) for name, a in above.items()}}
    return out


def not_in_split(ids: Sequence[str], pairs: Sequence[tuple[str, str]], planned: dict, true: dict,
                 split: str) -> list[str]:
    """The cache's videos of the split that the set does not hold in it or, when there are none, its (video, caption)
    pairs that the set's plan does not: a cache extracted from another set (or seed) must not be scored against this
    one's facts. A caption-less video is caught too."""
    videos = [str(v) for v in ids if v not in planned or planned[v].split != split]
    return videos or [f"{v}: {c!r}" for v, c in pairs if (v, c) not in true]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--top-k", type=int, default=15)
    args = parser.parse_args()

    cache = FeatureCache(args.cache)
    feats = SplitFeatures.open(cache, args.split)
    planned = {p.video: p for p in read_plan(args.data_root)}
    ids = cache.video_ids()[feats.videos]
    truth, device = feats.text_video, default_device()
    true = true_of([p for p in planned.values() if p.split == args.split])
    captions = cache["captions"][:]  # whole: indexing the zarr array per caption decodes a chunk each time
    pairs = [(ids[v], str(captions[t])) for t, v in zip(feats.texts, truth)]
    if unknown := not_in_split(ids, pairs, planned, true, args.split):
        sys.exit(f"{args.cache}: {len(unknown)} of its {args.split} videos or captions (e.g. {unknown[0]}) are not "
                 f"in {args.data_root}'s {args.split} split; pass the --data-root the cache was extracted from")
    kind_of_video = np.array([str(planned[i].twin_kind) for i in ids], dtype=object)
    position = {v: i for i, v in enumerate(ids)}
    twin_of = np.array([position.get(planned[i].twin_of, -1) for i in ids])  # split position of each video's twin, or -1
    true_videos = [{position[i] for i in true[pair]} for pair in pairs]  # split positions of the videos each caption is true of
    oracle = per_kind_mean(np.array([100.0 / len(videos) for videos in true_videos]), truth, kind_of_video)
    table: dict[str, dict] = {}
    for run in args.run:
        # evaluate's text-to-video pass, once: its candidates, final scores and logits feed both tables
        model, state = load_model(run)
        check_compatible(state["cache_signature"], cache, run)
        first = first_stage_sims(model.to(device), feats, device)
        candidates, final, logits = rerank(model, feats, first, min(args.top_k, feats.n_videos), device)
        two_stage = M.two_stage_scores(first, candidates, final)
        top1 = {"first_stage": first, "two_stage": two_stage, "reranker_alone": M.two_stage_scores(first, candidates, logits)}
        table[str(run)] = {
            "first_stage": per_kind_r1(first, truth, kind_of_video),
            "two_stage": per_kind_r1(two_stage, truth, kind_of_video),
            "top1_true": {stage: per_kind_mean(top1_true(sims, true_videos), truth, kind_of_video)
                          for stage, sims in top1.items()},
            "twin_separation": twin_separation(first, candidates, {"reranker": logits, "final": final}, truth,
                                               twin_of, kind_of_video),
        }
    columns = ["all", "colour", "direction", "order", "position", "no twin"]
    print(f"| run | stage | {' | '.join(columns)} |")
    print("|---|---|" + "---|" * len(columns))
    print("| (every caption's truth, guessing among ties) | fact oracle | "
          + " | ".join(f"{oracle.get(c, float('nan')):.1f}" for c in columns) + " |")
    for run, stages in table.items():
        for stage in ("first_stage", "two_stage"):
            r1 = stages[stage]
            print(f"| {run} | {stage} | " + " | ".join(f"{r1.get(c, float('nan')):.1f}" for c in columns) + " |")
    print("\nTop-1 video one the caption is true of, % (ambiguity forgiven; the fact oracle's: 100):")
    print(f"| run | ranking | {' | '.join(columns)} |")
    print("|---|---|" + "---|" * len(columns))
    for run, stages in table.items():
        for stage, hits in stages["top1_true"].items():
            print(f"| {run} | {stage} | " + " | ".join(f"{hits.get(c, float('nan')):.1f}" for c in columns) + " |")
    print("\nVideo above its twin, % of the captions whose top-K holds both:")
    print("| run | twin kind | captions | first stage | reranker alone | final |")
    print("|---|---|---|---|---|---|")
    for run, stages in table.items():
        for kind, sep in stages["twin_separation"].items():
            print(f"| {run} | {kind} | {sep['pairs']} | {sep['first_stage']:.1f} | {sep['reranker']:.1f} | {sep['final']:.1f} |")
    print(json.dumps({"fact_oracle": oracle} | table))


if __name__ == "__main__":
    main()
