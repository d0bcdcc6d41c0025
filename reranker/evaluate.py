"""Evaluation: first-stage retrieval over a whole split, top-K candidates re-scored by the reranker, metrics."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import FeatureCache
from pipeline.encoder import autocast, default_device
from pipeline.errors import UserError
from pipeline.files import check_output_path, write_text_atomic, written_atomically
from reranker import metrics as M
from reranker.data import RERANKER_TEXT_ARRAYS, SplitFeatures, to_device
from reranker.model import CrossTVR, EncodedFrames
from reranker.train import TrainConfig, check_compatible, load_model, model_config_for, video_bank

log = logging.getLogger(__name__)


@torch.no_grad()
def first_stage_sims(model: CrossTVR, feats: SplitFeatures, device: torch.device) -> np.ndarray:
    """Cosine similarity of every caption with every video of the split: float32 [texts, videos]."""
    videos = video_bank(model, feats, device)  # [V, E], float32 like the captions
    texts = model.first_stage.encode_text(feats.all_text_embeds().to(device).float()).cpu()  # [N, E]
    return (texts @ videos.T).numpy().astype(np.float32)


@torch.no_grad()
def _rerank_pairs(model: CrossTVR, feats: SplitFeatures, text_pos: np.ndarray, video_pos: np.ndarray,
                  device: torch.device, videos_per_block: int = 256, pairs_per_batch: int = 512,
                  progress: str | None = None) -> np.ndarray:
    """Reranker logits of (caption, video) pairs [P], float32; a progress bar of the pairs named `progress`, if given.

    Videos go in blocks: a block's videos are read and encoded (encode_frames) once, then every pair whose
    video is in the block is scored, pairs_per_batch at a time, its captions read and encoded per batch
    (a caption is a fraction of a video's bytes). Batched by pairs alone, a video was read and encoded again
    for every batch that met it: 12 times each on a 194-video split, 60% of the t2v time.
    """
    r = model.reranker
    logits = np.empty(len(text_pos), dtype=np.float32)
    videos = np.unique(video_pos)
    with tqdm(total=len(text_pos), desc=progress, unit="pair", disable=progress is None, mininterval=1) as bar:
        for lo in range(0, len(videos), videos_per_block):
            block = videos[lo: lo + videos_per_block]
            frames, frame_mask = _encode_videos(model, feats, block, device)
            pairs = np.flatnonzero(np.isin(video_pos, block))
            rows = torch.from_numpy(np.searchsorted(block, video_pos[pairs])).to(device)  # each pair's video in block
            for b in range(0, len(pairs), pairs_per_batch):
                batch = pairs[b: b + pairs_per_batch]
                texts, t_inv = np.unique(text_pos[batch], return_inverse=True)
                t = to_device(feats.read_texts(texts, RERANKER_TEXT_ARRAYS), device)
                ti, vi = torch.from_numpy(t_inv).to(device), rows[b: b + pairs_per_batch]
                with autocast(device):
                    queries, qmask = r.encode_queries(t["text_tokens"], t["text_lengths"])
                    logits[batch] = r.match(queries[ti], qmask[ti], frames[vi], frame_mask[vi]).float().cpu().numpy()
                bar.update(len(batch))
    return logits


def _encode_videos(model: CrossTVR, feats: SplitFeatures, videos: np.ndarray, device: torch.device,
                   chunk: int = 32) -> tuple[EncodedFrames, torch.Tensor]:
    """Encoded frames and frame masks of split positions, read and encoded `chunk` videos at a time."""
    parts, masks = [], []
    for lo in range(0, len(videos), chunk):
        v = to_device(feats.read_videos(videos[lo: lo + chunk], model.reranker.video_inputs), device)
        with autocast(device):
            parts.append(model.reranker.encode_frames(v.get("patch_tokens"), v.get("cls_tokens")))
        masks.append(v["frame_mask"])
    return EncodedFrames.cat(parts), torch.cat(masks)


def rerank(model: CrossTVR, feats: SplitFeatures, first: np.ndarray, top_k: int, device: torch.device,
           videos_are_queries: bool = False, score_weight: float | None = None, progress: bool = False
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-K candidates of every query, their final scores (reranker logit + first-stage cosine / score_weight, the
    model's own by default) and the reranker logits alone, each [queries, K]; `progress` shows a bar of the pairs."""
    scores = first.T if videos_are_queries else first  # [queries, items]
    owner = feats.text_video  # each caption's video

    def truth(rows: np.ndarray) -> np.ndarray:  # [rows, items]: the right items of these queries
        if videos_are_queries:
            return owner[None, :] == rows[:, None]
        return owner[rows][:, None] == np.arange(feats.n_videos)[None, :]

    candidates = M.topk_candidates(scores, top_k, loses_ties=truth)
    query, item = np.repeat(np.arange(len(candidates)), top_k), candidates.reshape(-1)
    text_pos, video_pos = (item, query) if videos_are_queries else (query, item)
    bar = ("rerank v2t" if videos_are_queries else "rerank t2v") if progress else None
    logits = torch.from_numpy(_rerank_pairs(model, feats, text_pos, video_pos, device, progress=bar).astype(np.float64))
    final = model.final_score(torch.from_numpy(scores[query, item].astype(np.float64)), logits, score_weight)
    return candidates, final.numpy().reshape(candidates.shape), logits.numpy().reshape(candidates.shape)


@dataclass
class Evaluation:
    """Metrics of one split and the score matrices behind them."""

    results: dict
    first: np.ndarray  # [texts, videos]
    two_stage_t2v: np.ndarray | None
    two_stage_v2t: np.ndarray | None
    seconds: dict


def evaluate_split(model: CrossTVR, feats: SplitFeatures, top_k: int, device: torch.device | None = None,
                   zero_shot: bool = False, v2t: bool = True) -> dict:
    """The metrics JSON of one split (see run_evaluate); v2t=False leaves out the two-stage video-to-text
    re-ranking (training's validation reads only text-to-video R@1). top_k must not exceed the split's videos."""
    if not zero_shot and not 1 <= top_k <= feats.n_videos:
        raise UserError(f"--top-k {top_k}: split '{feats.split}' has only {feats.n_videos} candidate videos")
    return _evaluate(model, feats, top_k, device or default_device(), zero_shot, v2t).results


def _evaluate(model: CrossTVR, feats: SplitFeatures, top_k: int, device: torch.device, zero_shot: bool,
              v2t: bool = True, score_weight: float | None = None, progress: bool = False) -> Evaluation:
    """top_k: the K asked for; each direction re-scores min(K, its candidates) (videos for a caption, captions
    for a video). score_weight: the final score's, the model's own by default. progress: a bar per direction."""
    model = model.to(device).eval()
    t0 = time.time()
    first = first_stage_sims(model, feats, device)
    seconds = {"first_stage": time.time() - t0}
    truth, n_videos = feats.text_video, feats.n_videos
    results = {"split": feats.split, "n_videos": n_videos, "n_texts": feats.n_texts}
    if feats.n_failed:  # left out of the split (see SplitFeatures.open): say so where the numbers are
        results |= {"n_videos_failed": feats.n_failed, "n_texts_failed": feats.n_failed_texts}
    if zero_shot:
        results["zero_shot"] = True
    else:
        results["top_k"] = min(top_k, n_videos)
        if v2t:
            results["top_k_v2t"] = min(top_k, feats.n_texts)
        score_weight = model.config.score_weight if score_weight is None else score_weight
        results["score_weight"] = score_weight
    results["first_stage"] = {"t2v": M.t2v_metrics(first, truth), "v2t": M.v2t_metrics(first, truth, n_videos)}
    two_t2v = two_v2t = None
    if not zero_shot:
        t0 = time.time()
        cand, final, logits = rerank(model, feats, first, results["top_k"], device, score_weight=score_weight,
                                     progress=progress)
        two_t2v = M.two_stage_scores(first, cand, final)
        results["two_stage"] = {"t2v": M.t2v_metrics(two_t2v, truth)}
        if v2t:
            cand_v, final_v, _ = rerank(model, feats, first, results["top_k_v2t"], device, videos_are_queries=True,
                                        score_weight=score_weight, progress=progress)
            two_v2t = M.two_stage_scores(first.T, cand_v, final_v).T
            results["two_stage"]["v2t"] = M.v2t_metrics(two_v2t, truth, n_videos)
        seconds["two_stage"] = time.time() - t0
        # The spread of the reranker's own logits within each caption's top-K, averaged: near 0 means it has
        # collapsed. One candidate has no spread to measure.
        results["rerank_logit_spread"] = float(logits.std(axis=1).mean()) if logits.shape[1] > 1 else None
    return Evaluation(results, first, two_t2v, two_v2t, seconds)


@dataclass
class EvalConfig:
    """Options of `cli.py evaluate`."""

    cache: Path
    run: Path | None = None
    split: str = "test"
    top_k: int = 15
    out: Path | None = None
    save_sims: Path | None = None
    zero_shot: bool = False
    checkpoint: str = "best"  # of the run: 'best' (best.pt) or 'last' (last.pt)
    score_weight: float | None = None  # of the final score; the run's own when None


SIMS = ("first_stage_sims.npy", "text_to_video.npy", "two_stage_sims.npy", "two_stage_v2t_sims.npy")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with written_atomically(path, ".{}.partial.npy") as tmp:  # np.save would add .npy to another name
        np.save(tmp, array)


def _save_sims(folder: Path, ev, truth: np.ndarray) -> None:
    """The score matrices into folder. The set a previous evaluation left there goes first, so a kill midway
    leaves some of these matrices missing, never matrices of two evaluations side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SIMS:
        (folder / name).unlink(missing_ok=True)
    arrays = [ev.first.astype(np.float32), truth.astype(np.int64)]
    if ev.two_stage_t2v is not None:
        arrays += [ev.two_stage_t2v, ev.two_stage_v2t]
    for name, array in zip(SIMS, arrays):
        _atomic_save(folder / name, array)


def run_evaluate(cfg: EvalConfig, progress: bool = True) -> tuple[dict, dict]:
    """Evaluate a run (or the zero-shot first stage) on a split; write the JSON, plot and matrices. progress: a bar
    of the pairs the reranker scores, per direction."""
    cache = FeatureCache(Path(cfg.cache))
    if cfg.zero_shot:
        if cfg.score_weight is not None:
            raise UserError("--score-weight weighs the first stage against the reranker; --zero-shot has no reranker")
        model = CrossTVR(model_config_for(cache, TrainConfig()))
    else:
        if cfg.run is None:
            raise UserError("evaluate needs --run DIR (a train-reranker run) or --zero-shot")
        model, state = load_model(cfg.run, cfg.checkpoint)
        check_compatible(state["cache_signature"], cache, cfg.run)
    feats = SplitFeatures.open(cache, cfg.split)
    # Each kind of evaluation of a run has a report of its own: a zero-shot or last.pt one never replaces best.pt's,
    # nor one of another score weight than the run's.
    suffix = "_zeroshot" if cfg.zero_shot else "_last" if cfg.checkpoint == "last" else ""
    if cfg.score_weight not in (None, model.config.score_weight):
        suffix += f"_w{cfg.score_weight:g}"
    name = f"eval_{cfg.split}{suffix}.json"
    out = Path(cfg.out) if cfg.out else (Path(cfg.run) if cfg.run else Path(cfg.cache).parent) / name
    check_output_path(out, "--out", folder=False)  # before the work, not after it
    cache.check_outside(out, "--out")
    if cfg.save_sims:
        check_output_path(Path(cfg.save_sims), "--save-sims", folder=True)
        cache.check_outside(cfg.save_sims, "--save-sims")
    # As training's validation does: a split smaller than --top-k has all its videos re-scored.
    if feats.n_videos < cfg.top_k and not cfg.zero_shot:
        log.info("--top-k %d > %d videos in '%s': reranking all %d", cfg.top_k, feats.n_videos, cfg.split,
                 feats.n_videos)
    ev = _evaluate(model, feats, cfg.top_k, default_device(), cfg.zero_shot, score_weight=cfg.score_weight,
                   progress=progress)
    truth = feats.text_video
    if cfg.save_sims:
        _save_sims(Path(cfg.save_sims), ev, truth)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = {"first stage t2v": M.t2v_ranks(ev.first, truth)}
    if ev.two_stage_t2v is not None:
        curves["two-stage t2v"] = M.t2v_ranks(ev.two_stage_t2v, truth)
    plot = out.with_suffix(".png")
    M.recall_curve_png(curves, plot, f"{cache.attrs['dataset']} {cfg.split}: recall@K")
    ev.results["cache"] = str(cache.path)  # which features these metrics are of
    if not cfg.zero_shot:
        ev.results["checkpoint"] = f"{cfg.checkpoint}.pt"
    write_text_atomic(out, json.dumps(ev.results, indent=2))  # last: a report is there only when all it names is
    return ev.results, {"json": str(out), "plot": str(plot), "seconds": ev.seconds}
