"""Reading one split of the feature cache for training and evaluation: batched reads, bounded memory."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import DONE, PENDING, FeatureCache
from pipeline.errors import UserError

VIDEO_ARRAYS = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask")
TEXT_ARRAYS = ("text_tokens", "text_lengths", "text_embeds")


def _read(arr, index: np.ndarray) -> np.ndarray:
    """Rows `index` of a zarr array, read in sorted order (one chunk each) and returned in the asked order."""
    if len(index) == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    order = np.argsort(index, kind="stable")
    unique, inverse = np.unique(index[order], return_inverse=True)
    try:
        rows = arr.get_orthogonal_selection((unique,))
    except Exception as e:  # noqa: BLE001 - a damaged chunk fails in the codec (blosc, zstd) or in reshaping
        raise _damaged(arr, unique, e) from None
    out = np.empty((len(index), *arr.shape[1:]), dtype=arr.dtype)
    out[order] = rows[inverse]
    return out


def _damaged(arr, rows: np.ndarray, error: Exception) -> UserError:
    """A one-line error naming the cache, the array and the videos whose chunks cannot be read."""
    import zarr

    bad = []
    for r in rows.tolist():
        try:
            arr[r]
        except Exception:  # noqa: BLE001
            bad.append(r)
    root = getattr(arr.store, "root", arr.store)
    try:
        group = zarr.open_group(arr.store, mode="r")
        video_rows = group["text_video"][:][bad] if arr.basename.startswith("text_") else bad
        names = [str(group["video_ids"][int(v)]) for v in sorted(set(np.asarray(video_rows).tolist()))]
    except Exception:  # noqa: BLE001 - naming the rows is the best we can do
        names = [f"row {r}" for r in bad]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
    return UserError(
        f"{root}: {arr.basename} of {shown or 'some videos'} cannot be read ({reason}); "
        f"run `python cli.py info --verify --cache {root}` to list the damage and re-run extract with --repair"
    )


@dataclass
class SplitFeatures:
    """The videos (done) and captions of one split, addressed by position within the split."""

    cache: FeatureCache
    split: str
    videos: np.ndarray  # cache indices of the split's videos
    texts: np.ndarray  # cache indices of their captions
    text_video: np.ndarray  # for each caption of the split, the position of its video in `videos`

    @classmethod
    def open(cls, cache: FeatureCache, split: str | None, allow_partial: bool = False) -> "SplitFeatures":
        """The split's features (split None: every video); refuses a missing split, arrays or unfinished extraction."""
        missing = [a for a in VIDEO_ARRAYS + TEXT_ARRAYS if a not in cache.group]
        if missing:
            raise UserError(f"{cache.path}: cache lacks {', '.join(missing)} needed here; re-extract it with this version")
        splits = cache.video_split()
        in_split = np.flatnonzero(splits == split) if split else np.arange(len(splits))
        if len(in_split) == 0:
            have = ", ".join(sorted(set(splits.tolist()))) or "none"
            raise UserError(f"{cache.path}: split '{split}' has no videos (splits here: {have}); pick another --split")
        status = cache.video_status()[in_split]
        text_video_all = cache.text_video()
        chunks_done = cache.text_chunk_status() == DONE
        pending = int((status == PENDING).sum())
        texts_pending = not chunks_done.all()
        if (pending or texts_pending) and not allow_partial:
            raise UserError(
                f"{cache.path}: extraction unfinished ({pending} videos of split '{split}' pending"
                f"{', captions pending' if texts_pending else ''}); finish `extract` or pass --allow-partial"
            )
        videos = in_split[status == DONE]
        position = np.full(cache.n_videos, -1, dtype=np.int64)
        position[videos] = np.arange(len(videos))
        text_done = np.repeat(chunks_done, cache.text_chunk)[: cache.n_texts]
        texts = np.flatnonzero((position[text_video_all] >= 0) & text_done)
        if len(videos) == 0 or len(texts) == 0:
            raise UserError(f"{cache.path}: split '{split}' has no extracted videos with captions; run `extract` first")
        return cls(cache, split, videos, texts, position[text_video_all[texts]])

    @functools.cached_property
    def captions_of(self) -> list[list[int]]:
        """For each video position of the split, its caption positions (computed once)."""
        captions_of: list[list[int]] = [[] for _ in range(self.n_videos)]
        for t, v in enumerate(self.text_video):
            captions_of[v].append(t)
        return captions_of

    @property
    def n_videos(self) -> int:
        return len(self.videos)

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    def read_videos(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Video features of split positions: patch/cls tokens, frame embeddings (float32) and frame masks."""
        idx = self.videos[np.asarray(positions)]
        out = {name: torch.from_numpy(_read(self.cache[name], idx)) for name in VIDEO_ARRAYS}
        return {k: v if v.dtype == torch.bool else v.float() for k, v in out.items()}

    def read_texts(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Caption features of split positions: text tokens, lengths and embeddings."""
        idx = self.texts[np.asarray(positions)]
        out = {name: torch.from_numpy(_read(self.cache[name], idx)) for name in TEXT_ARRAYS}
        out["text_lengths"] = out["text_lengths"].long()
        out["text_tokens"], out["text_embeds"] = out["text_tokens"].float(), out["text_embeds"].float()
        return out

    def read_frame_embeds(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the first stage's inputs (frame embeddings and masks) of split positions."""
        idx = self.videos[np.asarray(positions)]
        return (torch.from_numpy(_read(self.cache["frame_embeds"], idx)).float(),
                torch.from_numpy(_read(self.cache["frame_mask"], idx)))

    def all_text_embeds(self, block: int = 4096) -> torch.Tensor:
        """Caption embeddings of the whole split [N_texts, E] (small: the first stage needs them all)."""
        parts = [torch.from_numpy(_read(self.cache["text_embeds"], self.texts[lo: lo + block])).float()
                 for lo in range(0, self.n_texts, block)]
        return torch.cat(parts)
