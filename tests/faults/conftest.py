"""Fixtures of the fault tests: one small manifest dataset and its uninterrupted caches, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_manifest_dataset
from tests.faults.harness import extract_args, run_cli


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    """Six short videos (one 3 frames long), two captions each, three splits: blocks of 2 give 3 blocks."""
    return write_manifest_dataset(tmp_path_factory.mktemp("faults") / "data",
                                  ["train", "train", "train", "val", "test", "test"], [14, 15, 16, 17, 18, 3], h=32, w=40)


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
