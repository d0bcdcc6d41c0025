"""Bad input through the CLI: odd videos and captions end to end, refused annotations as one line.

Covered elsewhere (not repeated here): decode reasons for zero-byte, text-as-.mp4, missing, audio-only
and truncated files (tests/test_decode.py); every annotation refusal at adapter level
(tests/test_datasets.py); hostile pickles (tests/test_safe_pickle.py); pickled checkpoints
(tests/test_train.py::test_checkpoint_with_pickled_payload_is_refused).
"""

from __future__ import annotations

import csv
import errno
import json
import pickle
import subprocess
import sys
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
from click.testing import CliRunner
from tqdm import tqdm

import cli
from pipeline.cache import DONE, FeatureCache
from pipeline.errors import UserError
from pipeline.ffmpeg import ffmpeg_exe
from tests.conftest import make_feature_cache, noise_frames, write_video

ROOT = Path(__file__).resolve().parents[2]
LONG = " ".join(["a small grey cat jumps over the red sofa"] * 250)  # 10,000 characters
FOREIGN = ["一只猫在弹钢琴", "Кошка играет на пианино 🎹", "قطة تعزف على البيانو", "猫がピアノを弾く"]


def _gradient_4k(n: int = 2) -> np.ndarray:
    """n frames of 3840x2160 smooth gradients (they compress to little, so the file stays small)."""
    y, x = np.mgrid[0:2160, 0:3840]
    return np.stack([np.dstack([(x // 16 + 40 * i) % 256, (y // 9) % 256, np.full_like(x, 60 * i)]).astype(np.uint8)
                     for i in range(n)])


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "data"
    write_video(root / "videos" / "one frame.mp4", noise_frames(1, seed=1, h=32, w=40))
    write_video(root / "vidéos" / "日本 の clip.mp4", noise_frames(10, seed=2, h=32, w=40))
    write_video(root / "videos" / "4k.mp4", _gradient_4k())
    (root / "videos" / "zero.mp4").write_bytes(b"")
    full = write_video(root / "videos" / "full.mp4", noise_frames(20, seed=3, h=32, w=40))
    (root / "videos" / "cut.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    (root / "videos" / "text.mp4").write_text("this is a caption file, not a video\n" * 20)
    ffmpeg.input("sine=frequency=440:duration=1", f="lavfi").output(
        str(root / "videos" / "audio.m4a"), loglevel="error").run(cmd=ffmpeg_exe())
    rows = [("videos/one frame.mp4", "", "train"), ("videos/one frame.mp4", "   ", "train"),
            ("videos/one frame.mp4", LONG, "train"), ("videos/one frame.mp4", "a single frame", "train"),
            ("vidéos/日本 の clip.mp4", FOREIGN[0], "train"), ("vidéos/日本 の clip.mp4", FOREIGN[1], "train"),
            ("videos/4k.mp4", FOREIGN[2], "test"), ("videos/4k.mp4", FOREIGN[3], "test")]
    rows += [(f"videos/{name}", f"the {name} video", "test") for name in ("zero.mp4", "cut.mp4", "text.mp4", "audio.m4a")]
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "split"])
        writer.writerows(rows)
    return root


def test_odd_videos_and_captions_end_to_end(odd_data, tmp_path):
    import torch

    torch.manual_seed(0)
    cache = tmp_path / "c.zarr"
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "manifest", "--data-root", str(odd_data),
                                           "--cache", str(cache), "--pretrained", "random", "--frames", "4"])
    assert result.exit_code == 0, result.output
    assert "4 video(s) could not be decoded" in result.output and "Traceback" not in result.output
    c = FeatureCache(cache)
    ids = c.video_ids().tolist()
    status = dict(zip(ids, c.video_status().tolist()))
    assert {v for v, s in status.items() if s == DONE} == {"videos/one frame.mp4", "vidéos/日本 の clip.mp4", "videos/4k.mp4"}
    reasons = {f["video"]: f["reason"] for f in c.failures()}
    assert reasons["videos/zero.mp4"] == "empty file (0 bytes)" and reasons["videos/audio.m4a"] == "no video stream"
    assert reasons["videos/cut.mp4"] and "Invalid data" in reasons["videos/text.mp4"]
    assert c["frame_mask"][ids.index("videos/one frame.mp4")].tolist() == [True, False, False, False]
    assert c["frame_mask"][ids.index("videos/4k.mp4")].tolist() == [True, True, False, False]
    assert np.isfinite(c["frame_embeds"][ids.index("videos/4k.mp4")]).all()
    captions = c["captions"][:].tolist()
    assert "" not in captions and "   " not in captions  # empty and blank captions dropped (with a warning)
    assert LONG in captions and all(f in captions for f in FOREIGN)  # stored exactly as written
    facts = json.loads(CliRunner().invoke(cli.main, ["info", "--cache", str(cache), "--json"]).output)
    assert facts["texts_truncated"] >= 1 and facts["texts"] == 10
    assert c["text_lengths"][captions.index(LONG)] == 32  # cut at --max-text-tokens


def test_4k_decode_memory_stays_bounded(odd_data):
    code = (
        "import resource, sys; from pipeline.decode import decode_video; "
        "v = decode_video(sys.argv[1], 12, 224); "
        "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]; "
        "print(v.frames.shape, v.mask.sum(), hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(odd_data / "videos" / "4k.mp4")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shape, n, self_kib, ffmpeg_kib = out.stdout.rsplit(" ", 3)
    assert "(12, 224, 224, 3)" in shape and int(n) == 2
    # Frames are scaled inside ffmpeg: python holds only 12 small frames (about 35 MiB peak measured),
    # ffmpeg a few 4K ones (about 100 MiB). VmHWM, not ru_maxrss: the latter survives exec from pytest.
    assert int(self_kib) < 300 * 1024 and int(ffmpeg_kib) < 600 * 1024, (self_kib, ffmpeg_kib)


def _manifest(root: Path, text: str, encoding: str = "utf-8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_bytes(text.encode(encoding))
    return root


def _msvd_with_payload(root: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (open, (str(root / "PWNED"), "w"))

    root.mkdir(parents=True, exist_ok=True)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"v1": [["a", "cat"]], "v2": Payload()}))
    for split, text in (("train", "v1\n"), ("val", ""), ("test", "v2\n")):
        (root / f"{split}_list.txt").write_text(text)
    return root


CASES = {
    "duplicate video id": ("manifest", lambda r: _manifest(r, "video,caption,split\na.mp4,x,train\na.mp4,y,test\n"),
                           "manifest.csv", "give each video one split"),
    "latin-1 annotations": ("manifest", lambda r: _manifest(r, "video,caption,split\na.mp4,café,train\n", "latin-1"),
                            "manifest.csv", "re-save the file as UTF-8"),
    "utf-16 annotations": ("manifest", lambda r: _manifest(r, "video,caption,split\na.mp4,x,train\n", "utf-16"),
                           "manifest.csv", "re-save the file as UTF-8"),
    "missing column": ("manifest", lambda r: _manifest(r, "video,text,split\na.mp4,x,train\n"),
                       "manifest.csv", "add a 'caption' column"),
    "malicious pickle": ("msvd", _msvd_with_payload, "raw-captions.pkl", "refused to unpickle"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_annotations_are_one_line_through_the_cli(tmp_path, case):
    dataset, make, file, fix = CASES[case]
    root = make(tmp_path / "data")
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", dataset, "--data-root", str(root),
                                           "--cache", str(tmp_path / "c.zarr"), "--pretrained", "random"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert file in result.output and fix in result.output
    assert not (root / "PWNED").exists() and not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("command, extra", [
    ("extract", []), ("info", []), ("export-h5", ["--out", "x.h5"]), ("train-reranker", ["--run", "run"]),
    ("evaluate", ["--run", "run"]), ("search", ["a red circle", "--run", "run"]),
])
def test_a_cache_that_is_a_file_is_one_line_in_every_command(tmp_path, monkeypatch, command, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # e.g. the export-h5 output given as --cache
    result = CliRunner().invoke(cli.main, [command, *extra, "--cache", "features.h5"])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: features.h5: is a file, not a cache folder; "
                             "pass --cache a folder path (e.g. cache/x.zarr)\n")


@pytest.mark.parametrize("command, extra", [
    ("info", []), ("export-h5", ["--out", "x.h5"]), ("train-reranker", ["--run", "run"]),
    ("evaluate", ["--run", "run"]), ("search", ["a red circle", "--run", "run"]),
])
def test_a_run_or_an_array_given_as_cache_is_named_as_such_in_every_command(tmp_path, monkeypatch, command, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trained").mkdir()  # --run and --cache swapped: "run extract first" was no fix for it
    (tmp_path / "trained" / "config.json").write_text(json.dumps({"cache": "cache/x.zarr"}))
    result = CliRunner().invoke(cli.main, [command, *extra, "--cache", "trained"])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: trained: a train-reranker run folder, not a feature cache; pass --cache a cache "
                             "folder (this run was trained on cache/x.zarr)\n")
    make_feature_cache(tmp_path / "c.zarr", {"test": 2})  # one of its arrays: it was "cache metadata is damaged"
    result = CliRunner().invoke(cli.main, [command, *extra, "--cache", "c.zarr/video_ids"])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: c.zarr/video_ids: one array of a cache, not a cache; pass --cache the folder "
                             "above it (c.zarr)\n")


@pytest.mark.parametrize("raised, code, says", [
    (PermissionError(13, "Permission denied", "/data/features.h5"), 2,
     "error: /data/features.h5: Permission denied; check that path"),
    (KeyboardInterrupt(), 130, "interrupted: stopped before it finished"),
], ids=["refused path", "ctrl-c"])
def test_a_refused_path_or_a_ctrl_c_in_any_command_is_one_line(tmp_path, monkeypatch, raised, code, says):
    def export(*args):
        raise raised

    cache = make_feature_cache(tmp_path / "c.zarr", {"test": 2})
    monkeypatch.setattr("pipeline.export.export_h5", export)
    result = CliRunner().invoke(cli.main, ["export-h5", "--cache", str(cache), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == code and says in result.output and "Traceback" not in result.output, result.output
    assert result.output.strip().count("\n") == 0


@pytest.mark.parametrize(("error", "line"), [
    (UserError("x.h5: the disk is full; free some space"), "error: x.h5: the disk is full; free some space"),
    (OSError(errno.ENOSPC, "No space left on device", "x.h5"), "error: x.h5: No space left on device; check that path "
     "(an existing folder where one is needed, not a file), its permissions and the disk"),
], ids=["user-error", "os-error"])
def test_an_error_after_an_unfinished_progress_bar_starts_its_own_line(tmp_path, monkeypatch, error, line):
    def export(*args):
        bar = tqdm(total=10, desc="export", file=sys.stderr)
        bar.update(3)
        raise error

    cache = make_feature_cache(tmp_path / "c.zarr", {"test": 2})
    monkeypatch.setattr("pipeline.export.export_h5", export)
    result = CliRunner().invoke(cli.main, ["export-h5", "--cache", str(cache), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2, result.output
    lines = result.output.replace("\r", "\n").splitlines()
    assert "export:  30%" in result.output and lines[-1] == line, lines
