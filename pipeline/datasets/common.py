"""Helpers every dataset adapter shares: reading text, CSV and JSON, captions, splits, finding videos.

Adapters parse their own format and hand the result to `build_records`, so the rules below hold for
every dataset:
- Captions are stripped; empty ones are dropped with a warning naming the file and the video id;
  everything else (long, non-English) is kept as written, in annotation order.
- A video id may appear in one split only and once per list; otherwise a UserError names both.
- Records are sorted by split (train, val, test) then by video id in natural order (video2 before
  video10), so two runs over the same annotations give the same list.
- Videos are found by file stem anywhere under the data root; a video not on disk still gets a
  record, at the path where it was expected, and the extractor reports missing files in one place.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from pipeline.errors import UserError
from pipeline.records import SPLITS, VideoRecord

log = logging.getLogger(__name__)

# Only these suffixes count as videos when searching by stem: annotation files, thumbnails and frame
# dumps under the same root would otherwise shadow a video with the same stem.
VIDEO_SUFFIXES = frozenset(
    ".avi .mp4 .m4v .webm .mkv .mov .mpg .mpeg .flv .wmv .3gp .ogv .ts .mts .m2ts .vob .asf .f4v".split()
)

CSV_DELIMITERS = (",", ";", "\t")


def annotation_error(data_root: Path, problem: str, layout: str) -> UserError:
    """A one-line UserError for missing annotations that says which layout the adapter expects."""
    return UserError(f"{data_root}: {problem}; expected {layout}")


def decode_text(data: bytes, source: str) -> str:
    """Decode UTF-8 bytes (a leading BOM is dropped); any other encoding is a UserError naming source."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{source}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save the file as UTF-8"
        ) from None


def read_text(path: Path) -> str:
    """The whole text of a UTF-8 file, with a clear error for another encoding."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode_text(data, str(path))


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line, line ending removed; LF, CRLF and CR all work."""
    # str.splitlines would also split on \x1c, \u2028 and friends, which may sit inside captions.
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def parse_json(text: str, source: str) -> object:
    """Parse JSON text; malformed JSON is a UserError naming source, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{source}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); re-download or fix the file"
        ) from None


def require_keys(obj: object, keys: Sequence[str], source: str, what: str) -> dict:
    """obj as a dict holding all keys; otherwise a UserError naming the first missing key."""
    if not isinstance(obj, dict):
        raise UserError(f"{source}: {what} must be a JSON object with keys {', '.join(keys)}")
    for key in keys:
        if key not in obj:
            raise UserError(f"{source}: {what} has no '{key}' key; add it (expected keys: {', '.join(keys)})")
    return obj


def detect_delimiter(header: str) -> str:
    """The delimiter among `,` `;` tab that occurs most in the header line (`,` when none does)."""
    # Column names never contain delimiters, so the header alone decides; data rows may hold commas in captions.
    counts = [header.count(d) for d in CSV_DELIMITERS]
    return CSV_DELIMITERS[counts.index(max(counts))] if max(counts) else ","


def read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each row of a delimited text file with a header; required columns must exist."""
    text = read_text(path)
    # newline="" lets the csv module see raw line endings, so LF, CRLF and CR all work, as do quoted newlines.
    header = next((line for line in io.StringIO(text, newline="") if line.strip()), "")
    if not header:
        raise UserError(f"{path}: empty file; expected a header line with columns {', '.join(required)}")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=detect_delimiter(header))
    out: list[tuple[int, dict[str, str]]] = []
    columns: list[str] = []
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if not columns:
                columns = [c.strip() for c in fields]
                _require_columns(path, columns, required)
                continue
            if any(f.strip() for f in fields[len(columns):]):  # a caption cut at an unquoted delimiter, silently
                raise UserError(f"{path} line {reader.line_num}: {len(fields)} fields for {len(columns)} columns; "
                                "quote the fields that hold the delimiter (\"a cat, asleep\")")
            # Short rows get empty strings so a missing value reads like an empty one.
            fields = fields + [""] * (len(columns) - len(fields))
            out.append((reader.line_num, dict(zip(columns, fields))))
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: unreadable CSV ({e}); fix or re-export the file") from None
    return out


def _require_columns(path: Path, columns: list[str], required: Sequence[str]) -> None:
    for name in required:
        if name not in columns:
            raise UserError(
                f"{path}: missing column '{name}' (found: {', '.join(columns)}); add a '{name}' column to the header"
            )


def parse_split(value: str, allowed: Mapping[str, str], source: str, video_id: str) -> str:
    """Map an annotation's split name to one of SPLITS; an unknown one is a UserError naming source."""
    key = str(value).strip().lower()
    if key not in allowed:
        raise UserError(
            f"{source}: unknown split '{value}' for video '{video_id}'; use one of {', '.join(allowed)}"
        )
    return allowed[key]


class SplitTable:
    """Video id -> split, refusing an id listed twice in one file or placed in two splits."""

    def __init__(self) -> None:
        self.split: dict[str, str] = {}
        self._source: dict[str, str] = {}

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.split

    def add(self, video_id: str, split: str, source: str, *, repeats_ok: bool = False) -> None:
        """Place video_id in split; repeats_ok allows the same id again in the same split (one row per caption)."""
        assert split in SPLITS, split
        old = self.split.get(video_id)
        if old is None:
            self.split[video_id] = split
            self._source[video_id] = source
            return
        old_source = self._source[video_id]
        if old == split and repeats_ok:
            return
        if old == split and old_source == source:
            raise UserError(f"{source}: video id '{video_id}' is listed twice; remove the duplicate")
        if old == split:
            raise UserError(
                f"{source}: video id '{video_id}' is listed again (also in {old_source}); list each video once"
            )
        where = "in this file" if old_source == source else f"in {old_source}"
        raise UserError(
            f"{source}: video id '{video_id}' is in split '{split}' but also in split '{old}' {where}; "
            "give each video one split"
        )


def clean_captions(captions: Iterable[str], source: str, video_id: str) -> list[str]:
    """Captions stripped of surrounding whitespace; empty ones dropped with a warning naming source and id."""
    kept = []
    for caption in captions:
        caption = caption.strip()
        if caption:
            kept.append(caption)
        else:
            log.warning("%s: dropped an empty caption of video '%s'", source, video_id)
    return kept


def absolute(path: Path) -> Path:
    """An absolute, normalised path; symlinks are kept so the name the user gave stays visible."""
    return Path(os.path.normpath(os.path.abspath(path)))


def index_videos(data_root: Path) -> dict[str, Path]:
    """Video files anywhere under data_root by file stem (symlinked folders followed, hidden ones skipped)."""
    found: dict[str, Path] = {}
    seen_dirs: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(absolute(data_root), followlinks=True):
        st = os.stat(folder)
        # A symlink loop would otherwise make the walk endless.
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in VIDEO_SUFFIXES or name.startswith("."):
                continue
            if path.stem in found:
                log.warning("%s: two videos with stem '%s'; using %s", data_root, path.stem, found[path.stem])
                continue
            found[path.stem] = path
    return found


def stem_locator(data_root: Path, default_dir: str, default_suffix: str) -> Callable[[str], Path]:
    """Find a video by id == file stem under data_root; one not on disk gets data_root/default_dir/<id><suffix>."""
    index = index_videos(data_root)
    expected = absolute(data_root / default_dir)
    return lambda video_id: index.get(video_id) or expected / f"{video_id}{default_suffix}"


def natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers, so 'video2' sorts before 'video10'."""
    # re.split with a group alternates text and digit runs, so int never meets str at the same position.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def build_records(
    splits: Mapping[str, str],
    captions: Mapping[str, Sequence[str]],
    locate: Callable[[str], Path],
    caption_source: str,
) -> list[VideoRecord]:
    """Records for every video with a split, sorted by split then natural id; videos without captions are skipped."""
    records = []
    for video_id, split in splits.items():
        texts = tuple(captions.get(video_id, ()))
        if not texts:
            # A video with no text can neither be trained on nor queried, so keep it out and say so.
            log.warning("%s: video '%s' (%s) has no captions; skipped", caption_source, video_id, split)
            continue
        records.append(VideoRecord(video_id=video_id, path=locate(video_id), captions=texts, split=split))
    records.sort(key=lambda r: (SPLITS.index(r.split), natural_key(r.video_id)))
    return records
