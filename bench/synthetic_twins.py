"""First stage versus two-stage text-to-video R@1 on the synthetic test split, overall and per twin kind.

    python bench/synthetic_twins.py --data-root data/synthetic --cache cache/synthetic/demo.zarr \
        --run runs/demo [--run runs/cls ...] [--top-k 15]

Prints a table (one row per run and stage) and a final JSON line {run: {stage: {kind: R@1}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import FeatureCache  # noqa: E402
from pipeline.datasets.synthetic import twin_kinds  # noqa: E402
from reranker import metrics as M  # noqa: E402
from reranker.data import SplitFeatures  # noqa: E402
from reranker.evaluate import EvalConfig, run_evaluate  # noqa: E402

KINDS = ("colour", "direction", "order", "position", None)


def per_kind_r1(sims: np.ndarray, truth: np.ndarray, kind_of_video: np.ndarray) -> dict[str, float]:
    """t2v R@1 over all captions and over the captions of videos of each twin kind (None: no twin)."""
    ranks = M.t2v_ranks(sims, truth)
    out = {"all": M.metrics_from_ranks(ranks)["R@1"]}
    for kind in KINDS:
        rows = kind_of_video[truth] == str(kind)
        if rows.any():
            out[str(kind) if kind else "no twin"] = M.metrics_from_ranks(ranks[rows])["R@1"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--top-k", type=int, default=15)
    args = parser.parse_args()

    feats = SplitFeatures.open(FeatureCache(args.cache), args.split)
    kinds = twin_kinds(args.data_root)
    ids = FeatureCache(args.cache).video_ids()[feats.videos]
    kind_of_video = np.array([str(kinds.get(i)) for i in ids], dtype=object)
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.run:
            out = Path(tmp) / run.name
            run_evaluate(EvalConfig(cache=args.cache, run=run, split=args.split, top_k=args.top_k,
                                    out=out / "m.json", save_sims=out))
            truth = np.load(out / "text_to_video.npy")
            table[str(run)] = {stage: per_kind_r1(np.load(out / f"{stage}_sims.npy"), truth, kind_of_video)
                               for stage in ("first_stage", "two_stage")}
    columns = ["all", "colour", "direction", "order", "position", "no twin"]
    print(f"| run | stage | {' | '.join(columns)} |")
    print("|---|---|" + "---|" * len(columns))
    for run, stages in table.items():
        for stage, r1 in stages.items():
            print(f"| {run} | {stage} | " + " | ".join(f"{r1.get(c, float('nan')):.1f}" for c in columns) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
