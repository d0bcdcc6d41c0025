"""MSVD: CLIP4Clip's `raw-captions.pkl` with split lists, or the `MSVD_{split}.tsv` split files."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets import register
from pipeline.datasets.common import (
    SplitTable,
    annotation_error,
    build_records,
    clean_captions,
    read_lines,
    stem_locator,
)
from pipeline.errors import UserError
from pipeline.records import SPLITS, VideoRecord
from pipeline.safe_pickle import safe_load

PICKLE = "raw-captions.pkl"
LISTS = {split: f"{split}_list.txt" for split in SPLITS}
TSVS = {split: f"MSVD_{split}.tsv" for split in SPLITS}
LAYOUT = (
    f"{PICKLE} with {', '.join(LISTS.values())} (CLIP4Clip layout), "
    f"or {', '.join(TSVS.values())}, and the videos anywhere below (e.g. YouTubeClips/<id>.avi)"
)


@register("msvd")
def load(data_root: Path) -> list[VideoRecord]:
    """MSVD records: the pickle layout when raw-captions.pkl exists, else the TSV split files."""
    if (data_root / PICKLE).is_file():
        splits, captions, source = _from_pickle(data_root)
    elif any((data_root / name).is_file() for name in TSVS.values()):
        splits, captions, source = _from_tsvs(data_root)
    else:
        raise annotation_error(data_root, "no MSVD annotations found", LAYOUT)
    return build_records(splits.split, captions, stem_locator(data_root, "YouTubeClips", ".avi"), source)


def _require(data_root: Path, names: dict[str, str]) -> None:
    for name in names.values():
        if not (data_root / name).is_file():
            raise annotation_error(data_root, f"missing {name}", LAYOUT)


def _from_pickle(data_root: Path) -> tuple[SplitTable, dict[str, list[str]], str]:
    _require(data_root, LISTS)
    path = data_root / PICKLE
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a dict video_id -> list of captions, got {type(raw).__name__}")
    splits = SplitTable()
    for split, name in LISTS.items():
        for _, line in read_lines(data_root / name):
            splits.add(line.strip(), split, str(data_root / name))
    captions = {}
    for video_id, caps in raw.items():
        if video_id in splits:
            # A bare string would otherwise become one caption per character.
            if not isinstance(caps, (list, tuple)):
                raise UserError(f"{path}: video '{video_id}' must map to a list of captions, got {caps!r:.60}")
            captions[video_id] = clean_captions((_join(c, path, video_id) for c in caps), str(path), video_id)
    return splits, captions, str(path)


def _join(caption: object, path: Path, video_id: str) -> str:
    # CLIP4Clip stores each caption as word tokens; a plain string is accepted as already joined.
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and all(isinstance(t, str) for t in caption):
        return " ".join(caption)
    raise UserError(f"{path}: captions of video '{video_id}' must be lists of word strings, got {caption!r:.60}")


def _from_tsvs(data_root: Path) -> tuple[SplitTable, dict[str, list[str]], str]:
    _require(data_root, TSVS)
    splits, captions = SplitTable(), {}
    for split, name in TSVS.items():
        path = data_root / name
        for n, line in read_lines(path):
            if "\t" not in line:
                raise UserError(f"{path} line {n}: expected 'caption, caption, ...<TAB>video_id'; fix the line")
            text, video_id = (part.strip() for part in line.rsplit("\t", 1))
            splits.add(video_id, split, str(path))
            # Every line ends its caption list with ', ': that trailing separator is not an empty caption.
            captions[video_id] = clean_captions(text.rstrip().rstrip(",").split(","), str(path), video_id)
    return splits, captions, "the MSVD_*.tsv files"
