"""Fixtures of the fault tests: one small manifest dataset and its uninterrupted caches, built once per session."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import noise_frames, write_video
from tests.faults.harness import extract_args, run_cli


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    """Six short videos (one 3 frames long), two captions each, three splits: blocks of 2 give 3 blocks."""
    root = tmp_path_factory.mktemp("faults") / "data"
    rows = []
    for i, split in enumerate(["train", "train", "train", "val", "test", "test"]):
        write_video(root / "videos" / f"clip{i}.mp4", noise_frames(3 if i == 5 else 14 + i, seed=i, h=32, w=40))
        rows += [(f"videos/clip{i}.mp4", f"clip number {i} with noise", split),
                 (f"videos/clip{i}.mp4", f"another caption for clip {i}", split)]
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "split"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def reference(fault_data, tmp_path_factory) -> Path:
    """The cache of one uninterrupted run (the same CLI wrapper, no fault)."""
    path = tmp_path_factory.mktemp("reference") / "ref.zarr"
    assert run_cli(extract_args(fault_data, path), log=path.with_suffix(".log")) == 0, path.with_suffix(".log").read_text()
    return path


@pytest.fixture(scope="session")
def sharded_reference(fault_data, tmp_path_factory) -> Path:
    """The cache of `--shard 0/2` then `--shard 1/2`, uninterrupted (shards batch their own videos)."""
    path = tmp_path_factory.mktemp("reference") / "sharded.zarr"
    for shard in ("0/2", "1/2"):
        assert run_cli(extract_args(fault_data, path, "--shard", shard), log=path.with_suffix(".log")) == 0
    return path
