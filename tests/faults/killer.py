"""Test-only wrapper: run `cli.py` with one fault planted, so the library itself carries no test hooks.

    python tests/faults/killer.py FAULT LOG -- extract --dataset manifest ...

FAULT (counts start at 1 and are per process):
    none          no fault
    partial:K     inside the K-th durable write, after half its bytes reached the temp file: SIGKILL
    after:K       right after the K-th durable write is on disk (renamed, directory fsync-ed): SIGKILL
    video:J       right after the J-th video of this run is marked done: SIGKILL
    text:J        right after the J-th caption chunk of this run is marked done: SIGKILL
    enospc:K      the K-th and every later durable write raise OSError(ENOSPC) (disk full)
    eacces:K      the same with OSError(EACCES) (permission denied)
    count         no fault; print each durable write (`DURABLE_WRITE n path`) and their number on exit

The tests run `main` in processes forked from a multiprocessing forkserver that has already imported
torch and the CLI, so each killed run starts in milliseconds instead of seconds.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cli  # noqa: E402
import pipeline.cache  # noqa: E402
from pipeline.cache import FeatureCache  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> dict:
    """Plant FAULT (see the module docstring) by monkeypatching the cache module of this process."""
    if fault == "none":
        return {}
    kind, _, arg = fault.partition(":")
    k = int(arg) if arg else 0
    lock = threading.Lock()
    count = {"n": 0}
    original_write = pipeline.cache._durable_write

    def tick() -> int:
        with lock:
            count["n"] += 1
            return count["n"]

    if kind == "count":
        def counting(path, data):
            print(f"DURABLE_WRITE {tick()} {path.parent.name}/{path.name}", flush=True)
            original_write(path, data)

        pipeline.cache._durable_write = counting
    elif kind in ("partial", "after"):
        def killing(path, data):
            n = tick()
            if n == k and kind == "partial":
                # What a kill in the middle of f.write leaves: a half-written temp file, no rename.
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.with_name(f".{path.name}.killed.partial"), "wb") as f:
                    raw = memoryview(data).tobytes()
                    f.write(raw[: max(1, len(raw) // 2)])
                _die()
            original_write(path, data)
            if n == k:
                _die()

        pipeline.cache._durable_write = killing
    elif kind in ("enospc", "eacces"):
        code = errno.ENOSPC if kind == "enospc" else errno.EACCES

        def failing(path, data):
            if tick() >= k:
                raise OSError(code, os.strerror(code), str(path))
            original_write(path, data)

        pipeline.cache._durable_write = failing
    elif kind in ("video", "text"):
        name = "write_video" if kind == "video" else "write_text_chunk"
        original = getattr(FeatureCache, name)

        def then_die(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if tick() == k:
                _die()

        setattr(FeatureCache, name, then_die)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return count


def main(fault: str, log: str | None, args: list[str]) -> None:
    """Run `cli.py ARGS` with FAULT planted; stdout and stderr go to LOG when given."""
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    count = install(fault)
    torch.manual_seed(0)  # the random-init tiny encoder gets the same weights in every run
    try:
        cli.main(args, prog_name="cli.py")
    finally:
        if fault == "count":
            print(f"DURABLE_WRITES {count['n']}", flush=True)


if __name__ == "__main__":
    fault, log, sep, *rest = sys.argv[1:]
    assert sep == "--", "usage: killer.py FAULT LOG -- CLI ARGS"
    main(fault, None if log == "-" else log, rest)
