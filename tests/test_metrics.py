"""Tests for reranker.metrics against hand-computed examples and brute-force references."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from reranker.metrics import (
    METRIC_KEYS,
    format_table,
    metrics_from_ranks,
    rank_of_truth,
    recall_curve_png,
    t2v_metrics,
    t2v_ranks,
    topk_candidates,
    two_stage_scores,
    v2t_metrics,
    v2t_ranks,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ rank_of_truth


def test_ranks_3x3_by_hand():
    sims = np.array(
        [
            [0.9, 0.1, 0.2],  # truth 0 is the best -> rank 1
            [0.8, 0.5, 0.7],  # truth 1 is the worst -> rank 3
            [0.3, 0.6, 0.4],  # truth 2 is second -> rank 2
        ]
    )
    ranks = t2v_ranks(sims, np.array([0, 1, 2]))
    assert ranks.tolist() == [1, 3, 2]
    m = t2v_metrics(sims, np.array([0, 1, 2]))
    assert list(m) == list(METRIC_KEYS)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == 100.0 and m["R@10"] == 100.0
    assert m["MdR"] == 2.0 and m["MnR"] == 2.0
    assert all(type(v) is float for v in m.values())


def test_all_equal_scores_give_rank_n_and_zero_recall():
    sims = np.full((4, 4), 0.25, dtype=np.float32)
    ranks = rank_of_truth(sims, np.arange(4))
    assert ranks.tolist() == [4, 4, 4, 4]
    m = metrics_from_ranks(ranks)
    assert m["R@1"] == 0.0 and m["MdR"] == 4.0 and m["MnR"] == 4.0


def test_tie_with_one_other_gives_rank_2():
    sims = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    assert rank_of_truth(sims, np.array([0, 1])).tolist() == [2, 2]


def test_float16_compared_exactly_after_upcast():
    # 1.0 and the next float16 up differ by ~1e-3; they must not be treated as a tie.
    hi = np.nextafter(np.float16(1.0), np.float16(2.0))
    sims = np.array([[1.0, hi, 0.0]], dtype=np.float16)
    assert rank_of_truth(sims, np.array([1])).tolist() == [1]
    assert rank_of_truth(sims, np.array([0])).tolist() == [2]


def test_nan_truth_gets_rank_n_and_nan_others_never_beat_truth():
    sims = np.array([[np.nan, 0.3, 0.2], [0.1, np.nan, 0.4], [np.nan, np.nan, np.nan]])
    # row 0: truth NaN -> -inf -> ties with nothing above but everything is >= -inf -> rank 3
    # row 1: other NaN counts as -inf, truth 0.1 is below 0.4 only -> rank 2
    # row 2: all NaN -> rank 3, never 1
    assert rank_of_truth(sims, np.array([0, 0, 2])).tolist() == [3, 2, 3]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        rank_of_truth(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        rank_of_truth(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0, 1]))
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([], dtype=int))


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks(np.array([1, 2, 6, 11, 30]))
    assert m == {"R@1": 20.0, "R@5": 40.0, "R@10": 60.0, "MdR": 6.0, "MnR": 10.0}


def test_median_rank_of_an_even_count_is_the_mean_of_the_middle_two():
    assert metrics_from_ranks(np.array([10, 1, 3, 2]))["MdR"] == 2.5  # sorted 1, 2, 3, 10: (2 + 3) / 2
    ranks = np.random.default_rng(0).integers(1, 1000, size=200)
    assert metrics_from_ranks(ranks)["MdR"] == statistics.median(ranks.tolist())


# ------------------------------------------------------------------------------ video-to-text


def _v2t_brute(sims: np.ndarray, t2v: np.ndarray, n_videos: int) -> list[int]:
    """Independent loop: video score = best caption score, NaN as -inf, rank = #videos >= truth."""
    s = np.where(np.isnan(sims), -np.inf, sims.astype(np.float64))
    out = []
    for v in range(n_videos):
        if not np.any(t2v == v):
            continue
        scores = []
        for u in range(n_videos):
            caps = [c for c in range(len(t2v)) if t2v[c] == u]
            scores.append(max((s[c, v] for c in caps), default=-np.inf))
        out.append(sum(1 for x in scores if x >= scores[v]))
    return out


def test_v2t_five_captions_three_videos_by_hand():
    t2v = np.array([0, 0, 1, 2, 2])
    sims = np.array(
        # video: 0    1    2
        [
            [0.9, 0.2, 0.1],  # caption 0 of video 0
            [0.1, 0.8, 0.3],  # caption 1 of video 0
            [0.5, 0.7, 0.6],  # caption 2 of video 1
            [0.2, 0.1, 0.4],  # caption 3 of video 2
            [0.3, 0.9, 0.5],  # caption 4 of video 2
        ]
    )
    # query video 0: v0 max(0.9,0.1)=0.9, v1 0.5, v2 max(0.2,0.3)=0.3 -> rank 1
    # query video 1: v0 max(0.2,0.8)=0.8, v1 0.7, v2 max(0.1,0.9)=0.9 -> rank 3
    # query video 2: v0 max(0.1,0.3)=0.3, v1 0.6, v2 max(0.4,0.5)=0.5 -> rank 2
    assert v2t_ranks(sims, t2v, 3).tolist() == [1, 3, 2]
    assert v2t_ranks(sims, t2v, 3).tolist() == _v2t_brute(sims, t2v, 3)
    m = v2t_metrics(sims, t2v, 3)
    assert m["R@1"] == pytest.approx(100 / 3) and m["MdR"] == 2.0 and m["MnR"] == 2.0


def test_v2t_matches_brute_force_with_ties_nan_and_uncaptioned_videos():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n_videos = int(rng.integers(1, 8))
        n_texts = int(rng.integers(1, 15))
        t2v = rng.integers(0, n_videos, size=n_texts)
        sims = rng.integers(0, 3, size=(n_texts, n_videos)).astype(np.float32)  # many ties
        if trial % 3 == 0:
            sims[rng.random(sims.shape) < 0.2] = np.nan
        assert v2t_ranks(sims, t2v, n_videos).tolist() == _v2t_brute(sims, t2v, n_videos)


def test_v2t_blocks_agree_with_one_block(monkeypatch):
    import reranker.metrics as metrics

    rng = np.random.default_rng(1)
    t2v = rng.integers(0, 40, size=120)
    sims = rng.standard_normal((120, 40))
    whole = v2t_ranks(sims, t2v, 40)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 150)  # ~1 query video per block
    assert v2t_ranks(sims, t2v, 40).tolist() == whole.tolist()
    assert t2v_ranks(sims, t2v).tolist() == metrics.rank_of_truth(sims, t2v).tolist()


def test_v2t_collapsed_scores_rank_n():
    t2v = np.array([0, 1, 1, 2])
    assert v2t_ranks(np.zeros((4, 3)), t2v, 3).tolist() == [3, 3, 3]


def test_v2t_shape_mismatch_raises():
    with pytest.raises(ValueError):
        v2t_metrics(np.zeros((3, 2)), np.array([0, 1, 1]), 3)


# ---------------------------------------------------------------------------------- two stage


def test_topk_descending_ties_to_lower_index():
    first = np.array([[0.1, 0.5, 0.5, 0.9, 0.5], [np.nan, 1.0, 0.0, 1.0, -1.0]])
    assert topk_candidates(first, 3).tolist() == [[3, 1, 2], [1, 3, 2]]
    assert topk_candidates(first, 5).tolist() == [[3, 1, 2, 4, 0], [1, 3, 2, 4, 0]]


def test_a_tie_at_the_cut_never_lets_the_truth_in():
    first = np.array([[0.5, 0.5, 0.5, 0.9], [0.2, 0.7, 0.7, 0.1]])
    mask = np.array([[True, False, False, False], [False, True, False, False]])
    truth = lambda rows: mask[rows]  # noqa: E731 - the queries' right items
    # row 0: the truth 0 ties with 1 and 2 for the second place; row 1: the truth 1 ties with 2 for the first
    assert topk_candidates(first, 2, loses_ties=truth).tolist() == [[3, 1], [1, 2]]  # both tied ones fit in row 1
    assert topk_candidates(first, 1, loses_ties=truth).tolist() == [[3], [2]]
    assert topk_candidates(first, 2).tolist() == [[3, 0], [1, 2]]  # without it: ties to the lower index
    # collapsed scores in both stages: the truth stays out of the re-scored set, so R@1 is 0, not 1 in N
    flat = np.zeros((4, 4))
    cand = topk_candidates(flat, 1, loses_ties=lambda rows: np.eye(4, dtype=bool)[rows])
    assert not (cand[:, 0] == np.arange(4)).any()
    assert metrics_from_ranks(rank_of_truth(two_stage_scores(flat, cand, np.zeros((4, 1))), np.arange(4)))["R@1"] == 0


def test_the_truth_loses_ties_in_every_block(monkeypatch):
    import reranker.metrics as metrics

    rng = np.random.default_rng(5)
    first = rng.integers(0, 3, size=(40, 9)).astype(np.float64)  # heavy ties
    truth = rng.integers(0, 9, size=40)
    mask = truth[:, None] == np.arange(9)[None, :]
    asked = []

    def loses(rows):
        asked.append(rows.copy())
        return mask[rows]

    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 30)  # 3 rows a block
    cand = topk_candidates(first, 4, loses_ties=loses)
    reference = [sorted(range(9), key=lambda i: (-first[q, i], mask[q, i], i))[:4] for q in range(40)]
    assert [sorted(c) for c in cand.tolist()] == [sorted(r) for r in reference]  # the same candidates, each row
    assert len(np.concatenate(asked)) < 40  # asked only about rows with a tie at the cut


def test_k_larger_than_n_raises_naming_both():
    with pytest.raises(ValueError, match=r"5.*k=6"):
        topk_candidates(np.zeros((2, 5)), 6)
    with pytest.raises(ValueError, match=r"2.*k=3"):
        two_stage_scores(np.zeros((1, 2)), np.array([[0, 1, 1]]), np.zeros((1, 3)))
    with pytest.raises(ValueError):
        topk_candidates(np.zeros((2, 5)), 0)


def test_two_stage_rejects_duplicate_candidates():
    with pytest.raises(ValueError, match="distinct"):
        two_stage_scores(np.zeros((1, 4)), np.array([[2, 2]]), np.zeros((1, 2)))


def test_two_stage_by_hand():
    first = np.array([[0.9, 0.8, 0.1, 0.7, 0.1]])
    cand = topk_candidates(first, 2)  # [[0, 1]]
    scores = two_stage_scores(first, cand, np.array([[0.2, 0.6]]))
    order = np.argsort(-scores[0], kind="stable").tolist()
    assert order == [1, 0, 3, 2, 4]  # reranked pair, then first-stage order
    assert scores[0, 2] == scores[0, 4]  # first-stage tie kept as a tie
    # truth 0 was first-stage rank 1, reranker demoted it to rank 2
    assert rank_of_truth(scores, np.array([0])).tolist() == [2]
    assert rank_of_truth(scores, np.array([4])).tolist() == [5]


def _order(x: np.ndarray) -> np.ndarray:
    """Pairwise comparison matrix: +1 above, 0 tie, -1 below (safe with infinities)."""
    return (x[:, None] > x[None, :]).astype(int) - (x[:, None] < x[None, :]).astype(int)


def _check_two_stage(first: np.ndarray, k: int, rerank: np.ndarray) -> None:
    cand = topk_candidates(first, k)
    scores = two_stage_scores(first, cand, rerank)
    assert scores.dtype == np.float64 and scores.shape == first.shape
    f = np.where(np.isnan(first), -np.inf, first.astype(np.float64))
    r = np.where(np.isnan(rerank), -np.inf, rerank.astype(np.float64))
    for q in range(first.shape[0]):
        is_cand = np.zeros(first.shape[1], bool)
        is_cand[cand[q]] = True
        c_scores, n_scores = scores[q, is_cand], scores[q, ~is_cand]
        # never a non-candidate above (or tied with) a candidate
        if n_scores.size:
            assert n_scores.max() < c_scores.min()
        # candidates: same pairwise order (incl. ties) as the rerank score
        cs = scores[q, cand[q]]
        assert np.array_equal(_order(cs), _order(r[q]))
        # non-candidates: same pairwise order (incl. ties) as the first stage
        assert np.array_equal(_order(n_scores), _order(f[q, ~is_cand]))
    # top_k candidates are exactly the first-stage top_k, in order, with a tie-free reference
    n = first.shape[1]
    ref = np.array([sorted(range(n), key=lambda i: (-f[q, i], i))[:k] for q in range(first.shape[0])])
    assert np.array_equal(cand, ref)


def test_two_stage_property_random_with_ties():
    rng = np.random.default_rng(2)
    for trial in range(60):
        q, n = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        k = int(rng.choice([1, n, int(rng.integers(1, n + 1))]))
        if trial % 2:
            first = rng.integers(0, 3, size=(q, n)).astype(np.float32)  # heavy ties
            rerank = rng.integers(0, 2, size=(q, k)).astype(np.float16)
        else:
            first = rng.standard_normal((q, n))
            rerank = rng.standard_normal((q, k))
        if trial % 5 == 0:
            first[rng.random(first.shape) < 0.2] = np.nan
            rerank[rng.random(rerank.shape) < 0.2] = np.nan
        _check_two_stage(first, k, rerank)


def test_two_stage_k_equals_n_is_pure_rerank_and_k_1_keeps_first_stage():
    rng = np.random.default_rng(3)
    first = rng.standard_normal((6, 6))
    t = np.arange(6)
    # k = N: every item is reranked; ranks equal ranking the rerank scores directly.
    cand = topk_candidates(first, 6)
    rerank = rng.standard_normal((6, 6))
    direct = np.empty_like(first)
    np.put_along_axis(direct, cand, rerank, axis=1)
    two = two_stage_scores(first, cand, rerank)
    assert rank_of_truth(two, t).tolist() == rank_of_truth(direct, t).tolist()
    # k = 1: a single candidate stays on top; the full order is the first stage's.
    cand1 = topk_candidates(first, 1)
    s1 = two_stage_scores(first, cand1, rng.standard_normal((6, 1)))
    assert rank_of_truth(s1, t).tolist() == rank_of_truth(first, t).tolist()


def test_two_stage_blocks_agree_with_one_block(monkeypatch):
    import reranker.metrics as metrics

    rng = np.random.default_rng(4)
    first = rng.integers(0, 4, size=(9, 7)).astype(np.float64)
    cand = topk_candidates(first, 3)
    rerank = rng.standard_normal((9, 3))
    whole = two_stage_scores(first, cand, rerank)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 10)
    assert np.array_equal(topk_candidates(first, 3), cand)
    assert np.array_equal(two_stage_scores(first, cand, rerank), whole)


def test_v2t_two_stage_on_transpose():
    # Video queries: candidates are top-K captions per video, built on first.T, scored by v2t.
    rng = np.random.default_rng(5)
    t2v = np.array([0, 0, 1, 2, 2, 2, 3])
    n_videos, n_texts = 4, len(t2v)
    first = rng.standard_normal((n_texts, n_videos))
    cand = topk_candidates(first.T, n_texts)  # [videos, texts], every caption is a candidate
    rerank_full = rng.standard_normal((n_texts, n_videos))
    rerank = np.take_along_axis(rerank_full.T, cand, axis=1)
    two = two_stage_scores(first.T, cand, rerank).T  # [texts, videos]
    # with K = all captions, v2t on the two-stage codes equals v2t on the rerank scores
    assert v2t_ranks(two, t2v, n_videos).tolist() == v2t_ranks(rerank_full, t2v, n_videos).tolist()
    # with K = 2, a video whose best caption is outside the top 2 can never beat one inside
    cand2 = topk_candidates(first.T, 2)
    two2 = two_stage_scores(first.T, cand2, np.take_along_axis(rerank_full.T, cand2, axis=1)).T
    assert v2t_ranks(two2, t2v, n_videos).tolist() == _v2t_brute(two2, t2v, n_videos)


# ---------------------------------------------------------------------------------- reporting


def test_recall_curve_png_written_atomically(tmp_path):
    path = tmp_path / "plots" / "recall.png"
    curves = {"first stage": np.array([1, 3, 60, 7]), "reranked": np.array([1, 1, 2, 40])}
    recall_curve_png(curves, path, "MSR-VTT t2v")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["recall.png"]  # no temp file left behind


def test_format_table():
    m = {"R@1": 43.21, "R@5": 70.0, "R@10": 80.06, "MdR": 2.0, "MnR": 12.345}
    text = format_table({"first stage": {"t2v": m, "v2t": m}, "reranked": {"t2v": m}})
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "direction", "R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[2].split() == ["first", "stage", "t2v", "43.2", "70.0", "80.1", "2.0", "12.3"]
    assert lines[4].split() == ["reranked", "t2v", "43.2", "70.0", "80.1", "2.0", "12.3"]
    assert len(lines) == 5
