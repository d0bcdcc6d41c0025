"""Tests for pipeline.synthetic and its dataset adapter: determinism, captions checked against pixels, twins."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.datasets import ADAPTERS, GENERATED, _import_adapters
from pipeline.datasets.manifest import read_manifest
from pipeline.datasets.synthetic import load
from pipeline.decode import decode_video
from pipeline.errors import UserError
from pipeline.records import SPLITS
from pipeline.synthetic import (
    BACKGROUND,
    CELL_WORDS,
    COLOURS,
    CORNERS,
    EVENT_WORDS,
    LANE_WORDS,
    MOTION_ING,
    MOTION_WORDS,
    RADIUS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TWIN_ATTRIBUTE,
    Scene,
    encode_video,
    frame_captions,
    make_synthetic,
    plan,
    read_plan,
    read_scenes,
    render_frame,
    render_video,
    sample_frame_scene,
    scene_facts,
    set_state,
    true_of,
)
from tests.conftest import ROOT, subprocess_env

N_VIDEOS = 10
SIZE = 64
FRAMES = 24  # 2 s at 12 fps: visibility sixths fall on multiples of 4 frames


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "a", videos=N_VIDEOS, seed=0, workers=2)


def _mp4s(root: Path) -> list[Path]:
    return sorted((root / "videos").glob("*.mp4"))


# ------------------------------------------------------------------------------ pixels -> facts

PALETTE = {**COLOURS, "background": BACKGROUND}


def colour_masks(frames: np.ndarray, tol: float) -> dict[str, np.ndarray]:
    """Per colour, the pixels [T, S, S] mostly covered by it: more than 60% of the way from the background
    to the colour and at most tol off that line (a blend with the background stays on it)."""
    d = frames.astype(np.float32) - np.float32(BACKGROUND)
    out = {}
    for name, rgb in COLOURS.items():
        v = np.float32(rgb) - np.float32(BACKGROUND)
        a = d @ v / (v @ v)  # [T, S, S]
        off = np.linalg.norm(d - a[..., None] * v, axis=-1)
        out[name] = (a > 0.6) & (off <= tol)
    return out


class Track:
    """Where one colour is seen in a video: per-frame presence and centroid (x, y in frame units, y down)."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask  # [T, S, S]
        self.size = mask.shape[1]
        self.present = self.mask.sum(axis=(1, 2)) >= 8  # the smallest shape covers about 25 px at 64 px
        self.frames = np.flatnonzero(self.present)

    def centroid(self, t: int) -> np.ndarray:
        ys, xs = np.nonzero(self.mask[t])
        return (np.array([xs.mean(), ys.mean()]) + 0.5) / self.size

    def mean_centroid(self) -> np.ndarray:
        return np.mean([self.centroid(t) for t in self.frames], axis=0)

    def shape(self) -> str:
        """Square (fills its box's corners), triangle (mass low in its box), circle or diamond (by fill)."""
        m = self.mask[self.frames[0]]
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        if m[y0, x0] and m[y0, x1] and m[y1, x0] and m[y1, x1]:
            return "square"
        if (ys.mean() - y0) / (y1 - y0 + 1) > 0.505:
            return "triangle"
        return "circle" if len(xs) / ((y1 - y0 + 1) * (x1 - x0 + 1)) > 0.64 else "diamond"

    def size_name(self) -> str:
        return "large" if self.mask[self.frames[0]].mean() > 0.02 else "small"


REGION = {
    "left": lambda x, y: x < 0.35 and 0.35 < y < 0.65,
    "right": lambda x, y: x > 0.65 and 0.35 < y < 0.65,
    "top": lambda x, y: y < 0.35 and 0.35 < x < 0.65,
    "bottom": lambda x, y: y > 0.65 and 0.35 < x < 0.65,
    "center": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
}
LANE_REGION = {  # a moving object's mean centroid: the middle of its lane
    "left": lambda x, y: x < 0.35, "right": lambda x, y: x > 0.65,
    "top": lambda x, y: y < 0.35, "bottom": lambda x, y: y > 0.65,
    "center": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
}


# ------------------------------------------------------------------------------ captions -> claims


def _alt(table: dict[str, tuple[str, ...]]) -> tuple[str, dict[str, str]]:
    """A regex alternation over all phrases of a table, and phrase -> meaning."""
    meaning = {phrase: key for key, phrases in table.items() for phrase in phrases}
    return "|".join(sorted(map(re.escape, meaning), key=len, reverse=True)), meaning


SIZE_RE, SIZE_OF = _alt(SIZE_WORDS)
SHAPE_RE, SHAPE_OF = _alt(SHAPE_WORDS)
COLOUR_RE = "|".join(COLOURS)
CELL_RE, CELL_OF = _alt(CELL_WORDS)
LANE_RE, LANE_OF = _alt(LANE_WORDS)
MOVE_RE, MOVE_OF = _alt({k: MOTION_WORDS[k] + MOTION_ING.get(k, ()) for k in MOTION_WORDS})
EVENT_RE, EVENT_OF = _alt(EVENT_WORDS)
NP = rf"a (?:({SIZE_RE}) )?({COLOUR_RE}) ({SHAPE_RE})"  # groups: size, colour, shape word
NP_ONLY = rf"a (?:(?:{SIZE_RE}) )?({COLOUR_RE}) (?:{SHAPE_RE})"  # group: colour


def claims(caption: str) -> list[tuple]:
    """What a caption asserts, read with regexes from the vocabulary tables (not from the caption code)."""
    out: list[tuple] = []
    for size, colour, shape in re.findall(NP, caption):
        out.append(("shape", colour, SHAPE_OF[shape]))
        if size:
            out.append(("size", colour, SIZE_OF[size]))
    for colour, verb in re.findall(rf"{NP_ONLY} ({MOVE_RE})(?![\w])", caption):
        out.append(("moves", colour, MOVE_OF[verb]))
    # A moving object's mean centroid lies in the middle of its lane, so cell phrases hold for lanes too.
    for colour, cell in re.findall(rf"{NP_ONLY} (?:(?:{EVENT_RE}|{MOVE_RE}) )?({CELL_RE})(?![\w])", caption):
        out.append(("at", colour, CELL_OF[cell]))
    for colour, _, lane in re.findall(rf"{NP_ONLY} ({MOVE_RE}) ({LANE_RE})(?![\w])", caption):
        out.append(("lane", colour, LANE_OF[lane]))
    for lane, colour in re.findall(rf"^({LANE_RE}), {NP_ONLY}", caption):
        out.append(("lane", colour, LANE_OF[lane]))
    events = rf"{NP_ONLY} ({EVENT_RE})(?: (?:{CELL_RE}))?( and then ({EVENT_RE}))?"
    for colour, ev, _, ev2 in re.findall(events, caption):
        out += [("event", colour, EVENT_OF[e]) for e in (ev, ev2) if e]
    first_then = rf"first {NP_ONLY}(?: ({EVENT_RE}))?(?: (?:{CELL_RE}))?, then {NP_ONLY}(?: ({EVENT_RE}))?"
    for x, ex, y, ey in re.findall(first_then, caption):
        out.append(("before", x, EVENT_OF.get(ex, "shown"), y, EVENT_OF.get(ey, "shown")))
    for x, ex, y, ey in re.findall(rf"{NP_ONLY} ({EVENT_RE}) before {NP_ONLY} ({EVENT_RE})", caption):
        out.append(("before", x, EVENT_OF[ex], y, EVENT_OF[ey]))
    for y, ey, x, ex in re.findall(rf"{NP_ONLY} ({EVENT_RE}) after {NP_ONLY} ({EVENT_RE})", caption):
        out.append(("before", x, EVENT_OF[ex], y, EVENT_OF[ey]))
    for x, y in re.findall(rf"{NP_ONLY} is (?:shown before|replaced by) {NP_ONLY}", caption):
        out.append(("before", x, "shown", y, "shown"))
    for y, x in re.findall(rf"{NP_ONLY} comes after {NP_ONLY}", caption):
        out.append(("before", x, "shown", y, "shown"))
    relation = rf"{NP_ONLY} is (to the left of|left of|to the right of|above|below|higher than) {NP_ONLY}"
    for x, rel, y in re.findall(relation, caption):
        out.append(("relation", x, rel, y))
    for word in re.findall(r"^(?:only )?(one|two|three) (?:objects?|shapes?):", caption):
        out.append(("count", {"one": 1, "two": 2, "three": 3}[word]))
    return out


def holds(claim: tuple, tracks: dict[str, Track], shapes: bool = True) -> bool:
    """Whether the frames (through their colour tracks) bear out one claim."""
    kind, colour = claim[0], claim[1]
    if kind == "count":
        return sum(len(t.frames) > 0 for t in tracks.values()) == claim[1]
    track = tracks[colour]
    if not len(track.frames):
        return False
    if kind == "shape":
        return not shapes or track.shape() == claim[2]
    if kind == "size":
        return not shapes or track.size_name() == claim[2]
    if kind == "at":
        return REGION[claim[2]](*track.mean_centroid())
    if kind == "lane":
        return LANE_REGION[claim[2]](*track.mean_centroid())
    if kind == "moves":
        dx, dy = track.centroid(track.frames[-1]) - track.centroid(track.frames[0])
        want = {"left": dx < -0.3, "right": dx > 0.3, "up": dy < -0.3, "down": dy > 0.3}
        return want.get(claim[2], abs(dx) < 0.02 and abs(dy) < 0.02)
    if kind == "event":
        seen = track.present
        return not seen[0] if claim[2] == "appears" else not seen[-1]
    if kind == "before":
        _, x, ex, y, ey = claim
        tx, ty = tracks[x], tracks[y]
        if ex == ey == "shown":  # "first X, then Y": X both comes and goes earlier
            return len(ty.frames) > 0 and tx.frames[0] < ty.frames[0] and tx.frames[-1] < ty.frames[-1]
        return _when(tx, ex) < _when(ty, ey)
    if kind == "relation":
        _, x, rel, y = claim
        both = np.flatnonzero(tracks[x].present & tracks[y].present)
        if not len(both):
            return False
        (xx, xy), (yx, yy) = tracks[x].centroid(both[0]), tracks[y].centroid(both[0])
        return {"to the left of": xx < yx - 0.1, "left of": xx < yx - 0.1, "to the right of": xx > yx + 0.1,
                "above": xy < yy - 0.1, "higher than": xy < yy - 0.1, "below": xy > yy + 0.1}[rel]
    raise AssertionError(claim)


def _when(track: Track, event: str) -> float:
    """Frame of an appearance or disappearance; NaN (never before or after anything) when it has none."""
    if not len(track.frames) or track.present[0 if event == "appears" else -1]:
        return np.nan
    return track.frames[0] if event == "appears" else track.frames[-1] + 1


def tracks_of(frames: np.ndarray, tol: float = 20) -> dict[str, Track]:
    """Each palette colour's track through the frames [T, S, S, 3]."""
    return {c: Track(m) for c, m in colour_masks(frames, tol).items()}


def caption_true(caption: str, tracks: dict[str, Track], shapes: bool = True) -> bool:
    """Every claim the caption makes holds in the frames (and it makes at least one)."""
    found = claims(caption)
    assert found, f"no claim read from {caption!r}"
    return all(holds(c, tracks, shapes) for c in found)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_and_frames(generated, tmp_path):
    again = make_synthetic(tmp_path / "b", videos=N_VIDEOS, seed=0, workers=1)  # worker count must not matter
    for name in ("manifest.csv", "scenes.jsonl"):
        assert (generated / name).read_bytes() == (again / name).read_bytes()
    a, b = _mp4s(generated), _mp4s(again)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == N_VIDEOS
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        fa, fb = decode_video(pa, 8, SIZE), decode_video(pb, 8, SIZE)
        assert np.array_equal(fa.frames, fb.frames) and fa.mask.all()


def test_other_seed_differs(generated, tmp_path):
    other = make_synthetic(tmp_path / "c", videos=3, seed=1, workers=1)
    assert (other / "manifest.csv").read_text() != (generated / "manifest.csv").read_text()
    first = lambda root: decode_video(_mp4s(root)[0], 8, SIZE).frames  # noqa: E731
    assert not np.array_equal(first(other), first(generated))
    scenes0 = [p.scene for p in plan(20, 0)]
    scenes1 = [p.scene for p in plan(20, 1)]
    assert sum(a != b for a, b in zip(scenes0, scenes1)) >= 18


def test_plan_is_a_prefix_and_has_twins_and_splits():
    small, big = plan(7, 3), plan(300, 3)
    # Same videos (the last one may lose its twin when the set ends mid-pair).
    assert [p.scene for p in small] == [p.scene for p in big[:7]]
    assert len({frozenset(p.scene.objects) for p in big}) == len(big)  # no two videos alike
    kinds = [p.twin_kind for p in big]
    assert sum(k is not None for k in kinds) / len(kinds) > 0.7
    assert set(kinds) == {None, *TWIN_ATTRIBUTE}
    share = {s: sum(p.split == s for p in big) / len(big) for s in SPLITS}
    assert 0.6 < share["train"] < 0.8 and 0.05 < share["val"] < 0.15 and 0.13 < share["test"] < 0.27
    by_id = {p.video: p for p in big}
    for p in big:
        assert 3 <= len(p.captions) <= 5 and len(set(p.captions)) == len(p.captions)
        if p.twin_of:
            twin = by_id[p.twin_of]
            assert twin.twin_of == p.video and twin.group == p.group and twin.split == p.split


def test_palette_is_well_separated():
    for (a, ca), (b, cb) in itertools.combinations(PALETTE.items(), 2):
        assert np.linalg.norm(np.subtract(ca, cb)) > 140, (a, b)


# ------------------------------------------------------------------------------ content


def test_captions_match_rendered_pixels():
    checked = 0
    for p in plan(60, 5):
        tracks = tracks_of(render_video(p.scene, SIZE, FRAMES))
        for caption in p.captions:
            assert caption_true(caption, tracks), (caption, p.scene)
            checked += 1
        for o in p.scene.objects:
            track = tracks[o.colour]
            a, b = o.visible
            assert list(track.frames) == list(range(4 * a, 4 * b)), (o, track.frames)
            assert track.shape() == o.shape and track.size_name() == o.size, o
            if o.motion == "still":
                assert REGION[o.position](*track.centroid(track.frames[0])), o
    assert checked > 150


def test_moving_left_means_centroid_x_decreases():
    seen = set()
    for p in plan(80, 2):
        for o in p.scene.objects:
            if o.motion in ("left", "right", "up", "down"):
                track = tracks_of(render_video(p.scene, SIZE, FRAMES))[o.colour]
                xs, ys = np.array([track.centroid(t) for t in track.frames]).T
                along = {"left": -xs, "right": xs, "up": -ys, "down": ys}[o.motion]
                assert np.all(np.diff(along) > 0), o  # steadily, every frame
                seen.add(o.motion)
    assert seen == {"left", "right", "up", "down"}


def test_decoded_videos_have_the_rendered_frames_and_colours(generated):
    rows = {Path(r["video"]).as_posix(): r for r in read_scenes(generated)}
    for path in _mp4s(generated):
        row = rows[path.relative_to(generated).as_posix()]
        decoded = decode_video(path, FRAMES, SIZE)
        assert decoded.frames.shape == (FRAMES, SIZE, SIZE, 3) and decoded.mask.all()
        assert decode_video(path, 8, SIZE).mask.sum() == 8
        rendered = render_video(row["scene"], SIZE, FRAMES)
        tracks = tracks_of(rendered)
        diff = np.abs(decoded.frames.astype(int) - rendered.astype(int))
        assert diff.mean() < 4, diff.mean()
        for o in row["scene"].objects:
            t = 4 * o.visible[0]
            x, y = tracks[o.colour].centroid(t) * SIZE
            assert np.abs(decoded.frames[t, int(y), int(x)].astype(int) - COLOURS[o.colour]).max() < 30, o


def test_captions_hold_on_decoded_videos(generated):
    for record in read_manifest(generated):
        tracks = tracks_of(decode_video(record.path, FRAMES, SIZE).frames, tol=45)
        for caption in record.captions:
            # At 64 px, yuv420p chroma blurs small shapes: check colours, positions, motion and timing, not outlines.
            assert caption_true(caption, tracks, shapes=False), (record.video_id, caption)


# ------------------------------------------------------------------------------ twins


def _differing(a: Scene, b: Scene) -> set[str]:
    assert len(a.objects) == len(b.objects)
    return {f for oa, ob in zip(a.objects, b.objects) for f in oa.__dict__ if getattr(oa, f) != getattr(ob, f)}


def test_twins_differ_in_one_attribute_and_captions_are_false_for_the_twin():
    planned = plan(60, 7)
    by_id = {p.video: p for p in planned}
    pairs = [(p, by_id[p.twin_of]) for p in planned if p.twin_of]
    assert {p.twin_kind for p, _ in pairs} == set(TWIN_ATTRIBUTE)
    for a, b in pairs:
        assert _differing(a.scene, b.scene) == {TWIN_ATTRIBUTE[a.twin_kind]}, (a.scene, b.scene)
        assert not set(a.captions) & set(b.captions)
        fa, fb = render_video(a.scene, SIZE, FRAMES), render_video(b.scene, SIZE, FRAMES)
        ta, tb = tracks_of(fa), tracks_of(fb)
        for caption in a.captions:
            assert caption_true(caption, ta) and not caption_true(caption, tb), (a.twin_kind, caption)
        if a.twin_kind in ("direction", "order"):
            # Same frames in reverse order: mean pooling cannot tell the twins apart.
            assert np.array_equal(fb, fa[::-1])
            assert np.array_equal(fa.mean(0), fb.mean(0))


def test_true_of_gives_the_videos_the_pixels_bear_a_caption_out_in():
    planned = plan(60, 7)
    tracks = {p.video: tracks_of(render_video(p.scene, SIZE, FRAMES)) for p in planned}
    true = true_of(planned)
    assert len(true) == sum(len(p.captions) for p in planned)
    several = 0
    for p in planned:
        for caption, facts in zip(p.captions, p.facts):
            assert facts <= scene_facts(p.scene)
            seen_true = {q.video for q in planned if caption_true(caption, tracks[q.video])}
            videos = true[p.video, caption]
            assert p.video in videos and p.twin_of not in videos
            several += len(videos) > 1
            # The facts relate only still objects; the pixel checker also relates a mover at its first frame.
            relation = any(c[0] == "relation" for c in claims(caption))
            assert videos == seen_true if not relation else videos <= seen_true, (p.video, caption, videos, seen_true)
    assert several > 10  # captions true of several videos exist: what the fact oracle measures


def test_read_plan_gives_the_sets_captions_and_refuses_another_version(generated, tmp_path):
    planned = read_plan(generated)
    assert {p.video: p.captions for p in planned} == {r.video_id: r.captions for r in read_manifest(generated)}
    assert all(len(p.facts) == len(p.captions) for p in planned)
    other = shutil.copytree(generated, tmp_path / "other", ignore=shutil.ignore_patterns("videos"))
    manifest = other / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(planned[0].captions[0], "a made up caption", 1))
    with pytest.raises(UserError, match=rf"{re.escape(str(other))}: .*make the set again in a new folder "
                                        rf"\(make-synthetic --out NEW_FOLDER --videos {N_VIDEOS} --seed 0\)"):
        read_plan(other)
    manifest.write_text("video,text\nvideos/v00000.mp4,a red ball\n")  # a header edited by hand
    with pytest.raises(UserError, match=rf"{re.escape(str(manifest))}: missing column 'caption'"):
        read_plan(other)
    (other / "params.json").unlink()
    with pytest.raises(UserError, match=rf"{re.escape(str(other))}: has no params.json, .*make-synthetic --out"):
        read_plan(other)


def test_scenes_jsonl_records_twins(generated):
    rows = [json.loads(line) for line in (generated / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == N_VIDEOS
    by_video = {r["video"]: r for r in rows}
    for r in rows:
        assert set(r) >= {"video", "description", "scene", "group", "twin_kind", "twin_of"}
        if r["twin_of"] is None:
            assert r["twin_kind"] is None
        else:
            twin = by_video[r["twin_of"]]
            assert twin["twin_of"] == r["video"] and twin["group"] == r["group"] and twin["twin_kind"] == r["twin_kind"]
            assert r["description"] != twin["description"]


# ------------------------------------------------------------------------------ frames for image pretraining


def test_frame_scenes_render_and_caption_without_motion_or_order():
    rng = np.random.default_rng(0)
    time_words = re.compile(rf"\b(first|then|before|after|while|{MOVE_RE}|{EVENT_RE})\b")
    for _ in range(40):
        scene = sample_frame_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        assert all(o.motion == "still" and o.visible == (0, 6) for o in scene.objects)
        image = render_frame(scene, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert np.array_equal(image, render_video(scene, 96, 1)[0])  # one drawing routine for both
        captions = frame_captions(scene, rng)
        tracks = tracks_of(image[None])
        assert 3 <= len(captions) <= 5
        for caption in captions:
            assert not time_words.search(caption), caption
            assert caption_true(caption, tracks), (caption, scene)


# ------------------------------------------------------------------------------ resume, errors, adapter


def test_resume_after_a_killed_run(tmp_path):
    root = make_synthetic(tmp_path / "r", videos=3, seed=4, workers=1)
    before = {p.name: p.read_bytes() for p in _mp4s(root)}
    manifest = (root / "manifest.csv").read_bytes()
    # What a killed run leaves: no manifest, a missing video, a half-written temporary file.
    (root / "manifest.csv").unlink()
    _mp4s(root)[1].unlink()
    (root / "videos" / ".v00002.mp4.part").write_bytes(b"half")
    kept = _mp4s(root)[0].stat().st_mtime_ns
    make_synthetic(root, videos=3, seed=4, workers=1)
    assert {p.name: p.read_bytes() for p in _mp4s(root)} == before
    assert (root / "manifest.csv").read_bytes() == manifest
    assert _mp4s(root)[0].stat().st_mtime_ns == kept  # finished videos are not rendered again
    assert not list((root / "videos").glob(".*"))
    # Other settings, with overwrite: every video is rendered again.
    make_synthetic(root, videos=3, seed=4, size=32, workers=1, overwrite=True)
    assert decode_video(_mp4s(root)[0], 4, 32).frames.shape == (4, 32, 32, 3)
    assert _mp4s(root)[0].read_bytes() != before["v00000.mp4"]


def test_one_writer_a_set(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # what a running make-synthetic holds: it shared each video's .part file
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(cli.main, ["make-synthetic", "--out", str(out), "--videos", "2"])
        assert result.exit_code == 2 and result.output == (f"error: {out}: another make-synthetic is writing this set; "
                                                           "wait for it to finish, or choose another --out\n")
        assert [p.name for p in out.iterdir()] == [".lock"]  # refused before it wrote
    # a run killed before its params.json leaves the lock alone: the folder is still an empty one
    assert set_state(out) == "empty" and make_synthetic(out, videos=2, workers=1) == out
    assert set_state(out) == "finished"


def test_a_set_made_with_other_options_is_refused_unless_overwrite(tmp_path):
    root = make_synthetic(tmp_path / "s", videos=4, seed=0, workers=1)
    files = lambda: {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)  # noqa: E731
                     for p in root.rglob("*") if p.is_file()}
    before = files()
    for options, made, asked in ((["--seed", "1"], "--seed 0", "--seed 1"),
                                 (["--videos", "2"], "--videos 4", "--videos 2"),
                                 (["--size", "32", "--clutter", "1"], "--size 64 --clutter 0",
                                  "--size 32 --clutter 1")):
        result = CliRunner().invoke(cli.main, ["make-synthetic", "--out", str(root), "--videos", "4", *options])
        assert result.exit_code == 2
        assert result.output == (f"error: {root}: holds a synthetic set made with {made}, not {asked}; "
                                 "pass --overwrite to make it again (caches extracted from it go stale) "
                                 "or choose another --out\n")
        assert files() == before
    make_synthetic(root, videos=4, seed=0, workers=1)  # the same options: nothing is rendered again
    assert {k: v for k, v in files().items() if k.startswith("videos/")} == \
        {k: v for k, v in before.items() if k.startswith("videos/")}
    # A set from before params.json recorded the count: its scenes.jsonl gives it.
    params = json.loads((root / "params.json").read_text())
    (root / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "videos"}))
    with pytest.raises(UserError, match="made with --videos 4, not --videos 3;"):
        make_synthetic(root, videos=3, seed=0, workers=1)
    # Fewer videos: the first ones are kept as they are, no stale one is left over.
    make_synthetic(root, videos=2, seed=0, workers=1, overwrite=True)
    assert [p.name for p in _mp4s(root)] == ["v00000.mp4", "v00001.mp4"]
    assert all(files()[f"videos/{p.name}"] == before[f"videos/{p.name}"] for p in _mp4s(root))
    assert {r.video_id for r in read_manifest(root)} == {"videos/v00000.mp4", "videos/v00001.mp4"}
    # Another seed: every video is made again, as a new folder would get it.
    make_synthetic(root, videos=2, seed=1, workers=1, overwrite=True)
    fresh = make_synthetic(tmp_path / "fresh", videos=2, seed=1, workers=1)
    assert [p.read_bytes() for p in _mp4s(root)] == [p.read_bytes() for p in _mp4s(fresh)]
    assert (root / "manifest.csv").read_bytes() == (fresh / "manifest.csv").read_bytes()


def _running(pgid: int, out: Path) -> list[str]:
    """Live processes of the process group, or writing into out (ffmpeg runs in a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if state != "Z" and (int(pgrp) == pgid or str(out) in cmdline):
            found.append(cmdline)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("when", ["while the workers start", "while videos are rendered"])
def test_ctrl_c_stops_at_once_and_leaves_only_whole_videos(tmp_path, when):
    out = tmp_path / "s"
    # A session of its own, as a terminal's foreground job: Ctrl-C sends SIGINT to every process of the group. A suite
    # started in the background (`make test &`) ignores SIGINT, and exec passes an ignored signal on: not here.
    background = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "make-synthetic", "--out", str(out), "--videos",
                                 "3000"], env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, background)
    ready = (lambda: (out / "params.json").is_file()) if when.endswith("start") else (lambda: _mp4s(out))
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10 and proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Aborted" not in err
    assert err.endswith(f"\ninterrupted: finished videos are kept in {out}; run the same command to continue\n")
    for _ in range(100):  # the pool's resource tracker ends a moment after the command
        if not _running(proc.pid, out):
            break
        time.sleep(0.05)
    assert not _running(proc.pid, out)
    # Every video with its final name is whole (the set it was cut from, as the same command goes on with it).
    assert not (out / "manifest.csv").exists() and len(_mp4s(out)) < 3000
    by_video = {p.video: p.scene for p in plan(max([int(p.stem[1:]) + 1 for p in _mp4s(out)], default=0), 0)}
    for path in _mp4s(out):
        again = tmp_path / "again.mp4"
        encode_video(render_video(by_video[path.relative_to(out).as_posix()], 64, 24), again, 12)
        assert path.read_bytes() == again.read_bytes(), path.name


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="even"):
        make_synthetic(tmp_path / "x", videos=2, size=63)
    with pytest.raises(UserError, match="frames"):
        make_synthetic(tmp_path / "x", videos=2, seconds=0.05)
    (tmp_path / "y" / "videos").mkdir(parents=True)
    (tmp_path / "y" / "videos" / "v00000.mp4").write_bytes(b"not ours")
    with pytest.raises(UserError, match="params.json"):
        make_synthetic(tmp_path / "y", videos=2)


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    theirs = tmp_path / "msvd"
    (theirs / "videos").mkdir(parents=True)
    (theirs / "manifest.csv").write_text("video,caption,split\nvideos/a.mp4,their caption,train\n")
    (theirs / "videos" / "a.mp4").write_bytes(b"their video")
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli.main, ["make-synthetic", "--out", str(theirs), "--videos", "1"])
    assert result.exit_code == 2
    assert result.output == (f"error: {theirs}: holds files but no params.json, so it is not a synthetic set made by "
                             "make-synthetic; choose another --out (a new or empty folder)\n")
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(UserError, match=rf"^{re.escape(str(a_file))}: is a file, not a folder; choose another --out"):
        make_synthetic(a_file, videos=1)
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert read_manifest(make_synthetic(tmp_path / "empty", videos=1, workers=1))


def test_negative_seed_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli.main, ["make-synthetic", "--out", str(tmp_path / "x"), "--videos", "2", "--seed", "-1"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seed': -1 is not in the range x>=0" in result.output
    assert not (tmp_path / "x").exists()


def test_adapter_generates_when_missing(generated, tmp_path, monkeypatch):
    _import_adapters()
    assert ADAPTERS["synthetic"] is load and "synthetic" in GENERATED
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data" / "synthetic"  # the default data root, not there yet: the adapter makes it
    records = load(root, videos=N_VIDEOS)
    assert (root / "manifest.csv").is_file()
    assert len(records) == N_VIDEOS and {r.split for r in records} == set(SPLITS)
    assert all(3 <= len(r.captions) <= 5 and r.path.is_file() for r in records)
    stamp = (root / "manifest.csv").stat().st_mtime_ns
    assert load(root, videos=N_VIDEOS) == records and (root / "manifest.csv").stat().st_mtime_ns == stamp
    # A copy of an already generated set loads without generating.
    copy = tmp_path / "copy"
    shutil.copytree(generated, copy)
    assert [r.captions for r in load(copy)] == [r.captions for r in records]


def _no_synthetic_set(root: Path) -> str:
    return (f"{root}: holds no finished synthetic set (manifest.csv and params.json from make-synthetic); pass "
            "--dataset msvd|msrvtt|manifest for another dataset, or make a set with make-synthetic --out DIR (a new or "
            "empty folder, or an unfinished set) and pass that as --data-root")


def test_adapter_generates_nothing_outside_the_default_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msvd = tmp_path / "msvd"
    msvd.mkdir()
    (msvd / "raw-captions.pkl").write_bytes(b"their captions")
    cache = tmp_path / "cache" / "c.zarr"
    result = CliRunner().invoke(cli.main, ["extract", "--data-root", str(msvd), "--cache", str(cache)])
    assert result.exit_code == 2 and result.output == f"error: {_no_synthetic_set(msvd)}\n"
    assert [p.name for p in msvd.iterdir()] == ["raw-captions.pkl"]
    # A mistyped path, another dataset's manifest, the default root holding other files, an unfinished set elsewhere.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.csv").write_text("video,caption,split\nvideos/a.mp4,a caption,train\n")
    (tmp_path / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "notes.txt").write_text("mine")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "params.json").write_text("{}")
    for root in (tmp_path / "msvd_typo", tmp_path / "mine", Path("data/synthetic"), tmp_path / "unfinished"):
        with pytest.raises(UserError) as refused:
            load(root, videos=2)
        assert str(refused.value) == _no_synthetic_set(root)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["data/synthetic/notes.txt", "mine/manifest.csv", "msvd/raw-captions.pkl",
                     "unfinished/params.json"]  # nor anything beside --cache: the records are read before the lock


def test_adapter_finishes_a_killed_generation_with_its_own_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_synthetic(Path("data/synthetic"), videos=3, seed=5, workers=1)
    manifest = (root / "manifest.csv").read_bytes()
    (root / "manifest.csv").unlink()  # as a run killed before its end leaves it
    assert load(root) == read_manifest(root) and (root / "manifest.csv").read_bytes() == manifest


# ------------------------------------------------------------------------------ clutter


def test_clutter_adds_unnamed_corner_objects_and_keeps_scenes_and_twins():
    plain, cluttered = plan(80, 7), plan(80, 7, clutter=4)
    assert [replace(p.scene, clutter=()) for p in cluttered] == [p.scene for p in plain]
    by_id = {p.video: p for p in cluttered}
    full = 0
    for p in cluttered:
        scene = p.scene
        named = {o.key for o in scene.objects}
        assert len(scene.clutter) <= 4 and len({o.position for o in scene.clutter}) == len(scene.clutter)
        full += len(scene.clutter) == 4
        assert all(o.position in CORNERS and o.motion == "still" and o.visible == (0, 6) for o in scene.clutter)
        assert not named & {o.key for o in scene.clutter}, scene  # every caption keeps a single referent
        counts = [c for c in p.captions if re.search(r"\b(one|two|three) (objects?|shapes?)\b", c)]
        assert not (counts and scene.clutter), counts  # clutter would make them wrong
        if p.twin_of:
            twin = by_id[p.twin_of].scene
            assert twin.clutter == scene.clutter and not {o.key for o in twin.objects} & {o.key for o in scene.clutter}
        frames, bare = render_video(scene, SIZE, FRAMES), render_video(replace(scene, clutter=()), SIZE, FRAMES)
        changed = np.zeros((SIZE, SIZE), bool)
        for o in scene.clutter:
            cx, cy = (int(v * SIZE) for v in CORNERS[o.position])
            assert (frames[:, cy, cx] == COLOURS[o.colour]).all(), o  # drawn in every frame
            reach = int(np.ceil(1.25 * RADIUS[o.size] * SIZE))
            changed[cy - reach: cy + reach + 1, cx - reach: cx + reach + 1] = True
        assert (frames != bare).any(-1).any(0)[~changed].sum() == 0  # nothing else moved: movers' corners are left free
        if p.twin_kind in ("direction", "order"):
            assert np.array_equal(render_video(by_id[p.twin_of].scene, SIZE, FRAMES), frames[::-1])
    assert full > len(cluttered) / 2


def test_clutter_is_recorded_and_bounded(tmp_path):
    root = make_synthetic(tmp_path / "c", videos=3, seed=2, workers=1, clutter=2)
    assert json.loads((root / "params.json").read_text())["clutter"] == 2
    rows = read_scenes(root)
    assert all(len(r["scene"].clutter) == 2 and "clutter: " in r["description"] for r in rows)
    assert "clutter" not in json.loads((make_synthetic(tmp_path / "p", videos=1, workers=1) / "params.json").read_text())
    with pytest.raises(UserError, match="--clutter 5"):
        make_synthetic(tmp_path / "x", videos=2, clutter=5)
