"""Locating the ffmpeg binary and running it through ffmpeg-python."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The `ffmpeg` on PATH, else the static binary shipped by the imageio-ffmpeg wheel."""
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=None)
def release(exe: str) -> tuple[int, int] | None:
    """This ffmpeg's (major, minor) release; None for builds without one (git snapshots), taken as recent."""
    first = subprocess.run([exe, "-version"], capture_output=True, text=True).stdout.partition("\n")[0]
    found = re.match(r"ffmpeg version n?(\d+)\.(\d+)", first)
    return (int(found[1]), int(found[2])) if found else None


def passthrough_option(exe: str) -> dict[str, str]:
    """The output option that passes frames on as decoded (no duplicates to fill time gaps): `-fps_mode` from
    ffmpeg 5.1, `-vsync` before it (ffmpeg 9 removed `-vsync`; Ubuntu 22.04 ships 4.4)."""
    old = release(exe)
    return {"vsync": "passthrough"} if old and old < (5, 1) else {"fps_mode": "passthrough"}


def source_time_base_option(exe: str) -> dict[str, str]:
    """The output option that stamps encoded frames in the source stream's time base, not on a clock of its nominal
    frame rate (which puts a clip that changes rate on a coarse grid): `-enc_time_base demux` from ffmpeg 7, `-1`
    before it (4.2 knows only -1, 9.0 only demux; 7.0 both)."""
    old = release(exe)
    return {"enc_time_base": "-1" if old and old < (7, 0) else "demux"}


def has_filter(exe: str, name: str) -> bool:
    """Whether this ffmpeg build has the filter (zscale needs libzimg, which not every build links)."""
    return name in _listed(exe, "-filters")


def has_encoder(exe: str, name: str) -> bool:
    """Whether this ffmpeg build has the encoder (libsvtav1, libx265, ...: each an optional library)."""
    return name in _listed(exe, "-encoders")


@functools.lru_cache(maxsize=None)
def _listed(exe: str, listing: str) -> frozenset[str]:
    """The names in one of ffmpeg's listings (-filters, -encoders): each row is flags, then the name."""
    rows = subprocess.run([exe, "-hide_banner", listing], capture_output=True, text=True).stdout.splitlines()
    return frozenset(row.split()[1] for row in rows if len(row.split()) > 1)
