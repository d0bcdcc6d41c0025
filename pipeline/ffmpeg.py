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
def passthrough_option(exe: str) -> dict[str, str]:
    """The output option that passes frames on as decoded (no duplicates to fill time gaps): `-fps_mode` from
    ffmpeg 5.1, `-vsync` before it (ffmpeg 9 removed `-vsync`; Ubuntu 22.04 ships 4.4). Builds without a release
    number (git snapshots) are taken as recent."""
    first = subprocess.run([exe, "-version"], capture_output=True, text=True).stdout.partition("\n")[0]
    release = re.match(r"ffmpeg version n?(\d+)\.(\d+)", first)
    if release and (int(release[1]), int(release[2])) < (5, 1):
        return {"vsync": "passthrough"}
    return {"fps_mode": "passthrough"}


@functools.lru_cache(maxsize=None)
def has_filter(exe: str, name: str) -> bool:
    """Whether this ffmpeg build has the filter (zscale needs libzimg, which not every build links)."""
    listing = subprocess.run([exe, "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in listing.splitlines())
