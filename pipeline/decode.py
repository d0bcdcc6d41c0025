"""Decoding: ffmpeg samples frames uniformly over a video and returns them resized and center-cropped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from pipeline.ffmpeg import ffmpeg_exe, passthrough_option


class DecodeError(Exception):
    """A video that cannot be decoded; the message is the reason recorded in the cache."""


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames [T, S, S, 3] uint8 RGB, and which of the T slots hold a real frame."""

    frames: np.ndarray
    mask: np.ndarray


def count_frames(path: Path) -> int:
    """Number of packets (frames) in the first video stream, counted by demuxing without decoding.

    The framecrc muxer writes one line per packet to stdout; ffmpeg's own "frame=" stats line is not used, as
    ffmpeg 7.0 leaves the count out of it when the stream is copied.
    """
    stream = ffmpeg.input(str(path)).output("-", map="0:v:0", c="copy", f="framecrc")
    try:
        out, _ = stream.run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        raise DecodeError(_reason(e.stderr)) from None
    return sum(1 for line in out.splitlines() if line and not line.startswith(b"#"))


def sample_indices(n_available: int, n_frames: int) -> list[int]:
    """Indices of n_frames frames spread uniformly (segment centres) over n_available frames."""
    if n_available <= n_frames:
        return list(range(n_available))
    return [int((i + 0.5) * n_available / n_frames) for i in range(n_frames)]


def decode_video(path: Path, n_frames: int, size: int) -> DecodedVideo:
    """Decode n_frames frames sampled uniformly, resized (shorter side) and center-cropped to size."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError("file not found")
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    wanted = sample_indices(count_frames(path), n_frames)
    if not wanted:
        raise DecodeError("no decodable video frames")
    select = "+".join(f"eq(n,{i})" for i in wanted)  # ffmpeg-python escapes the commas
    exe = ffmpeg_exe()
    stream = (
        ffmpeg.input(str(path), threads=1)
        .video.filter("select", select)
        .filter("scale", size, size, force_original_aspect_ratio="increase", flags="bicubic")
        .filter("crop", size, size)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None, **passthrough_option(exe))
    )
    try:
        out, _ = stream.run(cmd=exe, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        raise DecodeError(_reason(e.stderr)) from None
    frame_bytes = size * size * 3
    n_got = min(len(out) // frame_bytes, n_frames)
    if n_got == 0:
        raise DecodeError("no decodable video frames")
    frames = np.zeros((n_frames, size, size, 3), dtype=np.uint8)
    frames[:n_got] = np.frombuffer(out[: n_got * frame_bytes], dtype=np.uint8).reshape(n_got, size, size, 3)
    mask = np.zeros(n_frames, dtype=bool)
    mask[:n_got] = True
    return DecodedVideo(frames=frames, mask=mask)


def _reason(stderr: bytes | None) -> str:
    """The most telling line of ffmpeg's stderr, e.g. 'Invalid data found when processing input'."""
    lines = [ln.strip() for ln in (stderr or b"").decode("utf-8", "replace").splitlines() if ln.strip()]
    for key in ("matches no streams", "Invalid data", "moov atom not found", "No such file", "Permission denied"):
        for ln in lines:
            if key in ln:
                return "no video stream" if key == "matches no streams" else ln.split(": ", 1)[-1]
    return lines[-1] if lines else "ffmpeg failed"
