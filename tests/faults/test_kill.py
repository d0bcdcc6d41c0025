"""SIGKILL during extraction, at chosen and at random moments, alone and beside a second shard.

Every killed run must leave only work that reads back exactly as an uninterrupted run's (nothing
half-written marked done), and re-running must finish with a cache bit-equal to the uninterrupted one.
"""

from __future__ import annotations

import random

import pytest

from pipeline.cache import DONE, PENDING, FeatureCache
from tests.faults.harness import (
    KILLED,
    assert_finished_work_is_right,
    assert_same_cache,
    chunk_files,
    extract_args,
    run_cli,
    start_cli,
)

# Durable writes of one run over the fault dataset: 42 while creating the store (in a temp folder),
# then 3 for the caption chunk (tokens, embeddings, status), then 6 per video (4 arrays, the file's
# source record, then status).
KILL_CHAIN = [
    ("partial:10", "torn array metadata while creating the store"),
    ("after:43", "caption data on disk, caption chunk not yet marked done"),
    ("partial:6", "torn patch/frame chunk of the first video"),
    ("video:3", "after a video is done, half-way through a block"),
    ("partial:6", "torn write of the done flag itself"),
    ("after:7", "between two arrays of one video"),
]


def _log_tail(log) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def test_kill_at_six_points_then_resume_equals_uninterrupted(fault_data, reference, tmp_path):
    cache, log = tmp_path / "killed.zarr", tmp_path / "run.log"
    args = extract_args(fault_data, cache)
    for fault, what in KILL_CHAIN:
        assert run_cli(args, fault, log) == KILLED, f"{fault} ({what}) did not fire\n{_log_tail(log)}"
        if (cache / "zarr.json").exists():
            assert_finished_work_is_right(cache, reference)
        else:
            assert fault == "partial:10" and list(tmp_path.glob(".killed.zarr.*.tmp"))  # never a half-made store
    assert any(cache.rglob(".*.partial"))  # the torn writes really left half-written temp files behind
    assert run_cli(args, "none", log) == 0, _log_tail(log)
    assert_same_cache(cache, reference)
    assert not list(tmp_path.glob(".killed.zarr.*.tmp"))  # the stale half-made store was cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 4, 5])
def test_kill_at_random_moments_then_resume(fault_data, reference, tmp_path, seed):
    rng = random.Random(seed)
    cache, log = tmp_path / "killed.zarr", tmp_path / "run.log"
    args = extract_args(fault_data, cache)
    kills = []
    while len(kills) < 6:
        kind = rng.choice(["partial", "after", "partial", "after", "video"])
        # A fresh run makes 81 writes, a resumed one at most 39 (the store exists): draw within what is left.
        fresh = not (cache / "zarr.json").exists()
        fault = f"{kind}:{rng.randint(1, 6 if fresh else 3) if kind == 'video' else rng.randint(1, 81 if fresh else 30)}"
        code = run_cli(args, fault, log)
        if code == 0:
            break  # the kill point lay beyond what was left to do: this run finished
        assert code == KILLED, _log_tail(log)
        kills.append(fault)
        if (cache / "zarr.json").exists():
            assert_finished_work_is_right(cache, reference)
    assert run_cli(args, "none", log) == 0, _log_tail(log)
    assert_same_cache(cache, reference)
    assert kills, "no kill fired"
    print(f"seed {seed}: killed at {', '.join(kills)}")


def test_two_shards_at_once_one_killed_then_rerun(fault_data, sharded_reference, tmp_path):
    cache, log = tmp_path / "sharded.zarr", tmp_path / "run.log"
    shard0 = start_cli(extract_args(fault_data, cache, "--shard", "0/2"), "video:2", tmp_path / "shard0.log")
    shard1 = start_cli(extract_args(fault_data, cache, "--shard", "1/2"), "none", tmp_path / "shard1.log")
    shard0.join(180)
    shard1.join(180)
    assert shard0.exitcode == KILLED, _log_tail(tmp_path / "shard0.log")
    assert shard1.exitcode == 0, _log_tail(tmp_path / "shard1.log")
    status = FeatureCache(cache).video_status()
    assert (status[1::2] == DONE).all() and (status[0::2] == DONE).sum() == 2 and (status == PENDING).sum() == 1
    assert_finished_work_is_right(cache, sharded_reference)

    shard1_chunks = {k: t for k, t in chunk_files(cache).items() if _video_index(k) in (1, 3, 5)}
    assert len(shard1_chunks) == 3 * 6  # 4 feature arrays, the source record and the status of each of its 3 videos
    assert run_cli(extract_args(fault_data, cache, "--shard", "0/2"), "none", log) == 0, _log_tail(log)
    after = chunk_files(cache)
    assert {k: after[k] for k in shard1_chunks} == shard1_chunks  # the re-run rewrote none of shard 1's work
    assert_same_cache(cache, sharded_reference)
    assert (FeatureCache(cache).video_status() == DONE).all()


def _video_index(key: str) -> int | None:
    """Video index of a per-video chunk file such as 'patch_tokens/c/3/0/0/0', else None."""
    parts = key.split("/")
    per_video = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask", "video_source", "video_status", "video_error")
    return int(parts[2]) if parts[0] in per_video and len(parts) > 2 and parts[1] == "c" else None
