"""The Zarr feature cache: its schema (array names, shapes, dtypes, metadata) and the one reader/writer.

Layout of one group (one per dataset and model), V videos, N captions:

    video_ids [V] str, video_paths [V] str, video_split [V] str
    video_status [V] int8 (0 pending, 1 done, 2 failed), video_error [V] str   one chunk per video
    video_source [V] str             "size mtime_ns sha256" of the file a done video's features came from
    patch_tokens [V, T, P, W] f16    per-frame patch tokens of the chosen ViT block (no class token)
    cls_tokens   [V, T, W] f16       the class token of that block
    frame_embeds [V, T, E] f16       per-frame embeddings in the joint space (encode_image)
    frame_mask   [V, T] bool         False where a short video had no frame to fill the slot
    captions [N] str, text_video [N] int32 (caption -> video index)
    text_tokens [N, L, W_text] f16    text tokens after `text_layer` text blocks (0: token + position embeddings)
    text_lengths [N] int16, text_embeds [N, E] f16
    text_chunk_status [ceil(N / TEXT_CHUNK)] int8   one flag per caption chunk

Per-video arrays are chunked one video per chunk, so shard processes never write the same chunk;
caption chunks are likewise owned by one shard each. A video (or caption chunk) is marked done only
after its data chunks are durable on disk, and every chunk is written atomically (temp file, fsync,
rename), so a run killed at any moment leaves nothing half-written that reads as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from tqdm import tqdm
from zarr.storage import LocalStore

from pipeline import __version__
from pipeline.errors import UserError, first_line
from pipeline.files import file_sha256, held_lock
from pipeline.records import VideoRecord

SCHEMA_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
# Captions per chunk (the unit a shard writes and marks done). Training reads a step's captions from as many
# chunks and decodes each whole: at 256 rows a ViT-B/32 chunk is 8 MB for one 32 kB caption. Caches made
# before keep their own chunk size (FeatureCache.text_chunk reads it from the array).
TEXT_CHUNK = 16
# Chosen by measurement (bench/cache_io.py, docs/benchmarks.md): fp16 features barely compress.
COMPRESSORS = {
    "none": None,
    "zstd": zarr.codecs.ZstdCodec(level=1),
    "blosc-zstd": zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2),
    "blosc-lz4": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
}
DEFAULT_COMPRESSION = "blosc-lz4"
VIDEO_FEATURES = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask")

# Cache metadata that must match the request for an existing cache to be reused.
_MATCH_KEYS = ("schema_version", "model", "pretrained", "pretrained_sha256", "frames", "image_size",
               "patch_layer", "text_layer", "max_text_tokens", "records_sha256")


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cache records about how its features were made."""

    dataset: str
    model: str
    pretrained: str
    pretrained_sha256: str
    frames: int
    image_size: int
    patch_layer: int
    text_layer: int  # text tokens after this many text blocks (0 = token + position embeddings)
    max_text_tokens: int
    num_patches: int
    patch_width: int
    text_width: int
    embed_dim: int
    compression: str = DEFAULT_COMPRESSION

    def attrs(self, records: list[VideoRecord], truncated: int) -> dict:
        """Group attributes for a new cache built from these records."""
        return {
            **asdict(self),
            "schema_version": SCHEMA_VERSION,
            "random_init": not self.pretrained,
            "records_sha256": records_fingerprint(records),
            "texts_truncated": int(truncated),
            "code_version": __version__,
        }


def first_mismatch(have: dict, want: dict, keys) -> str | None:
    """The first of keys whose values differ between two caches' (or a cache's and a run's) attributes, or None.

    Encoder weights loaded from a local file on both sides are compared by content (pretrained_sha256), not by
    their path, so a moved or re-cloned checkout keeps its caches and runs; a --pretrained tag by its name.
    """
    by_content = bool(have.get("pretrained_sha256") and want.get("pretrained_sha256"))
    return next((k for k in keys if not (k == "pretrained" and by_content) and have.get(k) != want.get(k)), None)


def check_cache_folder(path: Path) -> None:
    """Refuse a --cache that names a file: every command would otherwise take it for a missing cache."""
    if Path(path).is_file():
        raise UserError(f"{path}: is a file, not a cache folder; pass --cache a folder path (e.g. cache/x.zarr)")


def check_extract_target(path: Path, overwrite: bool) -> None:
    """Refuse a --cache that extract must not write into: a file, or a folder that holds something other than a
    feature cache (which --overwrite must not delete either). A cache, damaged or not, and an empty folder pass."""
    check_cache_folder(path)
    path = Path(path)
    if path.is_dir():
        other = not (path / "zarr.json").is_file() and any(path.iterdir()) or _foreign_group(path)
    else:
        other = path.exists()  # a device, a pipe: never a place for a cache, never renamed away
    if other:
        why = "so --overwrite will not delete it" if overwrite else "and not an empty folder"
        raise UserError(f"{path}: not a feature cache, {why}; pass another --cache folder (a new or empty one)")


def video_source(path: Path) -> str:
    """What identifies the bytes of a video file: "size mtime_ns sha256" (see FeatureCache.changed_videos)."""
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {file_sha256(path)}"


def records_fingerprint(records: list[VideoRecord]) -> str:
    """A digest of ids, captions and splits, so a cache is never reused for a different video list."""
    return _fingerprint((r.video_id, r.captions, r.split) for r in records)


def _fingerprint(rows) -> str:
    digest = hashlib.sha256()
    for video_id, captions, split in rows:
        digest.update(json.dumps([str(video_id), [str(c) for c in captions], str(split)]).encode())
    return digest.hexdigest()


class DurableStore(LocalStore):
    """A LocalStore whose every write is atomic and durable: temp file, fsync, rename, fsync directory.

    Reads of Blosc chunks are checked against the Blosc header first: Blosc decompresses a truncated
    chunk without noticing (reading past its end), which would turn a torn file into silent garbage.
    """

    blosc_chunk_bytes: dict[str, int] = {}  # array name -> uncompressed chunk size, set by FeatureCache

    async def set(self, key: str, value) -> None:
        await asyncio.to_thread(_durable_write, self.root / key, value.as_buffer_like())

    async def get(self, key: str, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        expected = self.blosc_chunk_bytes.get(key.split("/", 1)[0])
        if buf is not None and expected and byte_range is None and "/c/" in key:
            raw = buf.as_numpy_array()
            nbytes, _, cbytes = struct.unpack_from("<III", raw[:16].tobytes().ljust(16, b"\0"), 4)
            if len(raw) < 16 or cbytes != len(raw) or nbytes != expected:
                raise ValueError(f"{key}: damaged Blosc chunk ({len(raw)} bytes on disk, header says {cbytes} "
                                 f"compressed / {nbytes} raw, expected {expected} raw)")
        return buf


def _durable_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held while a cache is created or rebuilt, so shard processes agree on one store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(path: Path, exclusive: bool) -> contextlib.AbstractContextManager:
    """Held for a whole extract run, taken without waiting: shared by plain and shard runs, exclusive for
    --overwrite and --repair, which delete or reset what another run is writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    busy = (f"{path}: another extract is running on this cache, and --overwrite and --repair change what it writes; "
            "wait for it to finish or stop it, then run this again" if exclusive else
            f"{path}: an extract --overwrite or --repair is running on this cache; wait for it to finish, then run this "
            "again")
    return held_lock(path.with_name(path.name + ".run.lock"), exclusive, busy)


def _create_arrays(group: zarr.Group, spec: CacheSpec, records: list[VideoRecord], text_lengths: np.ndarray) -> None:
    compressors = COMPRESSORS[spec.compression]
    V, T, P, W = len(records), spec.frames, spec.num_patches, spec.patch_width
    N, L, E = int(sum(len(r.captions) for r in records)), spec.max_text_tokens, spec.embed_dim

    def array(name, shape, chunks, dtype, compress=True, fill_value=0):
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                                  compressors=compressors if compress else None)

    def strings(name, n, chunks=None):
        return array(name, (n,), (chunks or max(n, 1),), str, compress=False, fill_value="")

    for name in ("video_ids", "video_paths", "video_split"):
        strings(name, V)
    array("video_status", (V,), (1,), "int8", compress=False)
    strings("video_error", V, chunks=1)
    strings("video_source", V, chunks=1)
    array("patch_tokens", (V, T, P, W), (1, T, P, W), "float16")
    array("cls_tokens", (V, T, W), (1, T, W), "float16")
    array("frame_embeds", (V, T, E), (1, T, E), "float16")
    array("frame_mask", (V, T), (1, T), "bool", fill_value=False)
    strings("captions", N)
    array("text_video", (N,), (max(N, 1),), "int32", compress=False)
    chunk = min(TEXT_CHUNK, max(N, 1))
    array("text_tokens", (N, L, spec.text_width), (chunk, L, spec.text_width), "float16")
    array("text_lengths", (N,), (chunk,), "int16", compress=False)
    array("text_embeds", (N, E), (chunk, E), "float16")
    array("text_chunk_status", (-(-N // chunk),), (1,), "int8", compress=False)
    _write_records(group, records, text_lengths)


# The arrays written from the annotations when a cache is created; `extract --repair` writes them again.
RECORD_ARRAYS = ("video_ids", "video_paths", "video_split", "captions", "text_video", "text_lengths")
# Every array of a cache; video_source is absent from caches made before source records were kept.
ARRAYS = RECORD_ARRAYS + ("video_status", "video_error", "video_source", *VIDEO_FEATURES, "text_tokens",
                          "text_embeds", "text_chunk_status")


def _write_records(group: zarr.Group, records: list[VideoRecord], text_lengths: np.ndarray) -> None:
    """The RECORD_ARRAYS' values: ids, paths, splits, captions, which video each caption is of, caption lengths."""
    values = {
        "video_ids": [r.video_id for r in records],
        "video_paths": [str(r.path) for r in records],
        "video_split": [r.split for r in records],
        "captions": [c for r in records for c in r.captions],
    }
    for name, strings in values.items():
        if strings:
            group[name][:] = np.array(strings, dtype=object)
    if len(text_lengths):
        group["text_video"][:] = np.repeat(np.arange(len(records), dtype=np.int32), [len(r.captions) for r in records])
        group["text_lengths"][:] = text_lengths


def _zarr_meta(path: Path) -> dict:
    """What path's zarr.json says ({} when it does not read as a JSON object)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _foreign_group(path: Path) -> bool:
    """Whether path holds Zarr metadata that something else made (another tool's group, or one array of a cache): it
    reads and records no schema_version. Damaged metadata is taken for a cache's (rebuilding is its fix)."""
    meta = _zarr_meta(path)
    return bool(meta) and "schema_version" not in (meta.get("attributes") or {})


def _no_cache_here(path: Path) -> str:
    """The refusal of a --cache folder without a cache's zarr.json. A train-reranker run folder (--run and --cache
    swapped) is named as one, with the cache it was trained on: "run extract first" is no fix for it."""
    try:
        trained_on = json.loads((path / "config.json").read_text(encoding="utf-8"))["cache"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: no feature cache here; run `python cli.py extract` first or pass --cache DIR"
    return (f"{path}: a train-reranker run folder, not a feature cache; pass --cache a cache folder (this run was "
            f"trained on {trained_on})")


class FeatureCache:
    """One opened cache group: the only code that knows the array names."""

    def __init__(self, path: Path, mode: str = "r") -> None:
        self.path = Path(path)
        check_cache_folder(self.path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(_no_cache_here(self.path))
        # one array of a cache: zarr would say "an array already exists", which reads below as damaged metadata
        if _zarr_meta(self.path).get("node_type") == "array":
            above = self.path.parent
            raise UserError(f"{self.path}: one array of a cache, not a cache; pass --cache the folder above it ({above})"
                            if (above / "zarr.json").is_file() else
                            f"{self.path}: a Zarr array, not a feature cache; pass --cache a folder extract wrote")
        store = DurableStore(self.path, read_only=(mode == "r"))
        try:
            self.group = zarr.open_group(store, mode="r" if mode == "r" else "r+")
            self.attrs = dict(self.group.attrs)
        except Exception as e:  # noqa: BLE001 - damaged metadata of any kind gets the same answer
            raise UserError(f"{self.path}: cache metadata is damaged ({e}); rebuild it with `extract --overwrite`") from None
        if "schema_version" not in self.attrs:
            raise UserError(f"{self.path}: a Zarr group, but not a feature cache (its zarr.json records no "
                            "schema_version); pass --cache another folder")
        if self.attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: cache schema version {self.attrs.get('schema_version')} != {SCHEMA_VERSION} "
                "of this code; rebuild it with `extract --overwrite`"
            )
        # Open every array now, so damaged array metadata is one clear line here, not a traceback mid-run.
        self._arrays: dict[str, zarr.Array] = {}
        for member in sorted(self.path.iterdir()):
            if not (member / "zarr.json").is_file():
                continue
            try:
                self._arrays[member.name] = self.group[member.name]
            except Exception as e:  # noqa: BLE001 - unparsable JSON, bad codec config, ...
                raise UserError(
                    f"{member / 'zarr.json'}: array metadata is damaged ({first_line(e)}); "
                    "rebuild the cache with `extract --overwrite`"
                ) from None
        absent = [name for name in ARRAYS if name not in self._arrays and name != "video_source"]
        if absent:
            raise UserError(f"{self.path / absent[0] / 'zarr.json'}: missing, so the cache is damaged; "
                            "rebuild it with `extract --overwrite`")
        store.blosc_chunk_bytes = {
            name: int(np.prod(a.chunks)) * a.dtype.itemsize for name, a in self._arrays.items()
            if any(isinstance(c, zarr.codecs.BloscCodec) for c in a.compressors)
        }

    @classmethod
    def open_or_create(
        cls, path: Path, spec: CacheSpec, records: list[VideoRecord], text_lengths: np.ndarray, truncated: int,
        overwrite: bool = False,
    ) -> "FeatureCache":
        """Open the cache for these records and this encoder, creating it (atomically) when absent.

        A --cache that is a symbolic link (to a cache on a bigger disk) stands for the folder it points to: that is
        what --overwrite rebuilds, not the link.
        """
        path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
        with cache_lock(path):
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while creating
            check_extract_target(path, overwrite)  # again under the lock: another run may have written there
            if path.exists() and overwrite:
                # renamed first: a run killed while deleting leaves a stale temp folder (removed above), not half a cache
                old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                os.rename(path, old)
                shutil.rmtree(old)
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # an empty folder made for the cache (mkdir first) is where it goes
            if not path.exists():
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                group = zarr.open_group(DurableStore(tmp), mode="w", zarr_format=3)
                _create_arrays(group, spec, records, text_lengths)
                group.attrs.update(spec.attrs(records, truncated))
                os.rename(tmp, path)
            cache = cls(path, mode="r+")
        wanted = spec.attrs(records, truncated)
        key = first_mismatch(cache.attrs, wanted, _MATCH_KEYS)
        if key == "text_layer" and key not in cache.attrs:
            raise UserError(f"{path}: cache predates --text-layer and does not record which text block its "
                            "text tokens come from; re-extract it with --overwrite")
        if key is not None:
            what = "video list or captions" if key == "records_sha256" else key
            raise UserError(
                f"{path}: cache was built with another {what} ({cache.attrs.get(key)!r} != {wanted[key]!r}); "
                "pass --overwrite to rebuild it or --cache to use another folder"
            )
        return cache

    def check_outside(self, path: Path, option: str) -> None:
        """Refuse an output path inside the cache's folder (a run, a report, an export): `extract --overwrite`
        would delete it with the cache."""
        if Path(path).resolve().is_relative_to(self.path.resolve()):
            raise UserError(f"{path}: lies inside the cache {self.path}, and `extract --overwrite` would delete it "
                            f"with the cache; pass {option} a path outside it")

    # -- shapes and metadata ------------------------------------------------------------------
    def __getitem__(self, name: str) -> zarr.Array:
        return self._arrays[name] if name in self._arrays else self.group[name]

    @property
    def n_videos(self) -> int:
        return int(self.group["video_ids"].shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.group["captions"].shape[0])

    @property
    def n_text_chunks(self) -> int:
        return int(self.group["text_chunk_status"].shape[0])

    @property
    def text_chunk(self) -> int:
        return int(self.group["text_tokens"].chunks[0])

    def video_ids(self) -> np.ndarray:
        return np.asarray(self._read_record_array("video_ids"), dtype=object)

    def video_split(self) -> np.ndarray:
        return np.asarray(self._read_record_array("video_split"), dtype=object)

    def video_status(self) -> np.ndarray:
        """PENDING, DONE or FAILED per video; a flag whose chunk is unreadable (torn) is PENDING, so it is redone."""
        return self._read_rows("video_status")[0]

    def text_chunk_status(self) -> np.ndarray:
        """PENDING or DONE per caption chunk; an unreadable flag is PENDING, as in video_status."""
        return self._read_rows("text_chunk_status")[0]

    def texts_done(self) -> int:
        """How many captions are encoded: those of the finished chunks (the last chunk may be short)."""
        done = np.flatnonzero(self.text_chunk_status() == DONE)
        return int(np.minimum(self.text_chunk, self.n_texts - done * self.text_chunk).sum())

    def text_video(self) -> np.ndarray:
        return np.asarray(self._read_record_array("text_video"))

    def _read_record_array(self, name: str) -> np.ndarray:
        try:
            return self[name][:]
        except Exception as e:  # noqa: BLE001 - any codec, shape or length error means damaged bytes
            raise UserError(f"{self.path}: {name} does not read back ({first_line(e)}); re-run your extract command "
                            "with --repair, which writes it again from the annotations") from None

    def write_records(self, records: list[VideoRecord], text_lengths: np.ndarray) -> None:
        """Write the RECORD_ARRAYS again from the annotations the cache was built from (--repair)."""
        _write_records(self.group, records, text_lengths)

    def records_problem(self) -> str:
        """Why the RECORD_ARRAYS no longer hold the annotations the cache was built from (a chunk missing, which
        reads back as its fill value, or undecodable), or "" when they do."""
        v = {}
        for name in RECORD_ARRAYS:
            try:
                v[name] = np.asarray(self[name][:])
            except Exception as e:  # noqa: BLE001 - any codec, shape or length error means damaged bytes
                return f"{name} does not read back ({first_line(e)})"
        owner, n_videos = v["text_video"].astype(np.int64), len(v["video_ids"])
        if len(owner) and (owner.min() < 0 or owner.max() >= n_videos or (np.diff(owner) < 0).any()):
            return "text_video does not map captions to videos in order"
        per_video = np.split(v["captions"], np.cumsum(np.bincount(owner, minlength=n_videos))[:-1])
        if _fingerprint(zip(v["video_ids"], per_video, v["video_split"])) != self.attrs["records_sha256"]:
            return "video_ids, video_split, captions or text_video differ from the annotations the cache was built from"
        if not all(v["video_paths"]) or (v["text_lengths"] < 1).any():
            return "video_paths or text_lengths hold empty entries"
        return ""

    def failures(self) -> list[dict]:
        """Failed videos with the recorded reason, in index order."""
        failed = np.flatnonzero(self.video_status() == FAILED)
        ids = self.video_ids()
        errors = self["video_error"]

        def reason(i: int) -> str:
            try:
                return str(errors[i])
            except Exception:  # noqa: BLE001 - a damaged error chunk must not hide the other failures
                return "(reason unreadable: damaged chunk; run extract --repair)"

        return [{"video": str(ids[i]), "reason": reason(i)} for i in failed]

    # -- writing --------------------------------------------------------------------------------
    def write_video(self, i: int, patch: np.ndarray, cls_tok: np.ndarray, emb: np.ndarray, mask: np.ndarray,
                    source: str = "") -> None:
        """Store one video's features and the file they came from (video_source; "" for none), then mark it done
        (data first: a kill leaves it pending)."""
        g = self.group
        g["patch_tokens"][i] = patch.astype(np.float16)
        g["cls_tokens"][i] = cls_tok.astype(np.float16)
        g["frame_embeds"][i] = emb.astype(np.float16)
        g["frame_mask"][i] = mask
        g["video_error"][i] = ""
        if "video_source" in self._arrays:
            g["video_source"][i] = source
        g["video_status"][i] = DONE

    def changed_videos(self, videos: list[int], paths: list[Path]) -> list[int]:
        """Those of these done videos whose file no longer holds the bytes their features came from.

        A file with the recorded size and modification time is taken as unchanged without reading it; one that
        differs there (copied, touched) is hashed, and only other content counts as changed (its source record
        is brought up to date otherwise). A file now missing keeps its features. Caches made before source
        records were kept have none to compare: nothing counts as changed there.
        """
        if "video_source" not in self._arrays:
            return []
        sources, status = self._read_rows("video_source")[0], self.video_status()
        changed = []
        for i, path in zip(videos, paths):
            if status[i] != DONE or not path.is_file():
                continue
            recorded = str(sources[i]).split()
            stat = path.stat()
            if len(recorded) != 3 or recorded[:2] == [str(stat.st_size), str(stat.st_mtime_ns)]:
                continue
            now = video_source(path)
            if now.split()[2] == recorded[2]:
                self.group["video_source"][i] = now
            else:
                changed.append(i)
        return changed

    def write_failure(self, i: int, reason: str) -> None:
        """Record why a video could not be decoded."""
        self.group["video_error"][i] = reason
        self.group["video_status"][i] = FAILED

    def write_text_chunk(self, c: int, tokens: np.ndarray, emb: np.ndarray) -> None:
        """Store one chunk of caption features, then mark the chunk done."""
        lo = c * self.text_chunk
        hi = lo + len(tokens)
        self.group["text_tokens"][lo:hi] = tokens.astype(np.float16)
        self.group["text_embeds"][lo:hi] = emb.astype(np.float16)
        self.group["text_chunk_status"][c] = DONE

    def text_chunk_range(self, c: int) -> tuple[int, int]:
        """Caption index range [lo, hi) of chunk c."""
        lo = c * self.text_chunk
        return lo, min(lo + self.text_chunk, self.n_texts)

    # -- damage -------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[dict]:
        """Read back every finished video and caption chunk (a progress bar of each, if `progress`); list those with a
        missing or undecodable chunk.

        Each entry is {"video": id, "index": i, "reason": ...} or {"text_chunk": c, "captions": [lo, hi],
        "reason": ...}; or, alone, {"records": RECORD_ARRAYS, "reason": ...} when those no longer hold the
        annotations. Feature data that decodes but holds wrong values cannot be seen (the chunks carry no checksum).
        """
        problem = self.records_problem()
        if problem:  # the videos cannot be named until --repair has written these again
            return [{"records": list(RECORD_ARRAYS), "reason": problem}]
        damaged: list[dict] = []
        ids = self.video_ids()
        status, bad_status = self._read_rows("video_status")
        for i in tqdm(np.flatnonzero(status != PENDING).tolist() + bad_status, desc="verify videos", unit="video",
                      disable=not progress, mininterval=1):
            if i in bad_status:
                reason = "video_status chunk unreadable"
            else:
                reason = self._chunk_problem(VIDEO_FEATURES if status[i] == DONE else ("video_error",), i)
            if reason:
                damaged.append({"video": str(ids[i]), "index": int(i), "reason": reason})
        chunks, bad_chunks = self._read_rows("text_chunk_status")
        for c in tqdm(np.flatnonzero(chunks == DONE).tolist() + bad_chunks, desc="verify captions", unit="chunk",
                      disable=not progress, mininterval=1):
            if c in bad_chunks:
                reason = "text_chunk_status chunk unreadable"
            else:
                reason = self._chunk_problem(("text_tokens", "text_embeds"), c)
            if reason:
                damaged.append({"text_chunk": int(c), "captions": list(self.text_chunk_range(c)), "reason": reason})
        return damaged

    def _read_rows(self, name: str) -> tuple[np.ndarray, list[int]]:
        """A one-row-per-chunk array read whole, or row by row if that fails: (values, with unreadable rows as the
        fill value: PENDING for a status array, "" for a string array; the unreadable indices)."""
        arr = self[name]
        try:
            return np.asarray(arr[:]), []
        except Exception:  # noqa: BLE001 - find which one-element chunks are bad
            values, bad = np.full(arr.shape, arr.fill_value, dtype=arr.dtype), []
            for i in range(arr.shape[0]):
                try:
                    values[i] = arr[i]
                except Exception:  # noqa: BLE001
                    bad.append(i)
            return values, bad

    def _chunk_problem(self, names: tuple[str, ...], row_chunk: int) -> str:
        """Why chunk `row_chunk` (along the first axis) of these arrays is damaged, or "" when it reads back."""
        for name in names:
            arr = self[name]
            key = arr.metadata.encode_chunk_key((row_chunk,) + (0,) * (arr.ndim - 1))
            # An absent chunk reads back as zeros (the fill value), so absence must be checked on disk.
            # video_error holds "" (the fill value) for most videos, which zarr never stores.
            if name != "video_error" and not (self.path / name / key).is_file():
                return f"{name} chunk {key} missing"
            try:
                arr[row_chunk * arr.chunks[0]: (row_chunk + 1) * arr.chunks[0]]
            except Exception as e:  # noqa: BLE001 - any codec or shape error means the bytes are bad
                return f"{name} chunk {key} unreadable ({first_line(e)})"
        return ""

    def mark_pending(self, damaged: list[dict]) -> None:
        """Set the videos and caption chunks listed by verify() back to pending, so extract redoes them."""
        for entry in damaged:
            if "video" in entry:
                self.group["video_status"][entry["index"]] = PENDING
            elif "text_chunk" in entry:
                self.group["text_chunk_status"][entry["text_chunk"]] = PENDING

    def remove_partial_files(self) -> int:
        """Delete temp files left by writes that were killed (harmless, but they take space); their number."""
        stale = [f for f in self.path.rglob(".*.partial") if f.is_file()]
        for f in stale:
            f.unlink(missing_ok=True)
        return len(stale)

    def size_bytes(self) -> int:
        """Bytes on disk under the cache folder."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def describe(self, verify: bool = False, progress: bool = False) -> dict:
        """The facts `cli.py info` reports (JSON-serialisable); verify=True adds `damaged` (reads every chunk, with
        progress bars if `progress`)."""
        status = self.video_status()
        split = self.video_split()
        text_split = split[self.text_video()] if self.n_texts else np.array([], dtype=object)
        shapes = {name: {"shape": list(self.group[name].shape), "dtype": str(self.group[name].dtype)}
                  for name in ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask", "text_tokens", "text_embeds")}
        return {
            "cache": str(self.path),
            "dataset": self.attrs["dataset"],
            "videos_done": int((status == DONE).sum()),
            "videos_total": self.n_videos,
            "texts": self.n_texts,
            "text_chunks_done": int((self.text_chunk_status() == DONE).sum()),
            "text_chunks_total": self.n_text_chunks,
            "texts_truncated": self.attrs["texts_truncated"],
            "failed": self.failures(),
            "model": self.attrs["model"],
            "pretrained": self.attrs["pretrained"] or None,
            "random_init": self.attrs["random_init"],
            "frames": self.attrs["frames"],
            "image_size": self.attrs["image_size"],
            "patch_layer": self.attrs["patch_layer"],
            "text_layer": self.attrs.get("text_layer"),  # None: a cache from before text_layer was recorded
            "splits": {name: {"videos": int((split == name).sum()), "texts": int((text_split == name).sum())}
                       for name in sorted(set(split.tolist()))},
            "arrays": shapes,
            "bytes": self.size_bytes(),
            **({"damaged": self.verify(progress)} if verify else {}),
        }
