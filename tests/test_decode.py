"""Decoding: sampling uniform in time, resize and crop, frame masks, and clear reasons for bad files."""

from __future__ import annotations

import os
import re
import subprocess

import ffmpeg
import numpy as np
import pytest

from pipeline.decode import DecodeError, decode_video, frame_times, sample_indices
from pipeline.ffmpeg import ffmpeg_exe, has_encoder, has_filter, passthrough_option, source_time_base_option
from tests.conftest import level_frames, write_video


def index_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames whose colour encodes their index (up to 255): red 16 * (i // 16), green 16 * (i % 16)."""
    i = np.arange(n)[:, None, None]
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    frames[..., 0], frames[..., 1] = 16 * (i // 16), 16 * (i % 16)
    return frames


def decoded_indices(frames: np.ndarray) -> list[int]:
    """The indices that index_frames encoded into these decoded frames."""
    red, green = np.rint(frames.reshape(len(frames), -1, 3).mean(axis=1)[:, :2] / 16).astype(int).T
    return (16 * red + green).tolist()


def test_sample_indices_are_segment_centres():
    assert sample_indices(range(24), 4) == [3, 9, 15, 21]
    assert sample_indices(range(3), 12) == [0, 1, 2]
    assert sample_indices(range(12), 12) == list(range(12))


def test_sample_indices_follow_time():
    # the first frame lasts 10 ticks, the others 1: centres 2.4, 7.1, 11.9, 16.6 show frames 0, 0, 2 and 7;
    # the second centre gives way to frame 1
    assert sample_indices([0, 10, 11, 12, 13, 14, 15, 16, 17, 18], 4) == [0, 1, 2, 7]
    # 29.97 fps rounded to milliseconds (Matroska) is still constant frame rate: the same frames as by index
    rounded = [round(k * 1001 / 30) for k in range(300)]
    assert sample_indices(rounded, 12) == sample_indices(range(300), 12)


def test_frame_times(tmp_path):
    times = frame_times(write_video(tmp_path / "a.mp4", level_frames(17)))
    assert len(times) == 17 and len(set(np.diff(times))) == 1


def test_frame_times_do_not_read_ffmpeg_log(tmp_path, monkeypatch):
    # ffmpeg 7.0 prints no frame count for a copied stream: an ffmpeg that logs only errors stands in for it
    path = write_video(tmp_path / "a.mp4", level_frames(17))
    quiet = tmp_path / "ffmpeg"
    quiet.write_text(f'#!/bin/sh\nexec "{ffmpeg_exe()}" -loglevel error "$@"\n')
    quiet.chmod(0o755)
    monkeypatch.setattr("pipeline.decode.ffmpeg_exe", lambda: str(quiet))
    assert len(frame_times(path)) == 17
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


@pytest.mark.parametrize("banner, value", [
    ("ffmpeg version 4.2.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2019", "-1"),  # 4.2: only -1
    ("ffmpeg version 6.1.1-3ubuntu5 Copyright (c) 2000-2023", "-1"),
    ("ffmpeg version 7.0.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2024", "demux"),  # both
    ("ffmpeg version n9.0.2-17-g2a571b6068-20251120 Copyright (c) 2000-2025", "demux"),  # 9.0: only demux
    ("ffmpeg version N-113254-g3a5a7a0a2e-static https://johnvansickle.com/ffmpeg/", "demux"),  # git snapshot
])
def test_source_time_base_option_follows_the_ffmpeg_release(tmp_path, banner, value):
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\necho '{banner}'\n")
    fake.chmod(0o755)
    assert source_time_base_option(str(fake)) == {"enc_time_base": value}


def test_decode_samples_the_right_frames(tmp_path):
    path = write_video(tmp_path / "levels.mp4", level_frames(30))
    out = decode_video(path, n_frames=6, size=32)
    assert out.frames.shape == (6, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.mask.all()
    levels = out.frames.reshape(6, -1).mean(axis=1) / 8  # frame i was filled with 8 * i
    np.testing.assert_allclose(levels, [2, 7, 12, 17, 22, 27], atol=0.3)


def test_mpeg_program_stream_with_some_timestamps_missing_is_sampled_at_segment_centres(tmp_path):
    # MPEG-PS stamps a presentation time on only some packets; with B-frames the rest came in at their decoding times.
    # At 64 x 48 the frames are so small that the muxer packs several under one timestamp, and the demuxer's guesses
    # put three frames at one time and then leave a gap of two: those frames went to the wrong segments.
    for h, w in ((96, 128), (48, 64)):
        path = write_video(tmp_path / f"clip{w}.mpg", index_frames(60, h, w), fps=30, vcodec="mpeg2video",
                           pix_fmt="yuv420p", qp=None, bf=2, **{"q:v": 2})
        assert decoded_indices(decode_video(path, n_frames=12, size=16).frames) == list(range(2, 60, 5)), (h, w)


def test_short_video_is_padded_with_mask_not_duplicated(tmp_path):
    path = write_video(tmp_path / "short.mp4", level_frames(3))
    out = decode_video(path, n_frames=12, size=16)
    assert out.mask.tolist() == [True] * 3 + [False] * 9
    assert not out.frames[3:].any()  # padded slots hold zeros, not copies of real frames
    np.testing.assert_allclose(out.frames[:3].reshape(3, -1).mean(axis=1), [0, 8, 16], atol=1.5)


def test_edit_listed_trim_is_sampled_to_its_end(tmp_path):
    # a stream copy cut at 1.5 s keeps the packets from the keyframe at 0 s; the edit list hides frames 0 to 44
    src = write_video(tmp_path / "src.mp4", index_frames(90), fps=30)
    trim = tmp_path / "trim.mp4"
    ffmpeg.input(str(src), ss=1.5).output(str(trim), c="copy", loglevel="error").run(cmd=ffmpeg_exe())
    out = decode_video(trim, n_frames=12, size=16)
    assert out.mask.all()
    assert decoded_indices(out.frames) == [45 + int((i + 0.5) * 45 / 12) for i in range(12)]  # 46, 50, ..., 88


def test_variable_frame_rate_is_sampled_uniformly_in_time(tmp_path):
    # 10 frames at 2 fps (0 to 5 s), then 120 at 30 fps (5 to 9 s): the slow part is more than half the clip
    time = [k / 2 if k < 10 else 5 + (k - 10) / 30 for k in range(130)]
    path = write_video(tmp_path / "vfr.mp4", index_frames(130), fps=30,
                       vf="setpts='if(lt(N,10),15*N,140+N)'", **passthrough_option(ffmpeg_exe()))
    out = decode_video(path, n_frames=8, size=16)
    assert out.mask.all()
    segment = 9 / 8
    centres = [(i + 0.5) * segment for i in range(8)]
    sampled = [time[k] for k in decoded_indices(out.frames)]
    assert all(abs(t - c) <= segment / 2 for t, c in zip(sampled, centres)), sampled
    # Timed from decoded frames (the fallback when the decoder outputs fewer frames than packets), the same times: on
    # the stream's nominal-rate clock the 2 fps frames were stamped 1/30 s apart and the clip lasted 4.3 s, not 9 s.
    assert frame_times(path, decode=True) == frame_times(path)


def test_a_gif_holding_its_last_frame_is_sampled_over_its_whole_duration(tmp_path):
    # 40 frames of 0.1 s, the last held 4 s more (the GIF's own delay): 7.9 s. Each frame's index is drawn as six
    # black or white bars, which survive GIF's palette.
    bits = (np.arange(40)[:, None] >> np.arange(6)) & 1
    frames = np.repeat(np.repeat(bits[:, None, :] * 255, 48, axis=1), 8, axis=2).astype(np.uint8)
    path = write_video(tmp_path / "held.gif", np.repeat(frames[..., None], 3, axis=3), fps=10, vcodec="gif",
                       pix_fmt="rgb8", final_delay=400, qp=None)
    out = decode_video(path, n_frames=8, size=24)
    assert out.mask.all()
    sampled = ((out.frames[:, 12, 2::4, 0] > 127) @ (1 << np.arange(6))).tolist()
    on_screen = [min(int((i + 0.5) * 7.9 / 8 * 10), 39) for i in range(8)]  # 4, 14, 24, 34, then the held frame
    assert sampled[:4] == on_screen[:4]
    # the other centres all fall on the held frame: it is taken last, the frames before it give way
    assert sampled[4:] == [36, 37, 38, 39]


def mjpeg_with_blanked_frames(path, n: int, blanked: range):
    """An MJPEG AVI of n index_frames at 30 fps whose `blanked` JPEGs are zeroed: n packets, but the decoder rejects
    those and outputs the others."""
    write_video(path, index_frames(n), fps=30, vcodec="mjpeg", pix_fmt="yuvj444p")
    data = bytearray(path.read_bytes())
    jpegs = [m.start() for m in re.finditer(rb"\xff\xd8\xff", data)]
    assert len(jpegs) == n
    for start in (jpegs[i] for i in blanked):
        end = data.index(b"\xff\xd9", start) + 2
        data[start:end] = bytes(end - start)
    path.write_bytes(data)
    return path


def test_packets_the_decoder_rejects_are_not_sampled(tmp_path):
    # an MJPEG AVI with frames 20 to 39 blanked out: 60 packets, but the decoder outputs 40 frames
    path = mjpeg_with_blanked_frames(tmp_path / "damaged.avi", 60, range(20, 40))
    out = decode_video(path, n_frames=12, size=16)
    assert out.mask.all()
    got = decoded_indices(out.frames)
    assert got == sorted(set(got)) and not set(got) & set(range(20, 40)), got
    assert got[-1] >= 55  # the last segment (55 to 59) is sampled


def test_a_rejected_packet_that_no_sample_falls_on_is_noticed_by_the_last_frame(tmp_path):
    # Frames 10 and 11 blanked: the 12 segment centres of the 60 packets (at frame 2.5 + 5 k) miss them, so 12 frames
    # still come out, but the decoder's frame numbers past 9 are 2 behind the packets'. Only the last packet (59),
    # asked for as a witness, is missing from what comes out; the sampling is then redone on the 58 frames.
    path = mjpeg_with_blanked_frames(tmp_path / "damaged.avi", 60, range(10, 12))
    out = decode_video(path, n_frames=12, size=16)
    assert out.mask.all()
    surviving = [i for i in range(60) if i not in (10, 11)]  # frame i shown from i / 30 s for 1 / 30 s: 0 to 2 s
    on_screen = [max(s for s in surviving if s <= 2.5 + 5 * k) for k in range(12)]  # 2, 7, 12, ..., 57
    assert decoded_indices(out.frames) == on_screen


def test_resize_and_center_crop_non_square(tmp_path):
    # left third red, middle green, right third blue: a center crop of a 3:1 frame keeps only green.
    frame = np.zeros((32, 96, 3), dtype=np.uint8)
    frame[:, :32, 0] = frame[:, 32:64, 1] = frame[:, 64:, 2] = 255
    path = write_video(tmp_path / "wide.mp4", np.stack([frame] * 4))
    out = decode_video(path, n_frames=2, size=16)
    assert out.frames.shape == (2, 16, 16, 3)
    centre = out.frames[:, 2:-2, 2:-2].reshape(-1, 3).mean(axis=0)
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


def test_non_square_pixels_are_cropped_as_players_show_them(tmp_path):
    # four 24-pixel stripes (red, green, blue, white) stored 96 x 96 with pixels twice as wide as tall (SAR 2:1):
    # on screen 192 x 96, so a square centre crop holds the middle two stripes only
    frame = np.zeros((96, 96, 3), dtype=np.uint8)
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        frame[:, 24 * k: 24 * (k + 1)] = colour
    path = write_video(tmp_path / "anamorphic.mp4", np.stack([frame] * 4), vf="setsar=2")
    out = decode_video(path, n_frames=1, size=16)
    left, right = out.frames[0, :, 1:7].reshape(-1, 3).mean(axis=0), out.frames[0, :, 9:15].reshape(-1, 3).mean(axis=0)
    assert left[1] > 240 and left[[0, 2]].max() < 15, left  # green
    assert right[2] > 240 and right[:2].max() < 15, right  # blue


@pytest.mark.skipif(not has_filter(ffmpeg_exe(), "zscale"), reason="this ffmpeg has no zscale (libzimg)")
def test_hdr_video_is_tone_mapped_as_players_show_it(tmp_path, monkeypatch, caplog):
    # an orange and a grey half, encoded as a phone records HDR: HLG transfer, BT.2020, 10 bits
    frame = np.zeros((64, 96, 3), dtype=np.uint8)
    frame[:, :48], frame[:, 48:] = (200, 60, 30), (128, 128, 128)
    hlg = ("zscale=t=arib-std-b67:p=bt2020:m=bt2020nc:r=limited:tin=bt709:pin=bt709:min=bt709:rin=full,"
           "format=yuv420p10le")
    path = write_video(tmp_path / "hlg.mp4", np.stack([frame] * 4), pix_fmt=None, vf=hlg, colorspace="bt2020nc",
                       color_primaries="bt2020", color_trc="arib-std-b67")
    out = decode_video(path, n_frames=1, size=32).frames[0].astype(int)
    orange, grey = out[8:24, 2:10].reshape(-1, 3).mean(axis=0), out[8:24, 22:30].reshape(-1, 3).mean(axis=0)
    assert np.abs(orange - (200, 60, 30)).max() < 20, orange  # straight to RGB: (109, 54, 31), dull and dark
    assert np.abs(grey - 128).max() < 8, grey  # straight: 83
    monkeypatch.setattr("pipeline.decode.has_filter", lambda exe, name: False)  # an ffmpeg built without libzimg
    dull = decode_video(path, n_frames=1, size=32).frames[0].astype(int)
    assert dull[8:24, 22:30].mean() < 100 and "HDR video, but" in caplog.text and "no zscale filter" in caplog.text


def test_cover_art_is_not_taken_for_the_video(tmp_path):
    exe = ffmpeg_exe()
    tone, cover, song = tmp_path / "tone.m4a", tmp_path / "cover.png", tmp_path / "song.m4a"
    ffmpeg.input("sine=frequency=440:duration=1", f="lavfi").output(str(tone), loglevel="error").run(cmd=exe)
    ffmpeg.input("color=c=magenta:s=32x32", f="lavfi").output(str(cover), vframes=1, loglevel="error").run(cmd=exe)
    a, b = ffmpeg.input(str(tone)), ffmpeg.input(str(cover))
    ffmpeg.output(a, b, str(song), c="copy", loglevel="error", **{"disposition:v:0": "attached_pic"}).run(cmd=exe)
    with pytest.raises(DecodeError, match="no video stream"):  # an audio file with album art: one still, no video
        decode_video(song, 4, 16)


# What cameras, phones, editors and the web store video as; each lossy, each with its own frame reordering
CODECS = {
    "av1.mkv": {"vcodec": "libsvtav1", "pix_fmt": "yuv420p", "preset": 12},
    "vp9.webm": {"vcodec": "libvpx-vp9", "pix_fmt": "yuv420p", "deadline": "realtime", "cpu-used": 8},
    "hevc-10bit.mp4": {"vcodec": "libx265", "pix_fmt": "yuv420p10le", "preset": "ultrafast",
                       "x265-params": "log-level=error"},
    "interlaced.mp4": {"vcodec": "libx264", "pix_fmt": "yuv420p", "vf": "tinterlace=interleave_top,fieldorder=tff",
                       "flags": "+ilme+ildct"},
    "mpeg2.mpg": {"vcodec": "mpeg2video", "pix_fmt": "yuv420p", "bf": 2, "q:v": 2},
    "prores.mov": {"vcodec": "prores_ks", "pix_fmt": "yuv422p10le"},
    "mjpeg.avi": {"vcodec": "mjpeg", "pix_fmt": "yuvj420p", "q:v": 2},
}


@pytest.mark.parametrize("name", CODECS)
def test_common_codecs_give_the_frames_of_the_same_times(tmp_path, name):
    options = {"qp": None, **CODECS[name]}
    if not has_encoder(ffmpeg_exe(), options["vcodec"]):
        pytest.skip(f"this ffmpeg cannot encode {options['vcodec']}")
    if name.startswith("interlaced"):
        # two frames woven into one interlaced frame (one per field): 60 frames at 50 fps become 30 at 25
        frames, shown = np.repeat(index_frames(30), 2, axis=0), index_frames(30)
        path = write_video(tmp_path / name, frames, fps=50, **options)
    else:
        shown = index_frames(30)
        path = write_video(tmp_path / name, shown, fps=25, **options)
    out = decode_video(path, n_frames=6, size=32)
    assert out.mask.all()
    assert decoded_indices(out.frames) == [int((i + 0.5) * 30 / 6) for i in range(6)]  # 2, 7, ..., 27
    colours = shown[[2, 7, 12, 17, 22, 27], :1, :1].astype(int)  # each frame is one colour
    assert np.abs(out.frames.astype(int) - colours).max() <= 12  # every pixel, not only the mean that gave the index


@pytest.mark.parametrize("degrees, turns", [(90, 1), (180, 2), (270, 3)])
def test_rotation_metadata_is_applied_as_players_show_it(tmp_path, degrees, turns):
    # four coloured quadrants, stored unrotated with a display matrix saying "turn it": a phone's portrait clip
    frame = np.zeros((48, 48, 3), dtype=np.uint8)
    frame[:24, :24] = (255, 0, 0)
    frame[:24, 24:] = (0, 255, 0)
    frame[24:, :24] = (0, 0, 255)
    frame[24:, 24:] = (255, 255, 255)
    src = write_video(tmp_path / "src.mp4", np.stack([frame] * 4))
    rotated = tmp_path / f"rot{degrees}.mp4"
    proc = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-display_rotation", str(degrees), "-i", str(src),
                           "-c", "copy", str(rotated)], capture_output=True, text=True)
    if proc.returncode:  # older ffmpeg releases have no -display_rotation
        pytest.skip(f"this ffmpeg cannot write a display matrix: {proc.stderr.strip()[-80:]}")
    out = decode_video(rotated, n_frames=1, size=16)
    shown = np.rot90(frame, turns)  # counter-clockwise, as the display matrix's angle goes
    quadrants = out.frames[0, [4, 4, 12, 12], [4, 12, 4, 12]].astype(int)  # the centres of the four quadrants
    assert np.abs(quadrants - shown[[12, 12, 36, 36], [12, 36, 12, 36]]).max() < 20, quadrants


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not a video\n" * 20), "Invalid data"),
        (lambda p: None, "file not found"),
        (lambda p: os.mkfifo(p), "not a regular file"),  # opening it would wait for a writer forever
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),  # endless
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


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for ffmpeg")
@pytest.mark.parametrize(("sig", "said"), [("SEGV", "crashed (SIGSEGV)"), ("KILL", "was killed (SIGKILL)")])
def test_an_ffmpeg_that_crashes_is_named_as_the_reason(tmp_path, monkeypatch, sig, said):
    # An ffmpeg build that crashes on a file (ffmpeg 4.2.2's static build segfaults on every MPEG-TS file; a build
    # for a newer CPU dies of SIGILL) leaves only its version banner on stderr: that banner's last line
    # ("libpostproc 55. 5.100 / 55. 5.100") was recorded as the reason the video failed.
    video = write_video(tmp_path / "clip.mp4", level_frames(8))
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\necho '  libpostproc    55.  5.100 / 55.  5.100' >&2\nkill -{sig} $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr("pipeline.decode.ffmpeg_exe", lambda: str(fake))
    # SIGKILL is no crash of the build (the kernel's out-of-memory killer sends it): "was killed", not "crashed"
    with pytest.raises(DecodeError, match=rf"ffmpeg {re.escape(said)} on this file.*try another ffmpeg") as caught:
        decode_video(video, 4, 16)
    assert "libpostproc" not in str(caught.value)
    assert str(fake) in str(caught.value)
