"""Stage one: decode every video once, run the frozen encoder once, store everything in the Zarr cache."""

from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.cache import (DEFAULT_COMPRESSION, DONE, CacheSpec, FeatureCache, check_extract_target, run_lock,
                            video_source)
from pipeline.datasets import default_data_root, load_records
from pipeline.decode import DecodedVideo, DecodeError, decode_video
from pipeline.encoder import DEFAULT_MODEL, FrozenEncoder
from pipeline.errors import UserError
from pipeline.records import VideoRecord, missing_videos

log = logging.getLogger(__name__)

CACHE_ROOT = Path("cache")


@dataclass
class ExtractConfig:
    """Options of `cli.py extract`."""

    dataset: str = "synthetic"
    data_root: Path | None = None
    cache: Path | None = None
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    frames: int = 12
    patch_layer: int = -1
    text_layer: int | None = None  # None: the model's default (encoder.DEFAULT_TEXT_LAYER, else the last block)
    max_text_tokens: int = 32
    batch_videos: int = 8
    workers: int = 4
    shard: str | None = None  # "I/N"; defaults to RANK/WORLD_SIZE under torchrun
    overwrite: bool = False
    repair: bool = False  # re-check every finished chunk and redo the videos/caption chunks found damaged
    compression: str = DEFAULT_COMPRESSION
    progress: bool = True


def default_cache_path(dataset: str, model: str) -> Path:
    """cache/<dataset>/<model>.zarr: one group per (dataset, model)."""
    return CACHE_ROOT / dataset / f"{model.replace('/', '_').replace(':', '_')}.zarr"


def resolve_shard(shard: str | None) -> tuple[int, int]:
    """(index, count) from --shard I/N, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard '{shard}': expected I/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise UserError(f"--shard '{shard}': need 0 <= I < N")
    return index, count


@dataclass
class ExtractSummary:
    """What one extract run leaves behind."""

    cache: Path
    videos_total: int
    videos_done: int
    texts: int
    texts_done: int
    failed: list[dict]
    repaired: list[dict] = field(default_factory=list)  # what --repair found damaged and redid (cache.verify's entries)


def _decode(path: Path, frames: int, size: int) -> tuple[str, DecodedVideo | str]:
    """(the file's source record, taken before decoding it; its frames, or why it could not be decoded)."""
    try:
        source = video_source(path) if path.is_file() else ""  # hashing a FIFO would wait forever
    except OSError:
        source = ""  # unreadable: decode_video says why
    try:
        return source, decode_video(path, frames, size)
    except DecodeError as e:
        return source, str(e)


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract features for this shard's videos and captions into the cache, skipping finished work."""
    shard_index, shard_count = resolve_shard(cfg.shard)
    if cfg.overwrite and shard_count > 1:
        raise UserError("--overwrite with several shards would let one shard delete another's work; rebuild once without --shard")
    if cfg.repair and shard_count > 1:
        raise UserError("--repair checks the whole cache; run it once without --shard while no shard is running")
    path = Path(cfg.cache) if cfg.cache else default_cache_path(cfg.dataset, cfg.model)
    # Refusals come before the run lock, so a refused run leaves nothing beside --cache: a bad cache folder
    # first (not after the encoder has loaded), then bad annotations, then a bad --model or --patch-layer.
    check_extract_target(path, cfg.overwrite)
    records = _records(cfg)
    encoder = FrozenEncoder(cfg.model, cfg.pretrained, patch_layer=cfg.patch_layer, text_layer=cfg.text_layer,
                            max_text_tokens=cfg.max_text_tokens)
    with run_lock(path.resolve(), exclusive=cfg.overwrite or cfg.repair):
        return _run_extract(cfg, path, records, encoder, shard_index, shard_count)


def _records(cfg: ExtractConfig) -> list[VideoRecord]:
    """The dataset's records; refused when none of their videos is on disk, a warning when some are missing."""
    data_root = Path(cfg.data_root) if cfg.data_root else default_data_root(cfg.dataset)
    records = load_records(cfg.dataset, data_root)
    missing = missing_videos(records)
    if records and len(missing) == len(records):
        raise UserError(f"{data_root}: none of the {len(records)} annotated videos is there (first: {missing[0].path}); "
                        "put the videos under --data-root (found by file stem, in any subfolder)")
    if missing:
        first = ", ".join(str(r.path) for r in missing[:3])
        log.warning("%d of %d annotated videos are missing on disk (first: %s); they are recorded as failed",
                    len(missing), len(records), first)
    return records


def _run_extract(cfg: ExtractConfig, path: Path, records: list[VideoRecord], encoder: FrozenEncoder, shard_index: int,
                 shard_count: int) -> ExtractSummary:
    info = encoder.info
    captions = [c for r in records for c in r.captions]
    _, lengths, truncated = encoder.tokenize(captions)
    if truncated.any():
        log.info("%d of %d captions are longer than %d tokens and were truncated",
                 int(truncated.sum()), len(captions), encoder.max_text_tokens)
    spec = CacheSpec(
        dataset=cfg.dataset, model=info.model, pretrained=info.pretrained, pretrained_sha256=info.pretrained_sha256,
        frames=cfg.frames, image_size=info.image_size, patch_layer=info.patch_layer, text_layer=info.text_layer,
        max_text_tokens=encoder.max_text_tokens, num_patches=info.num_patches, patch_width=info.patch_width,
        text_width=info.text_width, embed_dim=info.embed_dim, compression=cfg.compression,
    )
    try:
        cache = FeatureCache.open_or_create(path, spec, records, lengths, int(truncated.sum()), overwrite=cfg.overwrite)
        log.info("cache %s (model %s, weights %s, shard %d/%d)", path, info.model, info.pretrained or "RANDOM",
                 shard_index, shard_count)
        repaired = _repair(cache, records, lengths, cfg.progress) if cfg.repair else []
        _encode_captions(cache, encoder, captions, shard_index, shard_count, cfg.progress)
        _encode_videos(cache, encoder, records, cfg, shard_index, shard_count)
    except OSError as e:
        raise UserError(
            f"{path}: could not write the cache ({e.strerror or e}); finished videos are kept, "
            "fix the disk (space, permissions) and re-run the same command to resume"
        ) from None

    status = cache.video_status()
    return ExtractSummary(cache=path, videos_total=cache.n_videos, videos_done=int((status == DONE).sum()),
                          texts=cache.n_texts, texts_done=cache.texts_done(), failed=cache.failures(), repaired=repaired)


def _repair(cache: FeatureCache, records: list, lengths: np.ndarray, progress: bool) -> list[dict]:
    """Find damaged finished videos and caption chunks and set them pending: the normal run then redoes exactly those.
    Arrays written from the annotations (ids, captions, ...) that no longer hold them are written again first."""
    damaged = cache.verify(progress)
    if damaged and "records" in damaged[0]:
        log.warning("%s: %s; writing %s again from the annotations", cache.path, damaged[0]["reason"],
                    ", ".join(damaged[0]["records"]))
        cache.write_records(records, lengths)
        damaged += cache.verify(progress)
    for entry in damaged:
        if "records" not in entry:
            log.warning("%s: %s damaged (%s); redoing it", cache.path,
                        f"video {entry['video']}" if "video" in entry else f"caption chunk {entry['text_chunk']}",
                        entry["reason"])
    cache.mark_pending(damaged)
    removed = cache.remove_partial_files()
    if removed:
        log.info("%s: removed %d temp file(s) left by killed writes", cache.path, removed)
    return damaged


def _encode_captions(cache: FeatureCache, encoder: FrozenEncoder, captions: list[str], shard: int, shards: int,
                     progress: bool) -> None:
    status = cache.text_chunk_status()
    todo = [c for c in range(cache.n_text_chunks) if c % shards == shard and status[c] != DONE]
    for c in tqdm(todo, desc="captions", unit="chunk", disable=not progress or not todo):
        lo, hi = cache.text_chunk_range(c)
        tokens, _, emb = encoder.encode_captions(captions[lo:hi])
        cache.write_text_chunk(c, tokens.numpy(), emb.numpy())


def _encode_videos(cache: FeatureCache, encoder: FrozenEncoder, records, cfg: ExtractConfig, shard: int,
                   shards: int) -> None:
    mine = list(range(shard, len(records), shards))
    changed = cache.changed_videos(mine, [records[v].path for v in mine])
    if changed:
        log.warning("%s: %d finished video(s) changed on disk since their extraction (first: %s); extracting them again",
                    cache.path, len(changed), records[changed[0]].path)
        cache.mark_pending([{"video": records[v].video_id, "index": v} for v in changed])
    status = cache.video_status()
    # Fixed blocks of this shard's videos are encoded together, whatever is already done, so a resumed run
    # batches exactly as an uninterrupted one and produces bit-identical features.
    blocks = [mine[k: k + cfg.batch_videos] for k in range(0, len(mine), cfg.batch_videos)]
    todo = [b for b in blocks if any(status[v] != DONE for v in b)]
    n_todo = sum(int(status[v] != DONE) for b in todo for v in b)
    size = encoder.info.image_size
    with ThreadPoolExecutor(max(cfg.workers, 1)) as decoders, ThreadPoolExecutor(1) as writer, \
            tqdm(total=n_todo, desc="videos", unit="video", disable=not cfg.progress or not n_todo) as bar:
        ahead: collections.deque = collections.deque()
        pending_write: Future | None = None
        blocks_iter = iter(todo)

        def submit_next() -> None:
            block = next(blocks_iter, None)
            if block is not None:
                ahead.append((block, [decoders.submit(_decode, records[v].path, cfg.frames, size) for v in block]))

        for _ in range(max(cfg.workers, 2)):  # decoding runs this many blocks ahead of the encoder
            submit_next()
        while ahead:
            block, futures = ahead.popleft()
            submit_next()
            sources, decoded = zip(*(f.result() for f in futures))
            features = _encode_block(encoder, decoded)
            if pending_write is not None:
                pending_write.result()  # surfaces a write error (disk full) before more work piles up
            pending_write = writer.submit(_write_block, cache, block, sources, decoded, features, status)
            bar.update(sum(int(status[v] != DONE) for v in block))
        if pending_write is not None:
            pending_write.result()


def _encode_block(encoder: FrozenEncoder, decoded: list[DecodedVideo | str]) -> list[tuple | None]:
    """Encode the valid frames of every decodable video of a block in one batch; split back per video."""
    ok = [d for d in decoded if isinstance(d, DecodedVideo)]
    if not ok:
        return [None] * len(decoded)
    frames = np.concatenate([d.frames[d.mask] for d in ok])
    patch, cls_tok, emb = (t.numpy() for t in encoder.encode_frames(frames))
    out, start = [], 0
    for d in decoded:
        if not isinstance(d, DecodedVideo):
            out.append(None)
            continue
        n, T = int(d.mask.sum()), len(d.mask)
        full = []
        for arr in (patch, cls_tok, emb):
            padded = np.zeros((T, *arr.shape[1:]), dtype=arr.dtype)  # masked slots hold zeros, never copies
            padded[:n] = arr[start: start + n]
            full.append(padded)
        out.append(tuple(full))
        start += n
    return out


def _write_block(cache: FeatureCache, block: list[int], sources, decoded, features, status: np.ndarray) -> None:
    for v, source, d, feats in zip(block, sources, decoded, features):
        if status[v] == DONE:
            continue
        if feats is None:
            cache.write_failure(v, d)
        else:
            cache.write_video(v, *feats, d.mask, source=source)
