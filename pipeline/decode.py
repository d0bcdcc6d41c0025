"""Decoding: ffmpeg samples frames uniformly over a video and returns them resized and center-cropped."""

from __future__ import annotations

import bisect
import logging
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from pipeline.ffmpeg import ffmpeg_exe, has_filter, passthrough_option, source_time_base_option

log = logging.getLogger(__name__)


# framecrc lines: stream, dts, pts, duration, size, checksum, then flags unless the packet is only a keyframe
_PACKET = re.compile(rb"\d+, *(-?\d+), *(-?\d+), *(-?\d+), *\d+, *0x[0-9a-f]+(?:, F=0x([0-9A-F]+))?")
_NOPTS = -(2**63)  # AV_NOPTS_VALUE
_DISCARD = 0x4  # AV_PKT_FLAG_DISCARD
# ffmpeg's description of an input video stream, e.g. "Video: h264 (...), yuv420p10le(tv, bt2020nc/bt2020/arib-std-b67, ..."
_VIDEO_LINE = re.compile(r"Stream #\d+:\d+.*: Video: (?!.*\(attached pic\))(.*)")
# HDR transfers (PQ, HLG): to SDR through linear light, primaries to BT.709, then mobius, which keeps what lies in the
# SDR range nearly as it is and rolls off the highlights above it (a player tone-maps likewise)
_HDR = ("smpte2084", "arib-std-b67")
_TONE_MAP = (("zscale", {"t": "linear", "npl": 100}), ("format", {"pix_fmts": "gbrpf32le"}), ("zscale", {"p": "bt709"}),
             ("tonemap", {"tonemap": "mobius"}), ("zscale", {"t": "bt709", "m": "bt709", "r": "tv"}),
             ("format", {"pix_fmts": "yuv420p"}))


class DecodeError(Exception):
    """A video that cannot be decoded; the message is the reason recorded in the cache."""


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames [T, S, S, 3] uint8 RGB, and which of the T slots hold a real frame."""

    frames: np.ndarray
    mask: np.ndarray


# The first video stream that is not an attached picture: cover art (MP4 'covr', an audio file's album art) is a
# one-frame stream that ffmpeg may list before the real video, and an audio file with cover art has no video at all.
VIDEO_STREAM = "V:0"


@dataclass(frozen=True)
class Timeline:
    """The video stream's frame timestamps (ascending, in ticks of one time base), how long its last frame lasts
    (0 when the container does not say), and whether it is HDR (a PQ or HLG transfer)."""

    times: list[int]
    last_duration: int
    hdr: bool


def frame_times(path: Path, decode: bool = False) -> list[int]:
    """Timestamps (ascending, in ticks of one time base) of the frames the decoder outputs for the video stream."""
    return _demux(path, decode).times


def _demux(path: Path, decode: bool = False) -> Timeline:
    """The video stream's Timeline; HDR is read from ffmpeg's stream description.

    The framecrc muxer writes one line per packet to stdout; ffmpeg's own "frame=" stats line is not used, as
    ffmpeg 7.0 leaves the count out of it when the stream is copied. By default the packets are only demuxed, which
    is cheap, and those flagged discard (cut by an MP4 edit list) are left out; decode=True decodes them at a tiny
    size instead, for streams whose packets and frames differ otherwise (packets the decoder rejects, field-coded
    H.264), stamped in the stream's own time base as the packets are.
    """
    exe = ffmpeg_exe()
    if decode:
        stream = (
            ffmpeg.input(str(path), threads=1)[VIDEO_STREAM]
            .filter("scale", 8, 8)
            .output("-", f="framecrc", vcodec="rawvideo", pix_fmt="gray", **passthrough_option(exe),
                    **source_time_base_option(exe))
        )
    else:
        stream = ffmpeg.input(str(path)).output("-", map=f"0:{VIDEO_STREAM}", c="copy", f="framecrc")
    out, err = _run(stream, exe)
    video = _VIDEO_LINE.search(err.decode("utf-8", "replace"))
    hdr = bool(video) and any(transfer in video[1] for transfer in _HDR)
    packets = [(int(m[1]), int(m[2]), int(m[3])) for m in map(_PACKET.match, out.splitlines())
               if m and not int(m[4] or b"0", 16) & _DISCARD]  # (dts, pts, duration)
    # Without a presentation timestamp on every packet (H.264 in AVI; MPEG-PS, which stamps only some), every
    # packet is timed by its decoding timestamp: one clock for all, where mixing the two put B-frames at the times
    # of others and pulled a constant-frame-rate clip off its sample points.
    by_dts = any(pts == _NOPTS for _, pts, _ in packets)
    timed = sorted((dts if by_dts else pts, duration) for dts, pts, duration in packets)
    if len({t for t, _ in timed}) < len(timed):
        # Frames that share a time: the muxer packed several small frames under one timestamp (MPEG-PS) and the rest
        # were guessed, several at one time and then a gap. Such times are no clock: the frames are taken as evenly
        # spaced, which the video of such streams is (MPEG-1/2 have no variable frame rate).
        return Timeline(list(range(len(timed))), 1, hdr)
    return Timeline([t for t, _ in timed], max(timed[-1][1], 0) if timed else 0, hdr)


def sample_indices(times: Sequence[int], n_frames: int, last_duration: int = 0) -> list[int]:
    """Indices of the frames on screen at the centres of n_frames equal segments of the clip's duration.

    times are the frames' timestamps in ascending order; the last frame lasts last_duration ticks (a GIF may hold
    it for seconds), or as long as the one before it when that is 0 (unknown). A frame already taken gives way to
    the next one. All frames when there are no more than n_frames.
    """
    n = len(times)
    if n <= n_frames:
        return list(range(n))
    last = last_duration or times[-1] - times[-2]
    if _evenly_spaced(times) and abs(last * (n - 1) - (times[-1] - times[0])) <= n - 1:
        # constant frame rate: indices are exact where timestamps may be rounded (to 1 ms in mkv)
        times, last = range(n), 1
    start, span = times[0], times[-1] + last - times[0]
    scaled = [2 * n_frames * (t - start) for t in times]  # integers, so that a centre on a frame boundary is exact
    picked: list[int] = []
    for i in range(n_frames):
        on_screen = bisect.bisect_right(scaled, (2 * i + 1) * span) - 1
        picked.append(min(max(on_screen, picked[-1] + 1 if picked else 0), n - n_frames + i))
    return picked


def decode_video(path: Path, n_frames: int, size: int) -> DecodedVideo:
    """Decode n_frames frames sampled uniformly in time, resized (shorter side) and center-cropped to size."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a device would block ffmpeg's read (or never end)
        raise DecodeError("not a regular file" if path.exists() else "file not found")
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    timeline = _demux(path)
    n = len(timeline.times)
    wanted = sample_indices(timeline.times, n_frames, timeline.last_duration)
    # the last frame counted comes along as a witness that the decoder outputs every frame counted
    witness = [n - 1] if wanted and wanted[-1] < n - 1 else []
    frames = _select_frames(path, wanted + witness, size, timeline.hdr)
    if len(frames) < len(wanted) + len(witness) and len(wanted) < n:
        # fewer frames came out than packets were counted: sample again over the frames the decoder outputs
        decoded = _demux(path, decode=True)
        wanted = sample_indices(decoded.times, n_frames, decoded.last_duration)
        frames = _select_frames(path, wanted, size, timeline.hdr)
    n_got = min(len(frames), len(wanted))
    if n_got == 0:
        raise DecodeError("no decodable video frames")
    padded = np.zeros((n_frames, size, size, 3), dtype=np.uint8)
    padded[:n_got] = frames[:n_got]
    mask = np.zeros(n_frames, dtype=bool)
    mask[:n_got] = True
    return DecodedVideo(frames=padded, mask=mask)


def _evenly_spaced(times: Sequence[int]) -> bool:
    """Whether timestamps are those of a constant frame rate: each within one tick of the line through the ends."""
    n, span = len(times) - 1, times[-1] - times[0]
    return all(abs((t - times[0]) * n - k * span) <= n for k, t in enumerate(times))


def _select_frames(path: Path, indices: list[int], size: int, hdr: bool = False) -> np.ndarray:
    """The frames [K, S, S, 3] at these indices of the decoder's output, resized and cropped; fewer if it has fewer.
    hdr: tone-mapped to SDR first, as players show them (a straight conversion leaves them dull and dark)."""
    if not indices:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    select = "+".join(f"eq(n,{i})" for i in indices)  # ffmpeg-python escapes the commas
    exe = ffmpeg_exe()
    stream = ffmpeg.input(str(path), threads=1)[VIDEO_STREAM].filter("select", select)
    if hdr and has_filter(exe, "zscale"):
        for name, options in _TONE_MAP:
            stream = stream.filter(name, **options)
    elif hdr:
        log.warning("%s: HDR video, but %s has no zscale filter (libzimg) to tone-map it: its colours come out dull",
                    path, exe)
    stream = (
        stream
        # Non-square pixels (DVD, DV, anamorphic HD) to the shape players show, before the crop; with square pixels
        # (or none recorded) this scale keeps the size and ffmpeg passes the frames through untouched.
        .filter("scale", "if(eq(sar,1),iw,round(iw*sar))", "ih", flags="bicubic")
        .filter("scale", size, size, force_original_aspect_ratio="increase", flags="bicubic")
        .filter("crop", size, size)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None, **passthrough_option(exe))
    )
    out, _ = _run(stream, exe)
    frame_bytes = size * size * 3
    n_got = len(out) // frame_bytes
    return np.frombuffer(out[: n_got * frame_bytes], dtype=np.uint8).reshape(n_got, size, size, 3)


def _run(stream, exe: str) -> tuple[bytes, bytes]:
    """ffmpeg's stdout and stderr for this ffmpeg-python stream; DecodeError with its reason when it fails.

    An ffmpeg killed by a signal (a crash: SIGSEGV, SIGILL from a build for another CPU, SIGABRT; or SIGKILL, the
    kernel's out-of-memory killer) says so: its stderr ends with the version banner, which is no reason.
    """
    proc = subprocess.run(stream.compile(cmd=exe), capture_output=True)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        what = "crashed" if name in ("SIGSEGV", "SIGILL", "SIGABRT", "SIGBUS", "SIGFPE") else "was killed"
        raise DecodeError(f"ffmpeg {what} ({name}) on this file; the ffmpeg used is {exe} (one on PATH comes "
                          "first): try another ffmpeg build")
    if proc.returncode:
        raise DecodeError(_reason(proc.stderr))
    return proc.stdout, proc.stderr


def _reason(stderr: bytes | None) -> str:
    """The most telling line of ffmpeg's stderr, e.g. 'Invalid data found when processing input'."""
    lines = [ln.strip() for ln in (stderr or b"").decode("utf-8", "replace").splitlines() if ln.strip()]
    for key in ("matches no streams", "Invalid data", "moov atom not found", "No such file", "Permission denied"):
        for ln in lines:
            if key in ln:
                return "no video stream" if key == "matches no streams" else ln.split(": ", 1)[-1]
    return lines[-1] if lines else "ffmpeg failed"
