"""Disk full (ENOSPC) and permission denied (EACCES) while writing the cache.

The CLI must stop with one line naming the cache and the fix (exit 2, no traceback), keep every
finished video, and resume to the uninterrupted result once the disk is writable again. Tests run as
root, which chmod cannot stop, so the error is planted in `pipeline.cache._durable_write` (the one
function every cache write goes through); a real read-only folder is also tried when not root.
"""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

import cli
from pipeline.cache import DONE, FeatureCache
from tests.faults.harness import assert_finished_work_is_right, assert_same_cache, extract_args, run_cli

# Writes of a run: 42 while creating the store, 3 for the caption chunk, then 6 per video (4 arrays, the
# source record, the done flag). 5: while creating the store; 43: the caption chunk; 52: the second video;
# 69: the fourth video's done flag; 58: the third video.
POINTS = [("enospc", 5), ("enospc", 43), ("enospc", 52), ("enospc", 69), ("eacces", 5), ("eacces", 58)]
MESSAGES = {"enospc": "No space left on device", "eacces": "Permission denied"}


@pytest.mark.parametrize("kind, k", POINTS)
def test_write_error_is_one_line_and_resume_completes(fault_data, reference, tmp_path, kind, k):
    cache, log = tmp_path / "c.zarr", tmp_path / "run.log"
    args = extract_args(fault_data, cache)
    assert run_cli(args, f"{kind}:{k}", log) == 2, log.read_text()
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert "Traceback" not in text and len(errors) == 1, text[-3000:]
    assert str(cache) in errors[0] and MESSAGES[kind] in errors[0] and "re-run the same command" in errors[0]
    if (cache / "zarr.json").exists():
        assert_finished_work_is_right(cache, reference)
        if k >= 52:
            assert (FeatureCache(cache).video_status() == DONE).sum() >= 1  # finished videos are kept
    assert run_cli(args, "none", log) == 0, log.read_text()[-3000:]
    assert_same_cache(cache, reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the planted EACCES above covers it")
def test_read_only_cache_folder(fault_data, reference, tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(reference, cache)
    FeatureCache(cache).mark_pending([{"video": "", "index": 2}])
    for d in [cache, *[p for p in cache.rglob("*") if p.is_dir()]]:
        d.chmod(0o555)
    try:
        result = CliRunner().invoke(cli.main, [str(a) for a in extract_args(fault_data, cache)])
    finally:
        for d in [cache, *[p for p in cache.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
    assert result.exit_code == 2 and "Permission denied" in result.output and "Traceback" not in result.output
