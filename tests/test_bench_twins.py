"""bench/synthetic_twins.py: its twin separation against a plain loop over the captions, and the script on a trained
run against evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from reranker.evaluate import EvalConfig, run_evaluate
from tests.conftest import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "bench"))
from synthetic_twins import not_in_split, per_kind_r1, top1_true, twin_separation  # noqa: E402


def test_twin_separation_counts_only_captions_whose_candidates_hold_both():
    rng = np.random.default_rng(0)
    n_videos, k = 12, 4
    truth = np.repeat(np.arange(n_videos), 3)  # 36 captions
    twin_of = np.array([1, 0, 3, 2, 5, 4, 7, 6, -1, -1, 11, 10])
    kind_of_video = np.array(["colour"] * 4 + ["order"] * 4 + ["None"] * 2 + ["position"] * 2, dtype=object)
    first = rng.normal(size=(len(truth), n_videos))
    first[np.arange(len(truth)), truth] += 1.0  # most captions find their video
    candidates = np.argsort(-first, axis=1)[:, :k]
    logits, final = rng.normal(size=candidates.shape), rng.normal(size=candidates.shape)
    got = twin_separation(first, candidates, {"reranker": logits, "final": final}, truth, twin_of, kind_of_video)

    expected: dict[str, dict] = {}
    for i, v in enumerate(truth):
        t, row = twin_of[v], list(candidates[i])
        if t < 0 or v not in row or t not in row:
            continue
        e = expected.setdefault(kind_of_video[v], {"pairs": 0, "first_stage": 0, "reranker": 0, "final": 0})
        e["pairs"] += 1
        e["first_stage"] += first[i, v] > first[i, t]
        e["reranker"] += logits[i, row.index(v)] > logits[i, row.index(t)]
        e["final"] += final[i, row.index(v)] > final[i, row.index(t)]
    assert set(got) == set(expected) and "None" not in got
    for kind, e in expected.items():
        assert got[kind]["pairs"] == e["pairs"] > 0
        for name in ("first_stage", "reranker", "final"):
            assert got[kind][name] == 100.0 * e[name] / e["pairs"]


def test_per_kind_r1_against_a_loop_over_the_captions():
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(8), 4)  # 32 captions
    kind_of_video = np.array(["colour", "colour", "order", "order", "None", "None", "position", "position"],
                             dtype=object)
    sims = rng.normal(size=(len(truth), 8))
    sims[np.arange(len(truth)), truth] += 1.0
    got = per_kind_r1(sims, truth, kind_of_video)
    hits = [int(np.argmax(sims[i]) == v) for i, v in enumerate(truth)]
    expected = {"all": 100.0 * np.mean(hits)}
    for kind, name in (("colour", "colour"), ("order", "order"), ("position", "position"), ("None", "no twin")):
        expected[name] = 100.0 * np.mean([h for h, v in zip(hits, truth) if kind_of_video[v] == kind])
    assert got == pytest.approx(expected) and 0 < got["all"] < 100


def test_top1_true_credits_any_video_the_caption_is_true_of():
    sims = np.array([[0.1, 0.9, 0.3], [0.8, 0.1, 0.2], [0.2, 0.3, 0.7]])
    true_videos = [{0, 1}, {1}, {2, 0}]  # caption 0's top video 1 is not its own (0) but the caption holds there
    assert top1_true(sims, true_videos).tolist() == [100.0, 0.0, 100.0]


def test_not_in_split_names_stray_videos_first_then_stray_captions():
    planned = {v: SimpleNamespace(split=split) for v, split in (("v0", "test"), ("v1", "test"), ("v2", "train"))}
    true = {("v0", "a red circle"): {"v0"}, ("v1", "a blue square"): {"v1"}}
    pairs = [("v0", "a red circle"), ("v1", "a blue square")]
    assert not_in_split(["v0", "v1"], pairs, planned, true, "test") == []
    # a caption-less video the set does not hold, and one the set holds in another split
    assert not_in_split(["v0", "v1", "v9", "v2"], pairs, planned, true, "test") == ["v9", "v2"]
    assert not_in_split(["v0", "v1"], pairs + [("v1", "a green star")], planned, true, "test") == ["v1: 'a green star'"]


def test_the_script_on_a_trained_run_agrees_with_evaluate(synthetic_run, tmp_path):
    data, cache, run = synthetic_run
    # the test split holds about 12 videos, fewer than --top-k 15: it crashed there, so every video is re-scored
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_twins.py"), "--data-root", str(data),
                          "--cache", str(cache), "--run", str(run), "--top-k", "15"], env=subprocess_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])[str(run)]
    report, _ = run_evaluate(EvalConfig(cache=cache, run=run, top_k=15, out=tmp_path / "eval.json"))
    assert report["n_videos"] < 15
    for stage in ("first_stage", "two_stage"):
        assert table[stage]["all"] == pytest.approx(report[stage]["t2v"]["R@1"]), stage
