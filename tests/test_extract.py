"""Stage one end to end: extract into the Zarr cache, resume, shards, failures, refusals, info and export."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import cli
from pipeline.cache import DONE, PENDING, FeatureCache
from pipeline.decode import decode_video
from pipeline.encoder import FrozenEncoder, default_device
from pipeline.errors import UserError
from pipeline.export import export_h5
from pipeline.extract import ExtractConfig, run_extract
from tests.conftest import REAL_DATA, ROOT, make_feature_cache, subprocess_env

FEATURES = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask", "text_tokens", "text_lengths", "text_embeds")


def _cfg(data: Path, cache: Path, **kw) -> ExtractConfig:
    return ExtractConfig(dataset="manifest", data_root=data, cache=cache, batch_videos=2, workers=2, progress=False, **kw)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    c = FeatureCache(path)
    return {name: c[name][:] for name in FEATURES + ("video_status",)}


@pytest.fixture
def extracted(tiny_dataset, tmp_path):
    torch.manual_seed(0)  # random-init encoder: the same seed gives the same weights in every run
    summary = run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr"))
    return summary, FeatureCache(summary.cache)


def test_extract_stores_what_the_encoder_computes(extracted, tiny_dataset):
    summary, cache = extracted
    assert (summary.videos_done, summary.videos_total, summary.texts_done, summary.texts, summary.failed) == \
        (5, 5, 10, 10, [])
    assert cache["patch_tokens"].shape == (5, 12, 64, 128) and cache["patch_tokens"].dtype == np.float16
    assert cache["text_tokens"].shape == (10, 32, 64)
    assert cache.text_video().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    ids = cache.video_ids().tolist()
    assert ids[0] == "videos/clip0.mp4" and cache.video_split().tolist() == ["train", "train", "val", "test", "test"]
    assert cache["frame_mask"][ids.index("videos/clip4.mp4")].sum() == 3  # the 3-frame clip is padded with a mask

    _assert_encoder_output(cache, tiny_dataset, bf16=default_device().type == "cuda")
    assert not cache["patch_tokens"][ids.index("videos/clip4.mp4"), 3:].any()  # masked slots are zeros


def test_extract_under_bf16_autocast_stores_the_encoder_output(tiny_dataset, tmp_path, monkeypatch):
    # what a CUDA device runs under, here on CPU
    monkeypatch.setattr("pipeline.encoder.autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.manual_seed(0)
    summary = run_extract(_cfg(tiny_dataset, tmp_path / "bf16.zarr"))
    monkeypatch.undo()
    assert summary.videos_done == 5 and not summary.failed
    _assert_encoder_output(FeatureCache(summary.cache), tiny_dataset, bf16=True)


def _close(got: np.ndarray, want: np.ndarray, bf16: bool, atol: float) -> None:
    """Equal features: elementwise to fp16 storage precision; where either side ran under bf16 autocast (8-bit
    mantissas: ~0.5% off, more where batches differ) as a whole array within 2%, which a misplaced video or
    caption (~100% off) still fails."""
    got, want = got.astype(np.float32), want.astype(np.float32)
    if bf16:
        assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)
    else:
        np.testing.assert_allclose(got, want, atol=atol, rtol=2e-3)


def _assert_encoder_output(cache: FeatureCache, data: Path, bf16: bool) -> None:
    """The cache holds what the float32 encoder (same seed) computes for a video and for every caption."""
    torch.manual_seed(0)
    enc = FrozenEncoder(device=torch.device("cpu"))
    ids = cache.video_ids().tolist()
    i = ids.index("videos/clip1.mp4")
    patch, _, emb = enc.encode_frames(decode_video(data / ids[i], 12, 64).frames)
    _close(cache["frame_embeds"][i], emb.numpy(), bf16, atol=2e-3)
    _close(cache["patch_tokens"][i], patch.numpy(), bf16, atol=2e-2)
    tokens, lengths, text_emb = enc.encode_captions(list(cache["captions"][:]))
    _close(cache["text_embeds"][:], text_emb.numpy(), bf16, atol=2e-3)
    _close(cache["text_tokens"][:], tokens.numpy(), bf16, atol=2e-2)
    assert cache["text_lengths"][:].tolist() == lengths.tolist()


def test_rerun_is_idempotent_and_skips_finished_work(extracted, tiny_dataset):
    summary, cache = extracted
    before = _arrays(summary.cache)
    chunk_files = sorted((summary.cache / "patch_tokens").rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in chunk_files]
    torch.manual_seed(0)
    run_extract(_cfg(tiny_dataset, summary.cache))
    assert [f.stat().st_mtime_ns for f in chunk_files] == mtimes  # nothing rewritten
    after = _arrays(summary.cache)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_videos_changed_on_disk_are_extracted_again(extracted, tiny_dataset, caplog):
    summary, cache = extracted
    ids = cache.video_ids().tolist()
    replaced, touched = ids.index("videos/clip1.mp4"), ids.index("videos/clip2.mp4")
    before = _arrays(summary.cache)
    old_source = str(cache["video_source"][touched])
    (tiny_dataset / ids[replaced]).write_bytes((tiny_dataset / ids[0]).read_bytes())  # re-encoded: other bytes
    os.utime(tiny_dataset / ids[touched], ns=(1, 1))  # copied without its times: the same bytes
    torch.manual_seed(0)
    run_extract(_cfg(tiny_dataset, summary.cache))
    after = _arrays(summary.cache)
    assert "1 finished video(s) changed on disk" in caplog.text and "clip1.mp4" in caplog.text
    # the replaced video now holds the features of its new bytes, those of clip0; nothing else moved
    np.testing.assert_allclose(after["frame_embeds"][replaced], after["frame_embeds"][0], atol=2e-3)
    assert not np.allclose(before["frame_embeds"][replaced], after["frame_embeds"][replaced], atol=2e-3)
    others = [i for i in range(len(ids)) if i != replaced]
    assert all(np.array_equal(before[k][others], after[k][others]) for k in before if k.startswith(("patch", "frame")))
    # the touched one was hashed, found the same and kept; its record now carries the new time
    assert str(FeatureCache(summary.cache)["video_source"][touched]).split() == [old_source.split()[0], "1",
                                                                                   old_source.split()[2]]


def test_an_unreadable_source_record_is_no_record(extracted, tiny_dataset):
    summary, cache = extracted
    before = _arrays(summary.cache)
    (summary.cache / "video_source" / "c" / "1").write_bytes(b"\x00garbage")
    os.utime(tiny_dataset / cache.video_ids()[1], ns=(1, 1))
    torch.manual_seed(0)
    run_extract(_cfg(tiny_dataset, summary.cache))  # no traceback: video 1 has nothing to compare, so it is kept
    after = _arrays(summary.cache)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_crash_then_resume_equals_uninterrupted_run(extracted, tiny_dataset, tmp_path, monkeypatch):
    summary, _ = extracted
    reference = _arrays(summary.cache)
    original = FeatureCache.write_video
    calls = {"n": 0}

    def crash_after_three(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # a run stopped half-way through a block
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "write_video", crash_after_three)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_cfg(tiny_dataset, tmp_path / "resumed.zarr"))
    assert (FeatureCache(tmp_path / "resumed.zarr").video_status() == DONE).sum() == 3
    monkeypatch.setattr(FeatureCache, "write_video", original)
    torch.manual_seed(0)
    run_extract(_cfg(tiny_dataset, tmp_path / "resumed.zarr"))
    resumed = _arrays(tmp_path / "resumed.zarr")
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_undecodable_videos_are_recorded_and_the_run_goes_on(tiny_dataset, tmp_path, capsys):
    (tiny_dataset / "videos" / "not a video é.mp4").write_text("hello\n" * 50)
    (tiny_dataset / "videos" / "empty.mp4").write_bytes(b"")
    os.mkfifo(tiny_dataset / "videos" / "pipe.mp4")  # reading it (to hash or decode) would wait forever
    with open(tiny_dataset / "manifest.csv", "a") as f:
        f.write("videos/not a video é.mp4,a text file renamed,train\n")
        f.write("videos/empty.mp4,zero bytes,train\n")
        f.write("videos/gone.mp4,missing on disk,test\n")
        f.write("videos/pipe.mp4,a named pipe,test\n")
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "manifest", "--data-root", str(tiny_dataset),
                                           "--cache", str(tmp_path / "c.zarr")])
    assert result.exit_code == 0, result.output
    assert "4 video(s) could not be decoded" in result.output
    reasons = {f["video"]: f["reason"] for f in FeatureCache(tmp_path / "c.zarr").failures()}
    assert reasons["videos/empty.mp4"] == "empty file (0 bytes)"
    assert reasons["videos/gone.mp4"] == "file not found"
    assert reasons["videos/pipe.mp4"] == "not a regular file"
    assert "Invalid data" in reasons["videos/not a video é.mp4"]
    assert (FeatureCache(tmp_path / "c.zarr").video_status() == DONE).sum() == 5
    strict = CliRunner().invoke(cli.main, ["extract", "--dataset", "manifest", "--data-root", str(tiny_dataset),
                                           "--cache", str(tmp_path / "c.zarr"), "--strict"])
    assert strict.exit_code == 1
    cache = FeatureCache(tmp_path / "c.zarr")
    gone = cache.video_ids().tolist().index("videos/gone.mp4")
    (tmp_path / "c.zarr" / "video_error" / "c" / str(gone)).write_bytes(b"")  # torn
    assert [(d["video"], d["reason"].split(" (")[0]) for d in cache.verify()] == [
        ("videos/gone.mp4", f"video_error chunk c/{gone} unreadable")]  # a failure's reason is finished work too
    first = sorted((tiny_dataset / "videos").glob("*.mp4"))[0]
    (tiny_dataset / "videos" / "gone.mp4").write_bytes(first.read_bytes())  # the missing video turns up
    run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr"))  # failed videos are tried again
    assert cache.video_status()[gone] == DONE and cache.verify() == []
    capsys.readouterr()
    assert cache.verify(progress=True) == []  # read back: long on a real cache (MSR-VTT: 8 GB of patch tokens)
    bars = capsys.readouterr().err
    assert "verify videos: 100%" in bars and f"{cache.n_videos}/{cache.n_videos}" in bars
    assert "verify captions: 100%" in bars and f"{cache.n_text_chunks}/{cache.n_text_chunks}" in bars
    assert "videos/gone.mp4" not in {f["video"] for f in cache.failures()} and cache["frame_mask"][gone].all()


def test_a_shard_does_its_own_videos_and_caption_chunks_only(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.cache.TEXT_CHUNK", 4)  # the 10 captions in chunks of 4, 4 and 2
    encoded, encode = [], FrozenEncoder.encode_captions
    monkeypatch.setattr(FrozenEncoder, "encode_captions", lambda self, c: encoded.append(len(c)) or encode(self, c))
    summary = run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr", shard="0/2"))
    cache = FeatureCache(tmp_path / "c.zarr")
    assert cache.text_chunk_status().tolist() == [DONE, PENDING, DONE] and encoded == [4, 2]
    assert (summary.texts_done, summary.texts) == (6, 10)  # what this shard encoded of all the captions
    assert cache.video_status().tolist() == [DONE, PENDING, DONE, PENDING, DONE]  # videos 0, 2, 4 of 5
    args = ["extract", "--dataset", "manifest", "--data-root", str(tiny_dataset), "--cache", str(tmp_path / "c.zarr")]
    again = CliRunner().invoke(cli.main, args + ["--shard", "0/2"])  # its work is done: the summary line only
    line = f"cache {tmp_path / 'c.zarr'}: 3/5 videos done, 6/10 captions done\n"  # not "10 captions": all of them
    assert again.exit_code == 0 and line in again.output, again.output


def test_a_moved_weights_file_keeps_its_cache(tiny_dataset, tmp_path):
    import shutil

    from pipeline.encoder import DEFAULT_MODEL, shipped_weights

    here, moved = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "w.safetensors"
    for path in (here, moved):
        path.parent.mkdir()
        shutil.copy(shipped_weights(DEFAULT_MODEL), path)
    run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr", pretrained=str(here)))
    again = run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr", pretrained=str(moved)))  # a re-cloned checkout
    assert again.videos_done == 5
    moved.write_bytes(moved.read_bytes()[:-8] + b"\0" * 8)  # other weights at the same path: still refused
    with pytest.raises(UserError, match="another pretrained_sha256"):
        run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr", pretrained=str(moved)))


def test_cache_of_other_settings_is_refused_then_overwritten(extracted, tiny_dataset):
    summary, _ = extracted
    with pytest.raises(UserError, match=r"another frames \(12 != 8\); pass --overwrite"):
        run_extract(_cfg(tiny_dataset, summary.cache, frames=8))
    run_extract(_cfg(tiny_dataset, summary.cache, frames=8, overwrite=True))
    assert FeatureCache(summary.cache)["frame_mask"].shape == (5, 8)


@pytest.mark.parametrize("running, refused", [
    ("extract", {"overwrite": True}), ("extract", {"repair": True}),
    ("extract --overwrite", {}), ("extract --repair", {"shard": "1/2"}),
])
def test_overwrite_and_repair_never_run_beside_another_extract(extracted, tiny_dataset, running, refused):
    summary, _ = extracted
    lock = summary.cache.with_name(summary.cache.name + ".run.lock")
    with open(lock) as held:  # what the running extract holds for its whole run
        fcntl.flock(held, fcntl.LOCK_SH if running == "extract" else fcntl.LOCK_EX)
        why = "another extract is running" if running == "extract" else "an extract --overwrite or --repair is running"
        with pytest.raises(UserError, match=f"{summary.cache.name}: {why} on this cache.*; wait for it to finish"):
            run_extract(_cfg(tiny_dataset, summary.cache, **refused))
        if running == "extract":  # plain runs share the cache (shards do)
            assert run_extract(_cfg(tiny_dataset, summary.cache)).videos_done == 5
    assert run_extract(_cfg(tiny_dataset, summary.cache, **refused)).videos_done == 5


def test_overwrite_through_a_symlink_rebuilds_the_cache_it_points_to(tiny_dataset, tmp_path):
    real, link = tmp_path / "big disk" / "c.zarr", tmp_path / "c.zarr"
    run_extract(_cfg(tiny_dataset, real, frames=4))
    link.symlink_to(real)
    summary = run_extract(_cfg(tiny_dataset, link, frames=8, overwrite=True))
    assert summary.videos_done == 5
    assert link.is_symlink() and link.resolve() == real.resolve()  # the link was renamed away and lost before
    assert FeatureCache(real)["frame_mask"].shape == (5, 8)


def test_an_empty_folder_made_for_the_cache_is_used(tiny_dataset, tmp_path):
    (tmp_path / "c.zarr").mkdir()  # it said "no feature cache here; run extract first" to the extract run
    assert run_extract(_cfg(tiny_dataset, tmp_path / "c.zarr")).videos_done == 5


def test_overwrite_deletes_only_a_feature_cache(tiny_dataset, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("a week of work")
    with pytest.raises(UserError, match=r"precious: not a feature cache, so --overwrite will not delete it"):
        run_extract(_cfg(tiny_dataset, precious, overwrite=True))
    # it said "no feature cache here; run `python cli.py extract` first" to the extract run
    with pytest.raises(UserError, match=r"precious: not a feature cache, and not an empty folder; pass another --cache"):
        run_extract(_cfg(tiny_dataset, precious))
    assert (precious / "notes.txt").read_text() == "a week of work"
    assert not list(tmp_path.glob("*lock"))  # refused before the locks were taken
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")  # another tool's Zarr store
    foreign.create_array("embeddings", shape=(3,), dtype="float32")[:] = [1, 2, 3]
    with pytest.raises(UserError, match=r"foreign.zarr: not a feature cache, and not an empty folder; pass another"):
        run_extract(_cfg(tiny_dataset, tmp_path / "foreign.zarr"))
    with pytest.raises(UserError, match=r"foreign.zarr: not a feature cache, so --overwrite will not delete it"):
        run_extract(_cfg(tiny_dataset, tmp_path / "foreign.zarr", overwrite=True))
    assert zarr.open_group(tmp_path / "foreign.zarr", mode="r")["embeddings"][:].tolist() == [1, 2, 3]
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.manual_seed(0)
    assert run_extract(_cfg(tiny_dataset, empty, overwrite=True)).videos_done == 5  # an empty folder is fine
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_filled_after_the_first_check_is_not_deleted_by_overwrite(tiny_dataset, tmp_path, monkeypatch):
    import pipeline.extract

    precious, check = tmp_path / "precious", pipeline.extract.check_extract_target

    def checked_then_filled(path, overwrite):  # another program writes there while the encoder loads
        check(path, overwrite)
        precious.mkdir()
        (precious / "notes.txt").write_text("a week of work")

    monkeypatch.setattr("pipeline.extract.check_extract_target", checked_then_filled)
    with pytest.raises(UserError, match=r"precious: not a feature cache, so --overwrite will not delete it"):
        run_extract(_cfg(tiny_dataset, precious, overwrite=True))
    assert (precious / "notes.txt").read_text() == "a week of work"  # checked again under the lock


def test_info_names_random_weights_as_such(tmp_path):
    cache = make_feature_cache(tmp_path / "c.zarr", {"test": 2})  # recorded with no weights file: random ones
    result = CliRunner().invoke(cli.main, ["info", "--cache", str(cache)])
    assert result.exit_code == 0 and "model        fake  weights: RANDOM\n" in result.output, result.output


def test_cache_of_another_text_layer_is_refused(extracted, tiny_dataset):
    summary, cache = extracted
    assert cache.attrs["text_layer"] == 0  # the shipped tiny model's default
    with pytest.raises(UserError, match=r"another text_layer \(0 != 4\); pass --overwrite"):
        run_extract(_cfg(tiny_dataset, summary.cache, text_layer=-1))


def test_cache_without_text_layer_is_refused_with_advice(extracted, tiny_dataset):
    summary, cache = extracted
    cache.group.attrs.put({k: v for k, v in cache.attrs.items() if k != "text_layer"})  # as written before text_layer
    assert FeatureCache(summary.cache).describe()["text_layer"] is None
    with pytest.raises(UserError, match="predates --text-layer .* re-extract it with --overwrite") as err:
        run_extract(_cfg(tiny_dataset, summary.cache))
    assert "\n" not in str(err.value)


def test_text_layer_flag_reaches_the_encoder(tiny_dataset, tmp_path):
    args = ["extract", "--dataset", "manifest", "--data-root", str(tiny_dataset), "--cache", str(tmp_path / "out" / "c.zarr")]
    result = CliRunner().invoke(cli.main, args + ["--text-layer", "9"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--text-layer 9 out of range: CrossTVR-Tiny has 4 text blocks" in result.output
    assert not (tmp_path / "out").exists()  # refused before the run lock: no folder or lock files beside --cache


@pytest.mark.parametrize(("option", "value", "minimum"),
                         [("--frames", "0", "1"), ("--batch-videos", "0", "1"), ("--batch-videos", "-2", "1"),
                          ("--max-text-tokens", "0", "2"), ("--max-text-tokens", "1", "2")])
def test_out_of_range_count_is_a_usage_error(tmp_path, option, value, minimum):
    args = ["extract", "--dataset", "manifest", "--data-root", str(tmp_path), "--cache", str(tmp_path / "c.zarr")]
    result = CliRunner().invoke(cli.main, args + [option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': {value} is not in the range x>={minimum}" in result.output
    assert not (tmp_path / "c.zarr").exists()


def test_cache_of_another_video_list_is_refused(extracted, tiny_dataset):
    summary, _ = extracted
    with open(tiny_dataset / "manifest.csv", "a") as f:
        f.write("videos/clip0.mp4,a new caption,train\n")
    with pytest.raises(UserError, match="another video list or captions"):
        run_extract(_cfg(tiny_dataset, summary.cache))


def test_concurrent_shards_complete_one_store(tiny_dataset, tmp_path, extracted):
    _, single = extracted
    cache = tmp_path / "sharded.zarr"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--dataset", "manifest", "--data-root", str(tiny_dataset),
           "--cache", str(cache), "--batch-videos", "1"]
    env = subprocess_env()
    seed = "import torch, sys, runpy; torch.manual_seed(0); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    procs = [subprocess.Popen([sys.executable, "-c", seed, *cmd[1:], "--shard", f"{i}/2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    sharded = FeatureCache(cache)
    assert (sharded.video_status() == DONE).all() and (sharded.text_chunk_status() == DONE).all()
    for name in ("frame_embeds", "text_embeds", "frame_mask"):  # other batches: one video each, not two
        _close(sharded[name][:], single[name][:], default_device().type == "cuda", atol=1e-2)


def test_info_json_and_export_h5(extracted, tmp_path, caplog):
    summary, cache = extracted
    result = CliRunner().invoke(cli.main, ["info", "--cache", str(summary.cache), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["videos_done"] == facts["videos_total"] == 5 and facts["texts"] == 10 and facts["failed"] == []
    assert facts["model"] == "CrossTVR-Tiny" and facts["frames"] == 12 and facts["text_layer"] == 0
    text = CliRunner().invoke(cli.main, ["info", "--cache", str(summary.cache)])
    assert "patch tokens of block 3, text tokens after 0 text blocks" in text.output, text.output
    assert facts["pretrained"].endswith("weights/CrossTVR-Tiny.safetensors")
    assert facts["splits"] == {"test": {"videos": 2, "texts": 4}, "train": {"videos": 2, "texts": 4},
                               "val": {"videos": 1, "texts": 2}}
    assert facts["bytes"] > 0
    out = tmp_path / "features.h5"
    result = CliRunner().invoke(cli.main, ["export-h5", "--cache", str(summary.cache), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as h5:
        for name in FEATURES:
            np.testing.assert_array_equal(h5[name][:], cache[name][:])
        assert [s.decode() for s in h5["video_ids"][:]] == cache.video_ids().tolist()
        assert [s.decode() for s in h5["video_source"][:]] == [str(s) for s in cache["video_source"][:]]
        assert h5.attrs["model"] == "CrossTVR-Tiny"
    for bad, why in ((tmp_path, "is a folder"), (tmp_path / "no" / "f.h5", "its folder does not exist")):
        result = CliRunner().invoke(cli.main, ["export-h5", "--cache", str(summary.cache), "--out", str(bad)])
        assert result.exit_code == 2 and f"{bad}: {why}; pass --out" in result.output, result.output
    FeatureCache(summary.cache, mode="r+").group["video_status"][3] = PENDING
    with caplog.at_level(logging.WARNING):
        export_h5(FeatureCache(summary.cache), tmp_path / "unfinished.h5", progress=False)
    assert "1 of 5 videos are not extracted (pending or failed): their rows are zeros" in caplog.text


def test_annotations_without_any_video_are_one_line(tiny_dataset, tmp_path):
    for video in (tiny_dataset / "videos").iterdir():
        video.unlink()
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "manifest", "--data-root", str(tiny_dataset),
                                           "--cache", str(tmp_path / "out" / "c.zarr")])
    assert result.exit_code == 2 and "none of the 5 annotated videos is there (first: " in result.output
    assert not (tmp_path / "out").exists()  # no cache of nothing, and no folder or lock files for it either


def test_missing_data_root_is_one_line(tmp_path):
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "msvd", "--data-root", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "nope" in result.output and "--data-root" in result.output


@pytest.mark.parametrize("cache_option, cache", [(["--cache", "c.zarr"], "c.zarr"),
                                                  ([], "cache/synthetic/CrossTVR-Tiny.zarr")])
def test_ctrl_c_says_what_is_kept_and_how_to_continue(monkeypatch, cache_option, cache):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.extract.run_extract", interrupted)
    result = CliRunner().invoke(cli.main, ["extract", *cache_option])
    assert result.exit_code == 130
    assert result.output == (f"\ninterrupted: finished videos and caption chunks are kept in {cache}; "
                             "run the same command to continue\n")


@pytest.mark.realdata
def test_real_msvd_clips_all_extracted(tmp_path):
    root = REAL_DATA / "msvd"
    if not root.is_dir():
        pytest.skip("shared/real-data is absent")
    summary = run_extract(ExtractConfig(dataset="msvd", data_root=root, cache=tmp_path / "msvd.zarr", progress=False))
    cache = FeatureCache(summary.cache)
    facts = cache.describe()
    assert facts["videos_done"] == 5 and facts["failed"] == []
    from pipeline.safe_pickle import safe_load

    assert facts["texts"] == sum(len(v) for v in safe_load(root / "raw-captions.pkl").values())
    assert cache["frame_mask"][:].all()  # 4 to 8 s clips fill all 12 slots
    assert facts["splits"]["train"]["videos"] == 4 and facts["splits"]["test"]["videos"] == 1
