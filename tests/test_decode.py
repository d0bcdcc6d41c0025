"""Decoding: uniform sampling, resize and crop, frame masks, and clear reasons for bad files."""

from __future__ import annotations

import ffmpeg
import numpy as np
import pytest

from pipeline.decode import DecodeError, count_frames, decode_video, sample_indices
from pipeline.ffmpeg import ffmpeg_exe, passthrough_option
from tests.conftest import level_frames, write_video


def test_sample_indices_are_segment_centres():
    assert sample_indices(24, 4) == [3, 9, 15, 21]
    assert sample_indices(3, 12) == [0, 1, 2]
    assert sample_indices(12, 12) == list(range(12))


def test_count_frames(tmp_path):
    assert count_frames(write_video(tmp_path / "a.mp4", level_frames(17))) == 17


def test_count_frames_does_not_read_ffmpeg_log(tmp_path, monkeypatch):
    # ffmpeg 7.0 prints no frame count for a copied stream: an ffmpeg that logs only errors stands in for it
    path = write_video(tmp_path / "a.mp4", level_frames(17))
    quiet = tmp_path / "ffmpeg"
    quiet.write_text(f'#!/bin/sh\nexec "{ffmpeg_exe()}" -loglevel error "$@"\n')
    quiet.chmod(0o755)
    monkeypatch.setattr("pipeline.decode.ffmpeg_exe", lambda: str(quiet))
    assert count_frames(path) == 17
    assert decode_video(path, n_frames=4, size=16).mask.all()



@pytest.mark.parametrize("banner, option", [
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021", "vsync"),  # Ubuntu 22.04's apt ffmpeg
    ("ffmpeg version 5.0.3 Copyright (c) 2000-2022", "vsync"),
    ("ffmpeg version 5.1.4-0+deb12u1 Copyright (c) 2000-2023", "fps_mode"),
    ("ffmpeg version n9.0.2-17-g2a571b6068-20251120 Copyright (c) 2000-2025", "fps_mode"),
    ("ffmpeg version N-113254-g3a5a7a0a2e-static https://johnvansickle.com/ffmpeg/", "fps_mode"),  # git snapshot
])
def test_passthrough_option_follows_the_ffmpeg_release(tmp_path, banner, option):
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\necho '{banner}'\necho 'built with gcc'\n")
    fake.chmod(0o755)
    assert passthrough_option(str(fake)) == {option: "passthrough"}

def test_decode_samples_the_right_frames(tmp_path):
    path = write_video(tmp_path / "levels.mp4", level_frames(30))
    out = decode_video(path, n_frames=6, size=32)
    assert out.frames.shape == (6, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.mask.all()
    levels = out.frames.reshape(6, -1).mean(axis=1) / 8  # frame i was filled with 8 * i
    np.testing.assert_allclose(levels, [2, 7, 12, 17, 22, 27], atol=0.3)


def test_short_video_is_padded_with_mask_not_duplicated(tmp_path):
    path = write_video(tmp_path / "short.mp4", level_frames(3))
    out = decode_video(path, n_frames=12, size=16)
    assert out.mask.tolist() == [True] * 3 + [False] * 9
    assert not out.frames[3:].any()  # padded slots hold zeros, not copies of real frames
    np.testing.assert_allclose(out.frames[:3].reshape(3, -1).mean(axis=1), [0, 8, 16], atol=1.5)


def test_resize_and_center_crop_non_square(tmp_path):
    # left third red, middle green, right third blue: a center crop of a 3:1 frame keeps only green.
    frame = np.zeros((32, 96, 3), dtype=np.uint8)
    frame[:, :32, 0] = frame[:, 32:64, 1] = frame[:, 64:, 2] = 255
    path = write_video(tmp_path / "wide.mp4", np.stack([frame] * 4))
    out = decode_video(path, n_frames=2, size=16)
    assert out.frames.shape == (2, 16, 16, 3)
    centre = out.frames[:, 2:-2, 2:-2].reshape(-1, 3).mean(axis=0)
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not a video\n" * 20), "Invalid data"),
        (lambda p: None, "file not found"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad file ü.mp4"
    make(path)
    with pytest.raises(DecodeError, match=reason):
        decode_video(path, 4, 16)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "audio.m4a"
    ffmpeg.input("sine=frequency=440:duration=1", f="lavfi").output(str(path), loglevel="error").run(cmd=ffmpeg_exe())
    with pytest.raises(DecodeError, match="no video stream"):
        decode_video(path, 4, 16)


def test_truncated_video_decodes_what_is_there(tmp_path):
    path = write_video(tmp_path / "full.mp4", level_frames(30))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DecodeError):  # mp4 with its index cut off: moov atom missing
        decode_video(cut, 4, 16)
