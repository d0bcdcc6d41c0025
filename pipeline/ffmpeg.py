"""Locating the ffmpeg binary and running it through ffmpeg-python."""

from __future__ import annotations

import functools
import shutil


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The `ffmpeg` on PATH, else the static binary shipped by the imageio-ffmpeg wheel."""
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()
