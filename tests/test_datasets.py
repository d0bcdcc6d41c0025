"""Tests for pipeline/datasets: each adapter on small handmade annotations, bad input, and real excerpts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import ADAPTERS, load_records
from pipeline.datasets.common import detect_delimiter, natural_key
from pipeline.datasets.manifest import read_manifest
from pipeline.errors import UserError
from pipeline.records import VideoRecord, missing_videos
from pipeline.safe_pickle import safe_load

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-data"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")  # adapters never decode, so any bytes stand in for a video
    return path.resolve()


def _error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """The UserError's message, checked to be one line holding every needle."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _by_id(records: list[VideoRecord]) -> dict[str, VideoRecord]:
    return {r.video_id: r for r in records}


def test_adapters_are_registered() -> None:
    with pytest.raises(UserError, match="unknown dataset"):
        load_records("nope", Path("."))  # also imports every adapter module
    assert {"manifest", "msrvtt", "msvd"} <= set(ADAPTERS)


# --- common helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [("video,caption,split", ","), ("key;vid_key;video_id;sentence", ";"), ("a\tb", "\t"), ("video_id", ",")],
)
def test_detect_delimiter(header: str, delimiter: str) -> None:
    assert detect_delimiter(header) == delimiter


def test_natural_key_orders_numbers_by_value() -> None:
    assert sorted(["video10", "video2", "video1", "a"], key=natural_key) == ["a", "video1", "video2", "video10"]


# --- msvd -----------------------------------------------------------------------------------------


def _msvd_pickle_root(root: Path, captions: dict, lists: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    for split, text in lists.items():
        (root / f"{split}_list.txt").write_text(text)
    return root


def _small_msvd(root: Path) -> Path:
    return _msvd_pickle_root(
        root,
        {
            "vid_a_1_5": [["a", "dog", "runs"], ["the", "dog", "is", "running"]],
            "vid_b_0_3": [["a", "cat", "sleeps"]],
            "vid_c_2_9": [["a", "man", "cooks"], ["someone", "is", "cooking"], ["a", "chef"]],
            "unlisted": [["never", "used"]],
        },
        {"train": "vid_b_0_3\nvid_a_1_5\n", "val": "", "test": "vid_c_2_9\n"},
    )


def test_msvd_pickle_layout(tmp_path: Path) -> None:
    root = _small_msvd(tmp_path / "msvd")
    a = _touch(root / "YouTubeClips" / "vid_a_1_5.avi")
    c = _touch(root / "other" / "deeper" / "vid_c_2_9.mp4")
    _touch(root / "YouTubeClips" / "vid_b_0_3.json")  # an annotation file must not pass for the video

    records = load_records("msvd", root)

    assert [(r.video_id, r.split) for r in records] == [
        ("vid_a_1_5", "train"),
        ("vid_b_0_3", "train"),
        ("vid_c_2_9", "test"),
    ]
    by_id = _by_id(records)
    assert by_id["vid_a_1_5"].captions == ("a dog runs", "the dog is running")
    assert by_id["vid_c_2_9"].captions == ("a man cooks", "someone is cooking", "a chef")
    assert by_id["vid_a_1_5"].path == a and by_id["vid_c_2_9"].path == c
    # Not on disk: still a record, at the expected place, and listed as missing.
    assert by_id["vid_b_0_3"].path == (root / "YouTubeClips" / "vid_b_0_3.avi").resolve()
    assert missing_videos(records) == [by_id["vid_b_0_3"]]


def test_msvd_finds_any_container(tmp_path: Path) -> None:
    root = _msvd_pickle_root(
        tmp_path, {f"v{i}": [["x"]] for i in range(4)}, {"train": "v0\nv1\nv2\nv3\n", "val": "", "test": ""}
    )
    paths = [_touch(root / name) for name in ("clips/v0.webm", "v1.MKV", "a/b/v2.mov", "v3.mp4")]
    assert [r.path for r in load_records("msvd", root)] == paths


def test_msvd_tsv_layout(tmp_path: Path) -> None:
    root = tmp_path / "msvd"
    root.mkdir()
    (root / "MSVD_train.tsv").write_bytes(
        b"a dog runs, the dog is running, \tvid_a\r\na cat sleeps, \tvid_b\r\n"
    )
    (root / "MSVD_val.tsv").write_bytes(b"a bird sings, \tvid_v\n")
    (root / "MSVD_test.tsv").write_bytes("ein hund läuft, 一只狗在跑, \tvid_t\n".encode())
    found = _touch(root / "YouTubeClips" / "vid_t.avi")

    records = load_records("msvd", root)

    assert [(r.video_id, r.split) for r in records] == [
        ("vid_a", "train"),
        ("vid_b", "train"),
        ("vid_v", "val"),
        ("vid_t", "test"),
    ]
    by_id = _by_id(records)
    assert by_id["vid_a"].captions == ("a dog runs", "the dog is running")
    assert by_id["vid_t"].captions == ("ein hund läuft", "一只狗在跑")
    assert by_id["vid_t"].path == found
    assert len(missing_videos(records)) == 3


def test_msvd_no_annotations(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_records("msvd", tmp_path)
    _error(err, str(tmp_path), "raw-captions.pkl", "train_list.txt", "MSVD_train.tsv")


def test_msvd_missing_list_file(tmp_path: Path) -> None:
    root = _small_msvd(tmp_path)
    (root / "test_list.txt").unlink()
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, "missing test_list.txt", "raw-captions.pkl with train_list.txt")


def test_msvd_missing_tsv_file(tmp_path: Path) -> None:
    (tmp_path / "MSVD_train.tsv").write_text("a dog, \tv\n")
    with pytest.raises(UserError) as err:
        load_records("msvd", tmp_path)
    _error(err, "missing MSVD_val.tsv")


def test_msvd_id_twice_in_one_list(tmp_path: Path) -> None:
    root = _small_msvd(tmp_path)
    (root / "train_list.txt").write_text("vid_a_1_5\nvid_b_0_3\nvid_a_1_5\n")
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, str(root / "train_list.txt"), "'vid_a_1_5'", "listed twice")


def test_msvd_id_in_two_splits(tmp_path: Path) -> None:
    root = _small_msvd(tmp_path)
    (root / "test_list.txt").write_text("vid_c_2_9\nvid_a_1_5\n")
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, "'vid_a_1_5'", str(root / "test_list.txt"), str(root / "train_list.txt"), "one split")


def test_msvd_tsv_id_in_two_splits(tmp_path: Path) -> None:
    (tmp_path / "MSVD_train.tsv").write_text("a dog, \tv1\n")
    (tmp_path / "MSVD_val.tsv").write_text("")
    (tmp_path / "MSVD_test.tsv").write_text("a dog again, \tv1\n")
    with pytest.raises(UserError) as err:
        load_records("msvd", tmp_path)
    _error(err, "'v1'", "MSVD_test.tsv", "MSVD_train.tsv")


def test_msvd_tsv_line_without_tab(tmp_path: Path) -> None:
    (tmp_path / "MSVD_train.tsv").write_text("a dog runs, vid_a\n")
    (tmp_path / "MSVD_val.tsv").write_text("")
    (tmp_path / "MSVD_test.tsv").write_text("")
    with pytest.raises(UserError) as err:
        load_records("msvd", tmp_path)
    _error(err, "MSVD_train.tsv line 1", "<TAB>video_id")


def test_msvd_list_not_utf8(tmp_path: Path) -> None:
    root = _small_msvd(tmp_path)
    (root / "train_list.txt").write_bytes("vid_a_1_5\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, str(root / "train_list.txt"), "not valid UTF-8", "re-save the file as UTF-8")


def test_msvd_empty_captions_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _msvd_pickle_root(
        tmp_path,
        {"v1": [["a", "dog"], [], ["  ", " "], " a cat  "], "v2": [[""], ["\t"]]},
        {"train": "v1\nv2\n", "val": "", "test": ""},
    )
    with caplog.at_level(logging.WARNING):
        records = load_records("msvd", root)
    assert [(r.video_id, r.captions) for r in records] == [("v1", ("a dog", "a cat"))]
    pkl = str(root / "raw-captions.pkl")
    empties = [m for m in caplog.messages if "empty caption" in m]
    assert len(empties) == 4 and all(pkl in m for m in empties)
    assert sum("'v1'" in m for m in empties) == 2
    assert any("'v2'" in m and "no captions" in m for m in caplog.messages)


def test_msvd_malicious_pickle_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    root = _msvd_pickle_root(tmp_path, {"v1": Evil()}, {"train": "v1\n", "val": "", "test": ""})
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, str(root / "raw-captions.pkl"), "refused to unpickle")
    assert not sentinel.exists()


def test_msvd_pickle_of_wrong_shape(tmp_path: Path) -> None:
    root = _msvd_pickle_root(tmp_path, {"v1": [[1, 2]]}, {"train": "v1\n", "val": "", "test": ""})
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, "raw-captions.pkl", "'v1'", "lists of word strings")


@pytest.mark.parametrize("value", ["a dog runs", 7, None, {"a": "dog"}])
def test_msvd_pickle_value_not_a_caption_list(tmp_path: Path, value: object) -> None:
    root = _msvd_pickle_root(tmp_path, {"v1": value}, {"train": "v1\n", "val": "", "test": ""})
    with pytest.raises(UserError) as err:
        load_records("msvd", root)
    _error(err, str(root / "raw-captions.pkl"), "'v1'", "must map to a list of captions")


# --- msrvtt ---------------------------------------------------------------------------------------


def _msrvtt_doc(videos: dict[str, str], sentences: list[tuple[str, str]]) -> dict:
    return {
        "info": {"year": "2016"},
        "videos": [{"video_id": v, "split": s, "id": i, "category": 0} for i, (v, s) in enumerate(videos.items())],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }


TRAIN_VAL = _msrvtt_doc(
    {"video0": "train", "video1": "train", "video2": "train", "video3": "validate"},
    [
        ("video0", "a man talks"),
        ("video1", "a car drives"),
        ("video0", "someone speaks"),
        ("video2", "a cartoon"),
        ("video3", "cooking pasta"),
        ("video3", "a chef cooks"),
    ],
)
TEST = _msrvtt_doc(
    {"video10": "test", "video11": "test", "video12": "test"},
    [("video10", "a dog barks"), ("video11", "a girl sings"), ("video12", "people dance"), ("video10", "a puppy")],
)


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _zip(path: Path, member: str, doc: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "MSR-VTT")
        zf.writestr(member, json.dumps(doc))


def _jsfusion(path: Path, rows: list[tuple[str, str]], delimiter: str = ",", newline: str = "\n", bom: bool = False):
    lines = [delimiter.join(["key", "vid_key", "video_id", "sentence"])]
    for i, (video_id, sentence) in enumerate(rows):
        lines.append(delimiter.join([f"ret{i}", video_id.replace("video", "msr"), video_id, sentence]))
    path.write_bytes(("\ufeff" if bom else "").encode() + newline.join(lines + [""]).encode())


def test_msrvtt_official_json(tmp_path: Path) -> None:
    _write_json(tmp_path / "train_val_videodatainfo.json", TRAIN_VAL)
    _write_json(tmp_path / "test_videodatainfo.json", TEST)
    v2 = _touch(tmp_path / "videos" / "all" / "video2.mp4")
    v11 = _touch(tmp_path / "TestVideo" / "video11.mp4")
    _touch(tmp_path / "thumbs" / "video0.jpg")  # not a video container

    records = load_records("msrvtt", tmp_path)

    assert [(r.video_id, r.split) for r in records] == [
        ("video0", "train"),
        ("video1", "train"),
        ("video2", "train"),
        ("video3", "val"),
        ("video10", "test"),
        ("video11", "test"),
        ("video12", "test"),
    ]
    by_id = _by_id(records)
    assert by_id["video0"].captions == ("a man talks", "someone speaks")
    assert by_id["video10"].captions == ("a dog barks", "a puppy")
    assert by_id["video2"].path == v2 and by_id["video11"].path == v11
    assert by_id["video0"].path == (tmp_path / "videos" / "all" / "video0.mp4").resolve()


def test_msrvtt_official_zips(tmp_path: Path) -> None:
    _zip(tmp_path / "train_val_annotation.zip", "train_val_videodatainfo.json", TRAIN_VAL)
    _zip(tmp_path / "test_videodatainfo.json.zip", "annotations/test_videodatainfo.json", TEST)
    records = load_records("msrvtt", tmp_path)
    assert Counter(r.split for r in records) == {"train": 3, "val": 1, "test": 3}
    assert sum(len(r.captions) for r in records) == 10


def test_msrvtt_merged_clip4clip_json(tmp_path: Path) -> None:
    merged = _msrvtt_doc(
        {**{v["video_id"]: v["split"] for v in TRAIN_VAL["videos"]}, **{v["video_id"]: "test" for v in TEST["videos"]}},
        [(s["video_id"], s["caption"]) for s in TRAIN_VAL["sentences"] + TEST["sentences"]],
    )
    _write_json(tmp_path / "MSRVTT_data.json", merged)
    records = load_records("msrvtt", tmp_path)
    assert Counter(r.split for r in records) == {"train": 3, "val": 1, "test": 3}


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("bom", [False, True])
def test_msrvtt_jsfusion_1k_a(tmp_path: Path, delimiter: str, newline: str, bom: bool) -> None:
    _write_json(tmp_path / "train_val_videodatainfo.json", TRAIN_VAL)
    _write_json(tmp_path / "test_videodatainfo.json", TEST)
    # The 1k-A test set may take a video from the official train split; it then leaves train.
    _jsfusion(
        tmp_path / "MSRVTT_JSFUSION_test.csv",
        [("video11", "a girl is singing"), ("video1", '"a car, driving fast"')],
        delimiter,
        newline,
        bom,
    )

    records = load_records("msrvtt", tmp_path)

    assert [(r.video_id, r.split, r.captions) for r in records if r.split == "test"] == [
        ("video1", "test", ("a car, driving fast",)),
        ("video11", "test", ("a girl is singing",)),
    ]
    # without a train list, every other video trains (JSFusion's 9k: official validate and test videos too)
    assert [(r.video_id, r.split) for r in records if r.split != "test"] == [
        ("video0", "train"),
        ("video2", "train"),
        ("video3", "train"),
        ("video10", "train"),
        ("video12", "train"),
    ]
    assert _by_id(records)["video0"].captions == ("a man talks", "someone speaks")


def test_msrvtt_1k_a_video_unknown_to_the_annotations_is_warned_about(tmp_path: Path, caplog) -> None:
    _write_json(tmp_path / "train_val_videodatainfo.json", TRAIN_VAL)
    _write_json(tmp_path / "test_videodatainfo.json", TEST)
    _jsfusion(tmp_path / "MSRVTT_JSFUSION_test.csv", [("video11", "a girl sings"), ("video99", "a typo")])
    records = load_records("msrvtt", tmp_path)
    assert [r.video_id for r in records if r.split == "test"] == ["video11", "video99"]
    assert "1 video(s) not in the MSR-VTT annotations (first: video99)" in caplog.text


@pytest.mark.parametrize("lists, trained", [
    ({"MSRVTT_train.9k.csv": ["video0", "video3", "video10"]}, ["video0", "video3", "video10"]),
    ({"MSRVTT_train.7k.csv": ["video0", "video3"]}, ["video0", "video3"]),
    ({"MSRVTT_train.9k.csv": ["video0"], "MSRVTT_train.7k.csv": ["video3"]}, ["video0"]),  # 9k, the protocol, wins
])
def test_msrvtt_train_list(tmp_path: Path, lists: dict[str, list[str]], trained: list[str]) -> None:
    _zip(tmp_path / "train_val_annotation.zip", "train_val_videodatainfo.json", TRAIN_VAL)
    _zip(tmp_path / "test_videodatainfo.json.zip", "test_videodatainfo.json", TEST)
    _jsfusion(tmp_path / "MSRVTT_JSFUSION_test.csv", [("video11", "a girl sings")])
    for name, ids in lists.items():
        (tmp_path / name).write_text("video_id\n" + "".join(f"{v}\n" for v in ids))

    records = load_records("msrvtt", tmp_path)

    assert [(r.video_id, r.split, len(r.captions)) for r in records] == [(v, "train", 2) for v in trained] + [
        ("video11", "test", 1)
    ]


def test_msrvtt_9k_overlapping_1k_a(tmp_path: Path) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", TEST)
    _jsfusion(tmp_path / "MSRVTT_JSFUSION_test.csv", [("video11", "a girl sings")])
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo10\nvideo11\n")
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "'video11'", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv")


def test_msrvtt_jsfusion_missing_column(tmp_path: Path) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", TEST)
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,caption\nret0,msr10,video10,a dog\n")
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "MSRVTT_JSFUSION_test.csv", "missing column 'sentence'")


def test_msrvtt_jsfusion_twice(tmp_path: Path) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", TEST)
    _jsfusion(tmp_path / "MSRVTT_JSFUSION_test.csv", [("video10", "a dog"), ("video10", "a dog again")])
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "MSRVTT_JSFUSION_test.csv", "'video10'", "listed twice")


def test_msrvtt_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "train_val_videodatainfo.json").write_text('{"videos": [\n{"video_id": "video0",,}]}')
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "train_val_videodatainfo.json", "malformed JSON at line 2")


def test_msrvtt_malformed_json_in_zip(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "train_val_annotation.zip", "w") as zf:
        zf.writestr("train_val_videodatainfo.json", "{not json")
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "train_val_annotation.zip:train_val_videodatainfo.json", "malformed JSON")


def test_msrvtt_json_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "test_videodatainfo.json"
    doc = _msrvtt_doc({"video10": "test"}, [("video10", "café")])
    path.write_bytes(json.dumps(doc, ensure_ascii=False).encode("cp1252"))
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, str(path), "re-save the file as UTF-8")


def test_msrvtt_unknown_split(tmp_path: Path) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", _msrvtt_doc({"video0": "dev"}, [("video0", "x")]))
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "MSRVTT_data.json", "unknown split 'dev'", "'video0'", "train, validate, test")


def test_msrvtt_missing_key(tmp_path: Path) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", {"videos": [{"video_id": "video0"}], "sentences": []})
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "MSRVTT_data.json", "no 'split' key")


def test_msrvtt_video_listed_twice(tmp_path: Path) -> None:
    doc = _msrvtt_doc({"video0": "train"}, [("video0", "x")])
    doc["videos"].append({"video_id": "video0", "split": "test"})
    _write_json(tmp_path / "MSRVTT_data.json", doc)
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "MSRVTT_data.json", "'video0'", "split 'test'", "split 'train'")


def test_msrvtt_no_annotations(tmp_path: Path) -> None:
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n")
    with pytest.raises(UserError) as err:
        load_records("msrvtt", tmp_path)
    _error(err, "no MSR-VTT annotations", "train_val_videodatainfo.json", "MSRVTT_data.json")


def test_msrvtt_empty_sentence_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_json(tmp_path / "MSRVTT_data.json", _msrvtt_doc({"video0": "train"}, [("video0", "  "), ("video0", " ok ")]))
    with caplog.at_level(logging.WARNING):
        records = load_records("msrvtt", tmp_path)
    assert records[0].captions == ("ok",)
    assert any("MSRVTT_data.json" in m and "'video0'" in m and "empty caption" in m for m in caplog.messages)


# --- manifest -------------------------------------------------------------------------------------


LONG = "a " + "very " * 200 + "long caption"


def test_manifest_csv(tmp_path: Path) -> None:
    clip = _touch(tmp_path / "clips" / "a.mp4")
    b = _touch(tmp_path / "b.webm")
    (tmp_path / "manifest.csv").write_text(
        "video,caption,split,notes\n"
        "clips/a.mp4,a dog runs,train,x\n"
        f"{b},\"a cat, asleep\",test,\n"
        "clips/a.mp4,  the dog is running  ,train,y\n"
        "c.mp4,一只鸟在唱歌,val,\n"
        f"clips/a.mp4,{LONG},train,\n",
        encoding="utf-8",
    )

    records = read_manifest(tmp_path)

    assert records == [
        VideoRecord("clips/a.mp4", clip, ("a dog runs", "the dog is running", LONG), "train"),
        VideoRecord("c.mp4", (tmp_path / "c.mp4").resolve(), ("一只鸟在唱歌",), "val"),
        VideoRecord("b.webm", b, ("a cat, asleep",), "test"),
    ]
    assert load_records("manifest", tmp_path) == records


def test_manifest_csv_semicolons_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_bytes(b"\xef\xbb\xbfvideo;caption;split\r\nv.mp4;hello, world;train\r\n")
    assert [(r.video_id, r.captions) for r in read_manifest(tmp_path)] == [("v.mp4", ("hello, world",))]


def test_manifest_jsonl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"video": "x/v1.mp4", "caption": "Un perro corre", "split": "train", "extra": 1},
        {"video": "x/v1.mp4", "caption": None, "split": "train"},
        {"video": "v2.mp4", "caption": "ein Hund", "split": "test"},
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    with caplog.at_level(logging.WARNING):
        records = read_manifest(tmp_path)
    assert [(r.video_id, r.split, r.captions) for r in records] == [
        ("x/v1.mp4", "train", ("Un perro corre",)),
        ("v2.mp4", "test", ("ein Hund",)),
    ]
    assert any("manifest.jsonl" in m and "'x/v1.mp4'" in m for m in caplog.messages)


def test_manifest_ids_are_relative_posix(tmp_path: Path) -> None:
    outside = _touch(tmp_path / "elsewhere" / "o.mp4")
    root = tmp_path / "root"
    root.mkdir()
    (root / "manifest.csv").write_text(
        f"video,caption,split\n./a/../a/v.mp4,one,train\n{root / 'a' / 'v.mp4'},two,train\n{outside},three,test\n"
    )
    records = read_manifest(root)
    assert [(r.video_id, r.captions) for r in records] == [
        ("a/v.mp4", ("one", "two")),
        (outside.as_posix(), ("three",)),
    ]
    assert records[1].path == outside


def test_manifest_empty_captions_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "manifest.csv").write_text("video,caption,split\na.mp4,  ,train\na.mp4,fine,train\nb.mp4,,test\n")
    with caplog.at_level(logging.WARNING):
        records = read_manifest(tmp_path)
    assert [(r.video_id, r.captions) for r in records] == [("a.mp4", ("fine",))]
    path = str(tmp_path / "manifest.csv")
    assert any(path in m and "'a.mp4'" in m and "empty caption" in m for m in caplog.messages)
    assert any("'b.mp4'" in m and "no captions" in m for m in caplog.messages)


def test_manifest_missing_column(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("video,text,split\na.mp4,x,train\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, str(tmp_path / "manifest.csv"), "missing column 'caption'")


def test_manifest_one_file_under_two_names_in_two_splits(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "v.mp4").write_bytes(b"")
    (tmp_path / "alias").symlink_to(tmp_path / "clips")
    (tmp_path / "manifest.csv").write_text("video,caption,split\nclips/v.mp4,a dog,train\nalias/v.mp4,a dog,test\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "'clips/v.mp4' (train) and 'alias/v.mp4' (test) are one file", "give each video one split")
    (tmp_path / "manifest.csv").write_text("video,caption,split\nclips/v.mp4,a dog,train\nalias/v.mp4,a dog,train\n")
    assert len(read_manifest(tmp_path)) == 2  # one split: no leak, each name its own record as before


def test_manifest_row_with_more_fields_than_columns(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("video,split,caption\na.mp4,train,a cat, asleep on a mat\n")
    with pytest.raises(UserError) as err:  # the caption would have been cut to "a cat"
        read_manifest(tmp_path)
    _error(err, f"{tmp_path / 'manifest.csv'} line 2: 4 fields for 3 columns", "quote the fields")
    (tmp_path / "manifest.csv").write_text("video,split,caption\na.mp4,train,a cat,,\n")  # trailing empty ones: fine
    assert [r.captions for r in read_manifest(tmp_path)] == [("a cat",)]


def test_manifest_jsonl_missing_key(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n')
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.jsonl line 1", "'split'")


def test_manifest_unknown_split(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("video,caption,split\na.mp4,x,train\nb.mp4,y,validation\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.csv line 3", "unknown split 'validation'", "train, val, test")


def test_manifest_conflicting_splits(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("video,caption,split\na.mp4,x,train\nb.mp4,y,test\na.mp4,z,test\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.csv", "'a.mp4'", "split 'test'", "split 'train'")


def test_manifest_malformed_jsonl(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"video": "a.mp4", "caption": "x", "split": "train"}\n{"video": \n')
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.jsonl line 2", "malformed JSON")


def test_manifest_non_string_value(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"video": "a.mp4", "caption": 7, "split": "train"}\n')
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.jsonl line 1", "'caption' must be a string")


def test_manifest_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_bytes("video,caption,split\na.mp4,caf\xe9,train\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, str(tmp_path / "manifest.csv"), "re-save the file as UTF-8")


def test_manifest_utf16_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_bytes("video,caption,split\na.mp4,x,train\n".encode("utf-16"))
    with pytest.raises(UserError, match="re-save the file as UTF-8"):
        read_manifest(tmp_path)


def test_manifest_absent_or_ambiguous(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "no manifest found", "manifest.csv", "manifest.jsonl")
    (tmp_path / "manifest.csv").write_text("video,caption,split\n")
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "keep one")


def test_manifest_empty_video(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("video,caption,split\n,x,train\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    _error(err, "manifest.csv line 2", "empty 'video'")


# --- real data excerpts ---------------------------------------------------------------------------


def _real(name: str) -> Path:
    path = REAL / name
    if not path.is_dir():
        pytest.skip(f"real data not present at {path}")
    return path


def _link_into(tmp_path: Path, source: Path, names: list[str]) -> Path:
    for name in names:
        (tmp_path / name).symlink_to(source / name)
    return tmp_path


@pytest.mark.realdata
def test_real_msvd_pickle_layout() -> None:
    root = _real("msvd")
    records = load_records("msvd", root)
    assert len(records) == 5
    assert missing_videos(records) == []
    assert all(r.path.parent.name == "YouTubeClips" and r.path.suffix == ".avi" for r in records)
    assert Counter(r.split for r in records) == {"train": 4, "test": 1}
    raw = safe_load(root / "raw-captions.pkl")
    assert {r.video_id: len(r.captions) for r in records} == {k: len(v) for k, v in raw.items()}
    first = records[0]
    assert first.captions[0] == " ".join(raw[first.video_id][0])


@pytest.mark.realdata
def test_real_msvd_split_tsvs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        records = load_records("msvd", _real("msvd-splits"))
    assert caplog.messages == []  # the ', ' ending every caption list is a separator, not an empty caption
    assert Counter(r.split for r in records) == {"train": 1200, "val": 100, "test": 670}
    assert len({r.video_id for r in records}) == 1970
    assert missing_videos(records) == records
    assert all(r.captions and all(c and c == c.strip() for c in r.captions) for r in records)


@pytest.mark.realdata
def test_real_msrvtt_official_zips(tmp_path: Path) -> None:
    root = _link_into(tmp_path, _real("msrvtt"), ["train_val_annotation.zip", "test_videodatainfo.json.zip"])
    records = load_records("msrvtt", root)
    assert len(records) == 10_000
    assert sum(len(r.captions) for r in records) == 200_000
    assert Counter(r.split for r in records) == {"train": 6513, "val": 497, "test": 2990}
    assert records[0].video_id == "video0" and records[-1].video_id == "video9999"


@pytest.mark.realdata
def test_real_msrvtt_jsfusion_1k_a(tmp_path: Path) -> None:
    source = _real("msrvtt")
    root = _link_into(
        tmp_path, source, ["train_val_annotation.zip", "test_videodatainfo.json.zip", "MSRVTT_JSFUSION_test.csv"]
    )
    records = load_records("msrvtt", root)
    test = [r for r in records if r.split == "test"]
    assert len(test) == 1000
    assert all(len(r.captions) == 1 for r in test)
    by_id = _by_id(test)
    assert by_id["video9770"].captions == ("a person is connecting something to system",)
    train = [r for r in records if r.split == "train"]  # JSFusion's 9k, derived: every other video, all its captions
    assert len(train) == 9000 and sum(len(r.captions) for r in train) == 180_000 and len(records) == 10_000
