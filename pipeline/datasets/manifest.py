"""Any dataset as a manifest: `manifest.csv` (columns video, caption, split) or `manifest.jsonl`.

One row per caption. `video` is a path relative to the data root or absolute; the video id is that
path relative to the data root in POSIX form (the absolute path for a video outside the root).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from pipeline.datasets import register
from pipeline.datasets.common import (
    SplitTable,
    absolute,
    annotation_error,
    build_records,
    clean_captions,
    parse_json,
    parse_split,
    read_csv,
    read_lines,
    require_keys,
)
from pipeline.errors import UserError
from pipeline.records import SPLITS, VideoRecord

COLUMNS = ("video", "caption", "split")
LAYOUT = "manifest.csv with a header 'video,caption,split' or manifest.jsonl with keys video, caption, split"


@register("manifest")
def load(data_root: Path) -> list[VideoRecord]:
    """Records from data_root/manifest.csv or data_root/manifest.jsonl."""
    return read_manifest(data_root)


def read_manifest(data_root: Path) -> list[VideoRecord]:
    """Records from a manifest in data_root: one row per caption, videos grouped by path."""
    csv_path, jsonl_path = data_root / "manifest.csv", data_root / "manifest.jsonl"
    if csv_path.is_file() and jsonl_path.is_file():
        raise annotation_error(data_root, "both manifest.csv and manifest.jsonl exist; keep one", LAYOUT)
    if csv_path.is_file():
        path, rows = csv_path, _csv_rows(csv_path)
    elif jsonl_path.is_file():
        path, rows = jsonl_path, _jsonl_rows(jsonl_path)
    else:
        raise annotation_error(data_root, "no manifest found", LAYOUT)

    root = absolute(data_root)
    splits, captions, paths = SplitTable(), defaultdict(list), {}
    for where, video, caption, split in rows:
        if not video.strip():
            raise UserError(f"{where}: empty 'video'; give the video's path relative to {data_root}")
        video_path = absolute(root / video.strip())
        relative = os.path.relpath(video_path, root)
        outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
        video_id = video_path.as_posix() if outside else Path(relative).as_posix()
        # One row per caption, so the same video in the same split repeats; only a change of split is wrong.
        splits.add(video_id, parse_split(split, {s: s for s in SPLITS}, where, video_id), str(path), repeats_ok=True)
        captions[video_id].append(caption)
        paths[video_id] = video_path
    # One file under two names (a symlinked folder; a relative and an absolute path) is one video: in two splits it
    # would leak its test captions into training
    named: dict[str, str] = {}
    for video_id, video_path in paths.items():
        first = named.setdefault(os.path.realpath(video_path), video_id)
        if splits.split[first] != splits.split[video_id]:
            raise UserError(f"{path}: '{first}' ({splits.split[first]}) and '{video_id}' ({splits.split[video_id]}) "
                            f"are one file, {os.path.realpath(video_path)}; give each video one split")
    cleaned = {video_id: clean_captions(caps, str(path), video_id) for video_id, caps in captions.items()}
    return build_records(splits.split, cleaned, paths.__getitem__, str(path))


def _csv_rows(path: Path) -> Iterator[tuple[str, str, str, str]]:
    for n, row in read_csv(path, COLUMNS):
        yield f"{path} line {n}", row["video"], row["caption"], row["split"]


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, str, str]]:
    for n, line in read_lines(path):
        where = f"{path} line {n}"
        row = require_keys(parse_json(line, where), COLUMNS, where, "the row")
        # A null caption reads as an empty one, which the caption rule then drops with a warning.
        values = ["" if row[key] is None and key == "caption" else row[key] for key in COLUMNS]
        for key, value in zip(COLUMNS, values):
            if not isinstance(value, str):
                raise UserError(f"{where}: '{key}' must be a string, got {_json_type(value)}; quote it")
        yield (where, *values)


def _json_type(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), "null"
    )
