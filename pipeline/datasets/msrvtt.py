"""MSR-VTT: the official `*_videodatainfo.json` files (loose or in their zips) or CLIP4Clip's
`MSRVTT_data.json`, with the 1k-A test split from `MSRVTT_JSFUSION_test.csv` when present.

Splits: official train -> train, validate -> val, test -> test. With the JSFusion CSV, test is its
1,000 videos with its one sentence each; train is then `MSRVTT_train.9k.csv`'s videos (all their
sentences) when that file is present, else `MSRVTT_train.7k.csv`'s, else every other MSR-VTT video: the
9,000 of JSFusion's protocol, the same set as the 9k list's. No val split then, as in the field.
"""

from __future__ import annotations

import logging
import zipfile
from collections import defaultdict
from pathlib import Path

from pipeline.datasets import register
from pipeline.datasets.common import (
    SplitTable,
    annotation_error,
    build_records,
    clean_captions,
    decode_text,
    parse_json,
    parse_split,
    read_csv,
    read_text,
    require_keys,
    stem_locator,
)
from pipeline.errors import UserError
from pipeline.records import VideoRecord

OFFICIAL = ("train_val_videodatainfo.json", "test_videodatainfo.json")
MERGED = "MSRVTT_data.json"
JSFUSION = "MSRVTT_JSFUSION_test.csv"
TRAIN_9K = "MSRVTT_train.9k.csv"
TRAIN_7K = "MSRVTT_train.7k.csv"
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}
LAYOUT = (
    f"{' and '.join(OFFICIAL)} (loose or in the official zips) or {MERGED}, optionally {JSFUSION} "
    f"and {TRAIN_9K} or {TRAIN_7K}, and the videos anywhere below (e.g. videos/all/video0.mp4)"
)

log = logging.getLogger(__name__)


@register("msrvtt")
def load(data_root: Path) -> list[VideoRecord]:
    """MSR-VTT records: official splits, or the 1k-A protocol when the JSFusion CSV is present."""
    official, captions, source = _read_annotations(data_root)
    if (data_root / JSFUSION).is_file():
        splits = _one_k_a(data_root, official, captions)
    else:
        splits = official
    return build_records(splits.split, captions, stem_locator(data_root, "videos/all", ".mp4"), source)


def _read_annotations(data_root: Path) -> tuple[SplitTable, dict[str, list[str]], str]:
    # The official files win over the merged one: both hold the same videos, so reading both would double them.
    docs = [doc for doc in (_open_json(data_root, name) for name in OFFICIAL) if doc is not None]
    if not docs:
        doc = _open_json(data_root, MERGED)
        if doc is None:
            raise annotation_error(data_root, "no MSR-VTT annotations found", LAYOUT)
        docs = [doc]
    splits, raw = SplitTable(), defaultdict(list)
    for source, data in docs:
        require_keys(data, ("videos", "sentences"), source, "the file")
        for video in data["videos"]:
            video = require_keys(video, ("video_id", "split"), source, "a 'videos' entry")
            video_id = str(video["video_id"])
            splits.add(video_id, parse_split(video["split"], OFFICIAL_SPLITS, source, video_id), source)
        for sentence in data["sentences"]:
            sentence = require_keys(sentence, ("video_id", "caption"), source, "a 'sentences' entry")
            caption = sentence["caption"]
            raw[str(sentence["video_id"])].append((source, "" if caption is None else str(caption)))
    captions = {
        video_id: clean_captions((c for _, c in caps), caps[0][0], video_id)
        for video_id, caps in raw.items()
        if video_id in splits
    }
    return splits, captions, " / ".join(source for source, _ in docs)


def _open_json(data_root: Path, name: str) -> tuple[str, object] | None:
    """(source, parsed JSON) of `name` loose in data_root or inside a zip directly in it; None if absent."""
    path = data_root / name
    if path.is_file():
        return str(path), parse_json(read_text(path), str(path))
    for archive in sorted(data_root.glob("*.zip")):
        try:
            with zipfile.ZipFile(archive) as zf:
                member = next((m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name), None)
                if member is None:
                    continue
                source = f"{archive}:{member}"
                return source, parse_json(decode_text(zf.read(member), source), source)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{archive}: unreadable zip ({e}); re-download it") from None
    return None


def _one_k_a(data_root: Path, official: SplitTable, captions: dict[str, list[str]]) -> SplitTable:
    """1k-A splits; captions of the test videos are replaced by the JSFusion sentence."""
    path = data_root / JSFUSION
    splits = SplitTable()
    unknown = []
    for _, row in read_csv(path, ("video_id", "sentence")):
        video_id = row["video_id"].strip()
        splits.add(video_id, "test", str(path))
        captions[video_id] = clean_captions([row["sentence"]], str(path), video_id)
        if video_id not in official.split:
            unknown.append(video_id)
    if unknown:  # a typo in the CSV makes a test video that MSR-VTT does not have (found on disk or not)
        log.warning("%s: %d video(s) not in the MSR-VTT annotations (first: %s)", path, len(unknown),
                    ", ".join(unknown[:3]))
    train_list = next((data_root / name for name in (TRAIN_9K, TRAIN_7K) if (data_root / name).is_file()), None)
    if train_list is not None:
        for _, row in read_csv(train_list, ("video_id",)):
            splits.add(row["video_id"].strip(), "train", str(train_list))
        return splits
    trained = [video_id for video_id in official.split if video_id not in splits]
    for video_id in trained:
        splits.add(video_id, "train", "the official annotations")
    log.info("%s: 1k-A without %s: training on the other %d videos (JSFusion's 9k; no val split)", data_root,
             TRAIN_9K, len(trained))
    return splits
