"""A cache damaged on disk: `info --verify` names what is damaged, `extract --repair` redoes exactly that,
and training on a damaged cache stops with one line naming the video and the fix."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
from click.testing import CliRunner

import cli
from pipeline.cache import ARRAYS, RECORD_ARRAYS, FeatureCache
from pipeline.errors import UserError
from tests.conftest import make_feature_cache
from tests.faults.harness import assert_same_cache, chunk_files, extract_args, run_cli


@pytest.fixture
def copy(reference, tmp_path):
    path = tmp_path / "c.zarr"
    shutil.copytree(reference, path)
    return path


def _info(cache, *extra):
    return CliRunner().invoke(cli.main, ["info", "--cache", str(cache), *extra])


def test_damaged_chunk_is_found_and_only_its_video_redone(fault_data, reference, copy, tmp_path):
    victim = copy / "patch_tokens" / "c" / "2" / "0" / "0" / "0"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: blosc refuses it
    (copy / "text_embeds" / "c" / "0" / "0").write_bytes(b"\x00garbage")
    assert "damaged" not in json.loads(_info(copy, "--json").output)  # plain info stays fast: no chunk reads

    result = _info(copy, "--verify", "--json")
    assert result.exit_code == 1
    damaged = json.loads(result.stdout)["damaged"]  # the progress bars go to stderr
    assert "verify videos: 100%" in result.stderr
    assert [d.get("video") for d in damaged] == ["videos/clip2.mp4", None]
    assert damaged[1]["text_chunk"] == 0 and "text_embeds" in damaged[1]["reason"]
    text = _info(copy, "--verify").output
    assert "damaged      videos/clip2.mp4: patch_tokens chunk c/2/0/0/0 unreadable" in text and "--repair" in text

    before = chunk_files(copy)
    log = tmp_path / "repair.log"
    assert run_cli(extract_args(fault_data, copy, "--repair"), log=log) == 0, log.read_text()[-3000:]
    assert "repaired 2 damaged" in log.read_text()
    after = chunk_files(copy)
    changed = {k for k in before if after.get(k) != before[k]}
    # Only video 2's chunks and the caption chunk were written again; every other chunk file is untouched.
    video_2 = {f"{a}/c/2{tail}" for a, tail in (("patch_tokens", "/0/0/0"), ("cls_tokens", "/0/0"),
                                               ("frame_embeds", "/0/0"), ("frame_mask", "/0"), ("video_source", ""),
                                               ("video_status", ""))}
    assert changed == video_2 | {"text_tokens/c/0/0/0", "text_embeds/c/0/0", "text_chunk_status/c/0"}, changed
    assert_same_cache(copy, reference)
    assert _info(copy, "--verify").exit_code == 0


def test_missing_chunk_and_unreadable_status_are_found(fault_data, reference, copy, tmp_path):
    (copy / "frame_embeds" / "c" / "4" / "0" / "0").unlink()  # would silently read back as zeros
    (copy / "video_status" / "c" / "1").write_bytes(b"")  # a torn flag
    facts = FeatureCache(copy).describe(verify=True)
    assert {d["video"]: d["reason"] for d in facts["damaged"]} == {
        "videos/clip1.mp4": "video_status chunk unreadable",
        "videos/clip4.mp4": "frame_embeds chunk c/4/0/0 missing",
    }
    log = tmp_path / "repair.log"
    assert run_cli(extract_args(fault_data, copy, "--repair"), log=log) == 0, log.read_text()[-3000:]
    assert_same_cache(copy, reference)


def test_torn_flags_are_redone_by_a_plain_rerun(fault_data, reference, copy, tmp_path):
    # a kill while a flag is written leaves it empty: it reads as pending, so the same command simply redoes it
    (copy / "video_status" / "c" / "3").write_bytes(b"")
    (copy / "text_chunk_status" / "c" / "0").write_bytes(b"")
    facts = FeatureCache(copy).describe()
    assert (facts["videos_done"], facts["text_chunks_done"]) == (5, 0)
    log = tmp_path / "rerun.log"
    assert run_cli(extract_args(fault_data, copy), log=log) == 0, log.read_text()[-3000:]
    assert_same_cache(copy, reference)
    assert (copy / "video_status" / "c" / "3").stat().st_size > 0


def _export(cache, out):
    return CliRunner().invoke(cli.main, ["export-h5", "--cache", str(cache), "--out", str(out)])


def test_export_of_a_damaged_cache_is_one_line_and_leaves_no_file(copy, tmp_path):
    victim = copy / "patch_tokens" / "c" / "3" / "0" / "0" / "0"
    victim.write_bytes(victim.read_bytes()[:100])
    result = _export(copy, tmp_path / "x.h5")
    error = result.output.splitlines()[-1]  # after the progress bar
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "patch_tokens rows 3..3 do not read back" in error and "--repair" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]  # neither x.h5 nor its partial file


def test_export_refuses_a_path_inside_the_cache(copy, reference):
    result = _export(copy, copy / "zarr.json")
    assert result.exit_code == 2 and "lies inside the cache" in result.output, result.output
    assert_same_cache(copy, reference)
    assert FeatureCache(copy).verify() == []


def test_export_on_a_full_disk_is_one_line_and_leaves_no_file(copy, tmp_path, monkeypatch):
    out = tmp_path / "x.h5"
    monkeypatch.setattr("shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    result = _export(copy, out)
    assert result.exit_code == 2 and "MB are free there" in result.output, result.output
    monkeypatch.undo()

    def full(self, key, value):  # the space runs out while the features are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("h5py.Dataset.__setitem__", full)
    result = _export(copy, out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1].startswith(f"error: {out}: could not write it (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


@pytest.mark.parametrize("damage", [
    {"video_ids/c/0": "truncate", "captions/c/0": "delete"},  # a deleted chunk would read back as "" everywhere
    {"text_lengths/c/0": "delete", "text_video/c/0": "truncate", "video_paths/c/0": "delete"},
    {"video_split/c/0": "delete"},
])
def test_damaged_annotation_arrays_are_found_and_written_again(fault_data, reference, copy, tmp_path, damage):
    for key, how in damage.items():
        chunk = copy / key
        chunk.unlink() if how == "delete" else chunk.write_bytes(chunk.read_bytes()[:5])
    truncated = next((k.split("/")[0] for k, how in damage.items() if how == "truncate"), None)
    result = _info(copy, "--verify")
    if truncated:  # read by plain info too: one line naming the array and the fix
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert f"{truncated} does not read back" in result.output and "--repair" in result.output
    else:
        assert result.exit_code == 1
        assert f"damaged      {', '.join(RECORD_ARRAYS)}: video_ids, video_split, captions or text_video differ" \
            in result.output, result.output
    assert FeatureCache(copy).verify()[0]["records"] == list(RECORD_ARRAYS)
    log = tmp_path / "repair.log"
    assert run_cli(extract_args(fault_data, copy, "--repair"), log=log) == 0, log.read_text()[-3000:]
    assert "repaired 0 damaged video(s)/caption chunk(s), and wrote the annotations' arrays again" in log.read_text()
    assert_same_cache(copy, reference)
    for name in RECORD_ARRAYS:
        assert FeatureCache(copy)[name][:].tolist() == FeatureCache(reference)[name][:].tolist(), name
    assert _info(copy, "--verify").exit_code == 0


def test_a_missing_array_is_one_line(copy):
    assert sorted(name for name, _ in FeatureCache(copy).group.arrays()) == sorted(ARRAYS)
    (copy / "video_status" / "zarr.json").unlink()
    for args in ([], ["--verify"]):
        result = _info(copy, *args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "video_status/zarr.json: missing" in result.output and "--overwrite" in result.output
    result = _export(copy, copy.parent / "x.h5")  # it wrote a file without the array before
    assert result.exit_code == 2 and "video_status/zarr.json: missing" in result.output
    assert not (copy.parent / "x.h5").exists()


def test_repair_with_shards_is_refused(fault_data, copy):
    result = CliRunner().invoke(cli.main, [str(a) for a in extract_args(fault_data, copy, "--repair", "--shard", "0/2")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "without --shard" in result.output


@pytest.mark.parametrize("meta", ["zarr.json", "patch_tokens/zarr.json"])
def test_damaged_metadata_is_one_line(copy, meta):
    (copy / meta).write_text('{"zarr_format": 3, "node_type": ')  # truncated JSON
    for args in (["--json"], ["--verify"]):
        result = _info(copy, *args)
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "damaged" in result.output and "--overwrite" in result.output
        assert "Traceback" not in result.output
    if meta != "zarr.json":
        assert "patch_tokens/zarr.json" in result.output


def test_training_on_a_damaged_cache_names_the_video(tmp_path):
    from reranker.train import TrainConfig, train

    cache = make_feature_cache(tmp_path / "c.zarr", {"train": 8, "val": 4})
    (cache / "frame_embeds" / "c" / "3" / "0" / "0").write_bytes(b"not blosc")
    cfg = TrainConfig(cache=str(cache), run=str(tmp_path / "run"), epochs=1, batch_size=4, hard_negatives=1,
                      neighbour_negatives=0, dim=16, heads=2, n_queries=2, top_k=3)
    with pytest.raises(UserError) as e:
        train(cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message and "train3" in message and "--repair" in message and str(cache) in message


def test_a_long_reason_for_a_damaged_chunk_is_cut_visibly(tmp_path):
    from reranker.train import TrainConfig, train

    cache = make_feature_cache(tmp_path / "c.zarr", {"train": 8, "val": 4})
    header = bytes([2, 1, 0x21, 4]) + struct.pack("<III", 4_000_000_000, 0, 4_000_000_000)  # sizes no chunk has
    (cache / "frame_embeds" / "c" / "3" / "0" / "0").write_bytes(header)
    cfg = TrainConfig(cache=str(cache), run=str(tmp_path / "run"), epochs=1, batch_size=4, hard_negatives=1,
                      neighbour_negatives=0, dim=16, heads=2, n_queries=2, top_k=3)
    with pytest.raises(UserError) as e:
        train(cfg, progress=False)
    reason = re.search(r"cannot be read \((.*)\); run `python cli.py info --verify", str(e.value))[1]
    # 129 characters, "... raw, expected 64 raw)": cut at 120 it ended "raw, expecte" with nothing to say it was cut
    assert reason.startswith("frame_embeds/c/3/0/0: damaged Blosc chunk (16 bytes on disk, header says 4000000000 ")
    assert len(reason) == 120 and reason.endswith("..."), reason
