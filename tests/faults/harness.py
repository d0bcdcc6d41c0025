"""Helpers of the fault tests: run the CLI with a planted fault in a fresh process, compare caches."""

from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureCache

FEATURES = ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask", "text_tokens", "text_lengths", "text_embeds",
            "video_status", "text_chunk_status", "video_error")
KILLED = -signal.SIGKILL

_ctx = multiprocessing.get_context("forkserver")
# The server imports torch and the CLI once; every run forks from it (a process that never ran torch ops).
_ctx.set_forkserver_preload(["tests.faults.killer"])


def run_cli(args: list[str], fault: str = "none", log: Path | None = None, timeout: float = 180) -> int:
    """Exit code of `cli.py ARGS` run with FAULT in a fresh process (-9 when it SIGKILLed itself)."""
    from tests.faults import killer

    p = _ctx.Process(target=killer.main, args=(fault, str(log) if log else None, [str(a) for a in args]))
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise TimeoutError(f"cli.py {' '.join(map(str, args))} with fault {fault} ran past {timeout} s")
    return p.exitcode


def start_cli(args: list[str], fault: str = "none", log: Path | None = None):
    """Start `cli.py ARGS` with FAULT in a fresh process and return it (join it yourself)."""
    from tests.faults import killer

    p = _ctx.Process(target=killer.main, args=(fault, str(log) if log else None, [str(a) for a in args]))
    p.start()
    return p


def extract_args(data: Path, cache: Path, *extra: str) -> list[str]:
    """`extract` over a manifest dataset with the random-init tiny encoder, in blocks of 2 videos."""
    return ["extract", "--dataset", "manifest", "--data-root", data, "--cache", cache, "--pretrained", "random",
            "--batch-videos", "2", "--workers", "2", *extra]


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every feature and status array of a cache."""
    c = FeatureCache(path)
    return {name: c[name][:] for name in FEATURES}


def assert_same_cache(got: Path, want: Path) -> None:
    """Bit-equal arrays (features, masks, statuses, errors)."""
    a, b = arrays(got), arrays(want)
    for name in FEATURES:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def chunk_files(path: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every chunk file (metadata and temp files excluded)."""
    return {str(f.relative_to(path)): f.stat().st_mtime_ns for f in path.rglob("*")
            if f.is_file() and f.name != "zarr.json" and not f.name.startswith(".")}


def assert_finished_work_is_right(got: Path, want: Path) -> None:
    """Whatever a cache marks done (videos, failures, caption chunks) reads back and equals the reference bit for bit."""
    g, w = FeatureCache(got), FeatureCache(want)
    assert g.verify() == [], g.verify()
    status = g.video_status()
    for v in np.flatnonzero(status != 0):
        assert status[v] == w.video_status()[v]
        for name in ("patch_tokens", "cls_tokens", "frame_embeds", "frame_mask", "video_error"):
            np.testing.assert_array_equal(g[name][v], w[name][v], err_msg=f"{name}[{v}]")
    for c in np.flatnonzero(g.text_chunk_status() != 0):
        lo, hi = g.text_chunk_range(c)
        for name in ("text_tokens", "text_embeds"):
            np.testing.assert_array_equal(g[name][lo:hi], w[name][lo:hi], err_msg=f"{name}[{lo}:{hi}]")
