"""Reading one split of the feature cache for training and evaluation: batched reads, bounded memory."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.cache import DONE, FAILED, PENDING, FeatureCache
from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)

VIDEO_ARRAYS = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask")
TEXT_ARRAYS = ("text_tokens", "text_lengths", "text_embeds")
RERANKER_TEXT_ARRAYS = ("text_tokens", "text_lengths")  # what the reranker reads of a caption


def _read(arr, index: np.ndarray) -> np.ndarray:
    """Rows `index` of a zarr array in the asked order, as stored (fp16 stays fp16).

    One basic-selection read per chunk touched, run concurrently on zarr's event loop (at most
    `async.concurrency` of zarr's config in flight), each one-row chunk decoded straight into its row of the
    result. zarr's orthogonal selection with an index array turns every chunk into an np.ix_ fancy-index
    gather, and one synchronous call per chunk pays zarr's per-call overhead serially: 0.2 to 0.3 and ~0.5 of
    a sequential read of the same bytes, against ~0.8 this way (bench/cache_io.py).
    """
    out = np.empty((len(index), *arr.shape[1:]), dtype=arr.dtype)
    if len(index) == 0:
        return out
    unique, first, inverse = np.unique(index, return_index=True, return_inverse=True)
    rows_per_chunk = arr.chunks[0]
    groups = np.split(np.arange(len(unique)), np.flatnonzero(np.diff(unique // rows_per_chunk)) + 1)
    aa, prototype = arr.async_array, default_buffer_prototype()

    async def read_chunk(group: np.ndarray) -> None:
        rows, dest = unique[group], first[group]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if len(rows) == 1:
            view = prototype.nd_buffer.from_numpy_array(out[dest[0]: dest[0] + 1])
            await aa.get_orthogonal_selection((slice(lo, hi),), out=view, prototype=prototype)
        else:  # several rows of one chunk (captions): decode the chunk once
            block = await aa.getitem(slice(lo, hi), prototype=prototype)
            out[dest] = block[rows - lo]

    errors: list[Exception] = []

    async def worker(todo) -> None:
        for group in todo:
            try:
                await read_chunk(group)
            except Exception as e:  # noqa: BLE001 - damage fails in the codec, DurableStore's Blosc check or reshaping
                errors.append(e)

    async def read_all() -> None:
        # Workers sharing one iterator bound the chunks in flight (memory stays near the result's size); an
        # asyncio.Semaphore would too, but with many waiters it costs O(waiters) per acquire: 10% of the read here
        todo = iter(groups)
        await asyncio.gather(*(worker(todo) for _ in range(min(zarr.config.get("async.concurrency"), len(groups)))))

    sync(read_all())
    if errors:
        raise _damaged(arr, unique, errors[0]) from None
    repeated = np.flatnonzero(first[inverse] != np.arange(len(index)))
    out[repeated] = out[first[inverse[repeated]]]
    return out


def _damaged(arr, rows: np.ndarray, error: Exception) -> UserError:
    """A one-line error naming the cache, the array and the videos whose chunks cannot be read."""
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
    reason = first_line(error, 120)
    return UserError(
        f"{root}: {arr.basename} of {shown or 'some videos'} cannot be read ({reason}); "
        f"run `python cli.py info --verify --cache {root}` to list the damage and re-run extract with --repair"
    )


@dataclass
class SplitFeatures:
    """The videos (done) and captions of one split, addressed by position within the split.

    Frame masks and caption lengths are held in memory (T bools a video, one int16 a caption, like the
    index arrays below): a training step would otherwise pay a chunk read per video and per caption for a
    few bytes each, and zarr's cost per chunk read, not the bytes, is most of a step's read time.
    """

    cache: FeatureCache
    split: str
    videos: np.ndarray  # cache indices of the split's videos
    texts: np.ndarray  # cache indices of their captions
    text_video: np.ndarray  # for each caption of the split, the position of its video in `videos`
    frame_masks: np.ndarray  # [videos, T] bool
    text_lengths: np.ndarray  # [texts] int16
    n_failed: int = 0  # videos of the split whose extraction failed: left out, with their captions
    n_failed_texts: int = 0  # the captions of those videos

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
        split_texts = np.flatnonzero(np.isin(text_video_all, in_split))
        texts_pending = not chunks_done[split_texts // cache.text_chunk].all()
        if (pending or texts_pending) and not allow_partial:
            raise UserError(
                f"{cache.path}: extraction unfinished ({pending} videos of split '{split}' pending"
                f"{', captions pending' if texts_pending else ''}); finish `extract` "
                "(train-reranker can start on what is done with --allow-partial)"
            )
        videos, failed = in_split[status == DONE], in_split[status == FAILED]
        n_failed_texts = int(np.isin(text_video_all, failed).sum())
        if len(failed):
            # Fewer videos make retrieval easier: metrics over the rest do not compare with a full split's.
            log.warning("%s: %d video(s) of split '%s' failed extraction and are left out with their %d caption(s) "
                        "(`python cli.py info --cache %s` lists why)", cache.path, len(failed), split, n_failed_texts,
                        cache.path)
        position = np.full(cache.n_videos, -1, dtype=np.int64)
        position[videos] = np.arange(len(videos))
        text_done = np.repeat(chunks_done, cache.text_chunk)[: cache.n_texts]
        texts = np.flatnonzero((position[text_video_all] >= 0) & text_done)
        if len(videos) == 0 or len(texts) == 0:
            what = f"split '{split}'" if split else "the cache"  # split None (search): every video
            if len(failed) == len(in_split):  # extract has run: running it again as it is would fail them again
                raise UserError(f"{cache.path}: {what} has no extracted videos with captions: all {len(failed)} of "
                                f"its videos failed extraction (`python cli.py info --cache {cache.path}` lists why); "
                                "fix or replace those files, then run your extract command again")
            raise UserError(f"{cache.path}: {what} has no extracted videos with captions; run `extract` first")
        return cls(cache, split, videos, texts, position[text_video_all[texts]], _read(cache["frame_mask"], videos),
                   _read(cache["text_lengths"], texts), len(failed), n_failed_texts)

    @functools.cached_property
    def captions_of(self) -> list[list[int]]:
        """For each video position of the split, its caption positions (computed once)."""
        captions_of: list[list[int]] = [[] for _ in range(self.n_videos)]
        for t, v in enumerate(self.text_video):
            captions_of[v].append(t)
        return captions_of

    @functools.cached_property
    def has_captions(self) -> np.ndarray:
        """[videos] bool: the video has a caption here (not so while its captions are still being extracted)."""
        return np.bincount(self.text_video, minlength=self.n_videos) > 0

    @property
    def n_videos(self) -> int:
        return len(self.videos)

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    def read_videos(self, positions: np.ndarray, arrays: tuple[str, ...] = VIDEO_ARRAYS) -> dict[str, torch.Tensor]:
        """Video features of split positions as stored (`arrays` of patch/cls tokens, frame embeddings (fp16),
        frame masks): callers name what they use; each array but the frame mask (in memory) is a chunk read per video."""
        positions = np.asarray(positions)
        idx = self.videos[positions]
        return {name: torch.from_numpy(self.frame_masks[positions] if name == "frame_mask" else _read(self.cache[name], idx))
                for name in arrays}

    def read_texts(self, positions: np.ndarray, arrays: tuple[str, ...] = TEXT_ARRAYS) -> dict[str, torch.Tensor]:
        """Caption features of split positions (`arrays` of text tokens and embeddings as stored (fp16), lengths
        (int64))."""
        positions = np.asarray(positions)
        idx = self.texts[positions]
        return {name: torch.from_numpy(self.text_lengths[positions].astype(np.int64)) if name == "text_lengths"
                else torch.from_numpy(_read(self.cache[name], idx)) for name in arrays}

    def read_frame_embeds(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the first stage's inputs of split positions: frame embeddings (fp16) and masks."""
        v = self.read_videos(positions, ("frame_embeds", "frame_mask"))
        return v["frame_embeds"], v["frame_mask"]

    def read_text_embeds(self, positions: np.ndarray) -> torch.Tensor:
        """Only the first stage's caption input of split positions: caption embeddings (fp16)."""
        return self.read_texts(positions, ("text_embeds",))["text_embeds"]

    def all_text_embeds(self, block: int = 4096) -> torch.Tensor:
        """Caption embeddings of the whole split [N_texts, E], fp16 (small: the first stage needs them all)."""
        return torch.cat([self.read_text_embeds(np.arange(lo, min(lo + block, self.n_texts)))
                          for lo in range(0, self.n_texts, block)])


def to_device(features: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Features read above, on the device, fp16 made float32 there: half the bytes cross to the device and the
    loader (a prefetch thread in training) does no conversion."""
    return {k: v.to(device).float() if v.dtype == torch.float16 else v.to(device) for k, v in features.items()}
