"""Text-video retrieval metrics (R@K, MdR, MnR) with strict ties, and two-stage score assembly.

Conventions, shared by every function here:

- A similarity matrix is ``sims[texts, videos]``; ``text_to_video[t]`` is the video of caption t.
- Ranks are 1-based. The rank of the right item is the number of items scoring >= it, itself
  included, so ties never help: if all scores collapse to one value every query gets rank N
  and R@1 is 0. (Taking the first index of a sorted order, as much reference code does, would
  instead reward a collapsed model with whatever the sort happens to put first.)
- Scores are compared in float64, exactly, with no epsilon.
- NaN is read as -inf everywhere (in ``rank_of_truth``, in the caption max of ``v2t_ranks``,
  and in ``topk_candidates`` / ``two_stage_scores``). A NaN (or -inf) truth score therefore gets
  rank N, the worst possible, never rank 1.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.files import write_bytes_atomic

log = logging.getLogger(__name__)

__all__ = [
    "rank_of_truth",
    "metrics_from_ranks",
    "t2v_ranks",
    "t2v_metrics",
    "v2t_ranks",
    "v2t_metrics",
    "topk_candidates",
    "two_stage_scores",
    "recall_curve_png",
    "format_table",
    "METRIC_KEYS",
]

METRIC_KEYS = ("R@1", "R@5", "R@10", "MdR", "MnR")

# Elements per working block: bounds temporaries to tens of MB on 10k x 10k matrices.
_BLOCK_ELEMS = 1 << 22


def _as_f64(scores: np.ndarray) -> np.ndarray:
    """Float64 copy of scores with NaN replaced by -inf."""
    out = np.array(scores, dtype=np.float64, copy=True)
    np.nan_to_num(out, copy=False, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    return out


def _check_matrix(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _check_index(name: str, idx: np.ndarray, length: int, upper: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name} must be integer, got dtype {idx.dtype}")
    if length and (idx.min() < 0 or idx.max() >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(1, n_cols))


# --------------------------------------------------------------------------------------- ranks


def rank_of_truth(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of truth[q] in row q: how many items score >= it (ties count against it)."""
    scores = _check_matrix("scores", scores)
    n_queries, n_items = scores.shape
    truth = _check_index("truth", truth, n_queries, n_items)
    ranks = np.empty(n_queries, dtype=np.int64)
    step = _rows_per_block(n_items)
    for lo in range(0, n_queries, step):
        block = _as_f64(scores[lo : lo + step])  # [B, N]
        t = truth[lo : lo + step]
        own = block[np.arange(len(t)), t]  # [B]
        # A -inf (or NaN) truth ties with everything, so it lands at rank N.
        ranks[lo : lo + step] = np.count_nonzero(block >= own[:, None], axis=1)
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent (unrounded), median rank and mean rank from 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if ranks.min() < 1:
        raise ValueError(f"ranks are 1-based, got minimum {ranks.min()}")
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in (1, 5, 10)}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def t2v_ranks(sims: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """Text-to-video rank of each caption's video; one query per caption."""
    return rank_of_truth(sims, text_to_video)


def t2v_metrics(sims: np.ndarray, text_to_video: np.ndarray) -> dict[str, float]:
    """Text-to-video metrics on sims [texts, videos]; one query per caption."""
    return metrics_from_ranks(t2v_ranks(sims, text_to_video))


def v2t_ranks(sims: np.ndarray, text_to_video: np.ndarray, n_videos: int) -> np.ndarray:
    """Video-to-text ranks, one per captioned video (in video order), scoring a video by its best caption.

    For query video v the candidate video u scores max over captions c of u of sims[c, v]
    (the multi-caption protocol of CLIP4Clip on MSVD); the rank is that of u = v among all
    n_videos. A video with no captions cannot be a query (it has nothing to retrieve) and is
    skipped; as a candidate it scores -inf. NaN caption scores count as -inf before the max.

    Only comparisons within one column of sims are made, so a matrix whose columns are each
    on their own scale (two-stage scores built per query video, see ``two_stage_scores``) is
    fine here, while ``t2v_metrics`` on such a matrix would not be.
    """
    sims = _check_matrix("sims", sims)
    n_texts, n_cols = sims.shape
    if n_cols != n_videos:
        raise ValueError(f"sims has {n_cols} video columns but n_videos is {n_videos}")
    t2v = _check_index("text_to_video", text_to_video, n_texts, n_videos)

    order = np.argsort(t2v, kind="stable")  # captions grouped by video
    sorted_vid = t2v[order]
    starts = np.flatnonzero(np.r_[True, sorted_vid[1:] != sorted_vid[:-1]])
    captioned = sorted_vid[starts]  # videos with >= 1 caption, ascending
    n_skipped = n_videos - len(captioned)
    if n_skipped:
        log.info("v2t: %d of %d videos have no captions; skipped as queries", n_skipped, n_videos)

    ranks = np.empty(len(captioned), dtype=np.int64)
    step = _rows_per_block(n_texts)
    done = 0
    for lo in range(0, len(captioned), step):
        queries = captioned[lo : lo + step]  # [B] video ids
        cols = _as_f64(sims[:, queries])[order]  # [texts, B], captions grouped by video
        best = np.full((n_videos, len(queries)), -np.inf)  # [videos, B]
        best[captioned] = np.maximum.reduceat(cols, starts, axis=0)
        ranks[done : done + len(queries)] = rank_of_truth(best.T, queries)
        done += len(queries)
    return ranks


def v2t_metrics(sims: np.ndarray, text_to_video: np.ndarray, n_videos: int) -> dict[str, float]:
    """Video-to-text metrics on sims [texts, videos] with several captions per video (see v2t_ranks)."""
    return metrics_from_ranks(v2t_ranks(sims, text_to_video, n_videos))


# ----------------------------------------------------------------------------------- two stage


def topk_candidates(first: np.ndarray, k: int,
                    loses_ties: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Indices [Q, k] of each row's top_k first-stage scores, descending, ties to the lower index.

    loses_ties(rows) -> bool [len(rows), N] (evaluation: those queries' right items) puts those items after every
    other item of their score, so a tie at the cut never lets the truth in: ties never help, as in rank_of_truth.
    It is asked only about the rows with a tie at the cut (a [Q, N] mask would be the size of the scores).
    """
    first = _check_matrix("first", first)
    n_queries, n_items = first.shape
    if not 1 <= k <= n_items:
        raise ValueError(f"top_k must be in [1, {n_items}] (N items), got k={k}")
    out = np.empty((n_queries, k), dtype=np.int64)
    step = _rows_per_block(n_items)
    for lo in range(0, n_queries, step):
        neg = -_as_f64(first[lo : lo + step])  # [B, N], ascending = best first
        # Partial selection is ~3x cheaper than a full sort; it is exact unless the k-th
        # score is tied with items outside the selection, where those rows get a full sort.
        pick = np.argpartition(neg, k - 1, axis=1)[:, :k]  # [B, k], unordered
        vals = np.take_along_axis(neg, pick, axis=1)
        order = np.lexsort((pick, vals), axis=1)  # by score, then lower index
        top = np.take_along_axis(pick, order, axis=1)
        ambiguous = np.flatnonzero(np.count_nonzero(neg <= vals.max(axis=1, keepdims=True), axis=1) > k)
        if ambiguous.size:
            index = np.broadcast_to(np.arange(n_items), (len(ambiguous), n_items))
            last = np.zeros(index.shape, bool) if loses_ties is None else loses_ties(lo + ambiguous)
            top[ambiguous] = np.lexsort((index, last, neg[ambiguous]), axis=1)[:, :k]  # score, then the truth last
        out[lo : lo + step] = top
    return out


def _dense_rank_ascending(x: np.ndarray) -> np.ndarray:
    """Per row, 1 for the smallest value, +1 per next distinct value; equal values share a rank."""
    order = np.argsort(x, axis=1)  # equal values get equal ranks, so stability is not needed
    xs = np.take_along_axis(x, order, axis=1)
    new_value = np.ones_like(xs, dtype=np.int64)
    new_value[:, 1:] = xs[:, 1:] != xs[:, :-1]
    dense = np.empty_like(new_value)
    np.put_along_axis(dense, order, np.cumsum(new_value, axis=1), axis=1)
    return dense


def two_stage_scores(first: np.ndarray, candidates: np.ndarray, rerank: np.ndarray) -> np.ndarray:
    """Scores [Q, N] ranking candidates by rerank score above all non-candidates in first-stage order.

    The values are exact ordinal codes, not similarities: candidates get their dense rank by
    rerank score (1..k, higher is better), non-candidates get their dense rank by first-stage
    score minus (N + 1) (so in [-N, -1]). Small integers are exact in float64, so no distinct
    scores merge and ties stay ties in both stages. Codes are comparable within a row only:
    rank with rows as queries (``t2v_metrics`` for text queries; for video queries build on
    ``first.T`` and pass the transpose of the result to ``v2t_metrics``).
    """
    first = _check_matrix("first", first)
    n_queries, n_items = first.shape
    candidates = np.asarray(candidates)
    rerank = np.asarray(rerank)
    if candidates.ndim != 2 or candidates.shape[0] != n_queries:
        raise ValueError(f"candidates must be [{n_queries}, k], got shape {candidates.shape}")
    k = candidates.shape[1]
    if not 1 <= k <= n_items:
        raise ValueError(f"top_k must be in [1, {n_items}] (N items), got k={k}")
    if rerank.shape != candidates.shape:
        raise ValueError(f"rerank shape {rerank.shape} must equal candidates shape {candidates.shape}")
    if not np.issubdtype(candidates.dtype, np.integer):
        raise TypeError(f"candidates must be integer, got dtype {candidates.dtype}")
    if candidates.min() < 0 or candidates.max() >= n_items:
        lo_hi = f"[{candidates.min()}, {candidates.max()}]"
        raise ValueError(f"candidates must lie in [0, {n_items}), got {lo_hi}")
    srt = np.sort(candidates, axis=1)
    if np.any(srt[:, 1:] == srt[:, :-1]):
        raise ValueError("candidates must be distinct within each row")

    out = np.empty((n_queries, n_items), dtype=np.float64)
    rows = np.arange(n_queries)[:, None]
    step = _rows_per_block(n_items)
    for lo in range(0, n_queries, step):
        hi = min(lo + step, n_queries)
        block = _as_f64(first[lo:hi])  # [B, N]
        cand = candidates[lo:hi]  # [B, k]
        # +inf on candidates puts them at the top ranks without reordering the others.
        block[rows[: hi - lo], cand] = np.inf
        codes = (_dense_rank_ascending(block) - (n_items + 1)).astype(np.float64)
        codes[rows[: hi - lo], cand] = _dense_rank_ascending(_as_f64(rerank[lo:hi]))
        out[lo:hi] = codes
    return out


# ------------------------------------------------------------------------------------ reporting


def recall_curve_png(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Plot R@K for K = 1..50 per named array of ranks and write it atomically as a PNG."""
    # Imported here so the metrics stay importable (and fast to import) without matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    ks = np.arange(1, 51)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    for name, ranks in curves.items():
        ranks = np.asarray(ranks)
        if ranks.ndim != 1 or ranks.size == 0:
            raise ValueError(f"curve {name!r}: ranks must be a non-empty 1-D array, got {ranks.shape}")
        recall = 100.0 * (ranks[None, :] <= ks[:, None]).mean(axis=1)
        ax.plot(ks, recall, label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("R@K (%)")
    ax.set_xlim(1, 50)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="lower right")

    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_bytes_atomic(path, png.getvalue())


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Terminal table of {stage: {direction: metrics}}, every metric rounded to 1 decimal."""
    header = ["stage", "direction", *METRIC_KEYS]
    rows = [
        [stage, direction, *(f"{float(metrics[key]):.1f}" for key in METRIC_KEYS)]
        for stage, by_direction in results.items()
        for direction, metrics in by_direction.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        text = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(text).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
