"""Synthetic benchmark: coloured shapes that sit, move, appear and disappear, with twin videos as hard negatives.

Everything follows from a scene description (`Scene`): rendering draws it with numpy, captions are
sentences built from the facts it makes true, and a twin is the same scene with one attribute changed:

- colour:    two objects swap colours (binding: which colour goes with which shape);
- direction: the one moving object moves the other way; the video is exactly the time reversal;
- order:     two objects are shown in the opposite order; again exactly the time reversal;
- position:  positions mirrored left<->right or top<->bottom.

With `clutter`, up to four more objects sit in the frame's corners, the same in a video and its twin and never
named by a caption: the caption's objects must be found among look-alikes, which a summary of the whole frame
holds only mixed with the clutter.

Direction and order twins hold the same multiset of frames, so mean-pooled frame features cannot tell
them apart; only a model that reads the frame order can. Every caption of a twin video states a fact
that is false for its twin. Randomness comes from `numpy.random.default_rng` seeded per twin group and
per video, so the output depends only on the arguments, never on the number of worker processes.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ffmpeg
import numpy as np
from tqdm import tqdm

from pipeline.datasets.common import read_csv
from pipeline.errors import UserError
from pipeline.files import held_lock, write_text_atomic
from pipeline.ffmpeg import ffmpeg_exe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when rendering or planning changes, so old folders are refused (remade with --overwrite)

# ----------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 80),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 60),
    "purple": (170, 60, 190),
    "white": (245, 245, 245),
}
BACKGROUND = (45, 45, 45)
SIZES = ("small", "large")
RADIUS = {"small": 0.07, "large": 0.12}  # fraction of the frame side; shapes reach at most 1.2 radii
CELLS = ("left", "right", "top", "bottom", "center")
# Cells are 0.3 of the frame apart: two large shapes (1.2 * 0.12 each) never touch.
CELL_XY = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
# Clutter only: corners are never described, and are 0.3 from the nearest cells like the cells from each other.
CORNERS = {"top-left": (0.2, 0.2), "top-right": (0.8, 0.2), "bottom-left": (0.2, 0.8), "bottom-right": (0.8, 0.8)}
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
MIRROR = {"h": {"left": "right", "right": "left"}, "v": {"top": "bottom", "bottom": "top"}}
# A moving object travels along a lane between 0.2 and 0.8 and blocks every cell it passes through.
LANES = {"h": ("top", "center", "bottom"), "v": ("left", "center", "right")}
LANE_CORNERS = {  # lanes 0.2 from the edge end in two corners
    ("h", "top"): {"top-left", "top-right"}, ("h", "bottom"): {"bottom-left", "bottom-right"},
    ("v", "left"): {"top-left", "bottom-left"}, ("v", "right"): {"top-right", "bottom-right"},
}
LANE_CELLS = {
    ("h", "top"): {"top"}, ("h", "center"): {"left", "center", "right"}, ("h", "bottom"): {"bottom"},
    ("v", "left"): {"left"}, ("v", "center"): {"top", "center", "bottom"}, ("v", "right"): {"right"},
}
AXIS = {"left": "h", "right": "h", "up": "v", "down": "v"}
SIXTHS = 6  # visibility is given in sixths of the clip: (0, 6) is always visible
TWIN_KINDS = ("colour", "direction", "order", "position")
TWIN_ATTRIBUTE = {"colour": "colour", "direction": "motion", "order": "visible", "position": "position"}
PAIR_PROBABILITY = 0.7  # per group, so about 82% of the videos have a twin
# Splits go by twin group; the cycle gives 70/10/20 and all three splits from the third group on.
SPLIT_CYCLE = ("train", "test", "val", "train", "train", "test", "train", "train", "train", "train")
# Both objects of an order twin, as (first, second) visibility; the second is the time reversal of the first.
ORDER_VARIANTS = (((0, 3), (3, 6)), ((1, 4), (2, 5)), ((0, 4), (2, 6)), ((1, 3), (3, 5)))

SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
CELL_WORDS = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle"),
}
LANE_WORDS = {
    "left": ("along the left side", "on the left"),
    "right": ("along the right side", "on the right"),
    "top": ("along the top", "at the top"),
    "bottom": ("along the bottom", "at the bottom"),
    "center": ("through the middle", "across the middle"),
}
MOTION_WORDS = {
    "left": ("moves to the left", "moves left", "slides left", "travels to the left"),
    "right": ("moves to the right", "moves right", "slides right", "travels to the right"),
    "up": ("moves up", "rises", "moves upward", "goes up"),
    "down": ("moves down", "falls", "moves downward", "drops"),
    "still": ("stays still", "does not move", "stays in place"),
}
MOTION_ING = {
    "left": ("moving left", "sliding left"),
    "right": ("moving right", "sliding right"),
    "up": ("moving up", "rising"),
    "down": ("moving down", "falling"),
}
EVENT_WORDS = {
    "appears": ("appears", "shows up", "comes into view"),
    "disappears": ("disappears", "vanishes", "goes away"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it looks like, where it is (its cell, or its lane when moving), how it moves, when it is seen."""

    shape: str
    colour: str
    size: str
    position: str
    motion: str = "still"
    visible: tuple[int, int] = (0, SIXTHS)  # [start, end) in sixths of the clip

    @property
    def key(self) -> tuple[str, str]:
        """Colour and shape, unique within a scene, so captions can name the object."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A video (or, with still, always visible objects, a single frame): one to three objects on a plain background,
    and the clutter in the corners that captions never name."""

    objects: tuple[SceneObject, ...]
    clutter: tuple[SceneObject, ...] = ()

    def to_json(self) -> dict:
        """A JSON-ready dict (visibility as a list; no 'clutter' key without clutter)."""
        as_json = lambda objs: [{**o.__dict__, "visible": list(o.visible)} for o in objs]  # noqa: E731
        return {"objects": as_json(self.objects), **({"clutter": as_json(self.clutter)} if self.clutter else {})}

    @staticmethod
    def from_json(data: dict) -> Scene:
        """The inverse of to_json."""
        parse = lambda objs: tuple(SceneObject(**{**o, "visible": tuple(o["visible"])}) for o in objs)  # noqa: E731
        return Scene(parse(data["objects"]), parse(data.get("clutter", [])))


def describe(scene: Scene) -> str:
    """The full scene in one canonical line, e.g. 'large red circle at left, still, visible 0/6-6/6'."""
    parts = []
    for o in scene.objects:
        where = f"lane {o.position}" if o.motion != "still" else f"at {o.position}"
        motion = "still" if o.motion == "still" else f"moving {o.motion}"
        parts.append(f"{o.size} {o.colour} {o.shape} {where}, {motion}, visible {o.visible[0]}/6-{o.visible[1]}/6")
    clutter = ", ".join(f"{o.size} {o.colour} {o.shape} at {o.position}" for o in scene.clutter)
    return "; ".join(parts) + (f"; clutter: {clutter}" if clutter else "")


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _looks(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) with distinct shapes and distinct colours."""
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    names = list(COLOURS)
    colours = [names[i] for i in rng.permutation(len(names))[:n]]
    return [(s, c, _pick(rng, SIZES)) for s, c in zip(shapes, colours)]


def _sample_scene(rng: np.random.Generator, n: int, movers: int = 0, events: bool = False) -> Scene:
    """n objects, the first `movers` of them moving along parallel lanes, the rest still in free cells."""
    looks = _looks(rng, n)
    objects: list[SceneObject] = []
    free = set(CELLS)
    if movers:
        axis = _pick(rng, ("h", "v"))
        lanes = [_pick(rng, LANES[axis])] if movers == 1 else [LANES[axis][i] for i in rng.permutation([0, 2])]
        for (shape, colour, size), lane in zip(looks, lanes):
            motion = _pick(rng, ("left", "right") if axis == "h" else ("up", "down"))
            objects.append(SceneObject(shape, colour, size, lane, motion))
            free -= LANE_CELLS[(axis, lane)]
    cells = sorted(free, key=CELLS.index)
    for (shape, colour, size), i in zip(looks[movers:], rng.permutation(len(cells))):
        objects.append(SceneObject(shape, colour, size, cells[i]))
    if events:
        objects = _add_events(rng, objects)
    order = rng.permutation(len(objects))  # movers need not come first in the description
    return Scene(tuple(objects[i] for i in order))


_INTERVALS = [(a, b) for a in range(SIXTHS) for b in range(a + 2, SIXTHS + 1) if (a, b) != (0, SIXTHS)]


def _event_times(visible: tuple[int, int]) -> list[int]:
    return [t for t, edge in zip(visible, (0, SIXTHS)) if t != edge]


def _add_events(rng: np.random.Generator, objects: list[SceneObject]) -> list[SceneObject]:
    """Give one or two still objects an appearance and/or disappearance, every event at its own time."""
    stills = [i for i, o in enumerate(objects) if o.motion == "still"]
    if not stills:
        return objects
    chosen = [stills[i] for i in rng.permutation(len(stills))[: int(rng.integers(1, 3))]]
    for _ in range(50):
        spans = [_INTERVALS[int(rng.integers(len(_INTERVALS)))] for _ in chosen]
        times = [t for s in spans for t in _event_times(s)]
        if len(times) == len(set(times)):  # simultaneous events would make "first X then Y" ambiguous
            break
    else:
        chosen, spans = chosen[:1], spans[:1]
    out = list(objects)
    for i, span in zip(chosen, spans):
        out[i] = replace(out[i], visible=span)
    return out


def sample_frame_scene(rng: np.random.Generator) -> Scene:
    """A still scene for image pretraining: one to three objects in distinct cells, no motion, no timing."""
    return _sample_scene(rng, int(rng.integers(1, 4)))


def _sample_group(rng: np.random.Generator, kind: str | None) -> tuple[Scene, Scene | None]:
    """A scene and, for a twin kind, its twin that differs in that one attribute."""
    if kind is None:
        n = int(rng.integers(1, 4))
        u = rng.random()
        movers = 2 if (u < 0.15 and n >= 2) else 1 if u < 0.5 else 0
        return _sample_scene(rng, n, movers, events=bool(rng.random() < 0.4)), None
    if kind == "colour":
        n = int(rng.integers(2, 4))
        u = rng.random()
        scene = _sample_scene(rng, n, 1 if u < 0.35 else 0, events=bool(rng.random() < 0.3))
        i, j = (int(k) for k in rng.permutation(n)[:2])
        objs = list(scene.objects)
        objs[i], objs[j] = replace(objs[i], colour=objs[j].colour), replace(objs[j], colour=objs[i].colour)
        return scene, Scene(tuple(objs))
    if kind == "direction":
        scene = _sample_scene(rng, int(rng.integers(1, 4)), movers=1)
        return scene, Scene(tuple(replace(o, motion=REVERSE[o.motion]) for o in scene.objects))
    if kind == "order":
        scene = _sample_scene(rng, int(rng.integers(2, 4)))
        first, second = ORDER_VARIANTS[int(rng.integers(len(ORDER_VARIANTS)))]
        x, y = (int(k) for k in rng.permutation(len(scene.objects))[:2])
        objs = list(scene.objects)
        objs[x], objs[y] = replace(objs[x], visible=first), replace(objs[y], visible=second)
        twin = list(objs)
        twin[x], twin[y] = replace(objs[x], visible=second), replace(objs[y], visible=first)
        return Scene(tuple(objs)), Scene(tuple(twin))
    if kind == "position":
        while True:
            scene = _sample_scene(rng, int(rng.integers(1, 4)))
            axes = [a for a in ("h", "v") if any(o.position in MIRROR[a] for o in scene.objects)]
            if axes:
                break
        mirror = MIRROR[_pick(rng, axes)]
        return scene, Scene(tuple(replace(o, position=mirror.get(o.position, o.position)) for o in scene.objects))
    raise ValueError(f"unknown twin kind {kind!r}")


def _add_clutter(rng: np.random.Generator, scenes: Sequence[Scene], n: int) -> list[Scene]:
    """The same n clutter objects (fewer where movers' lanes end in the corners) added to each of scenes.

    Every clutter object looks like some object of the vocabulary, but never like one the scenes name
    (colour and shape), so each caption still has one referent.
    """
    named = {o.key for s in scenes for o in s.objects}
    blocked = {c for s in scenes for o in s.objects if o.motion != "still"
               for c in LANE_CORNERS.get((AXIS[o.motion], o.position), ())}
    corners = [c for c in CORNERS if c not in blocked]
    looks = [(shape, colour) for shape in SHAPES for colour in COLOURS if (colour, shape) not in named]
    clutter = tuple(
        SceneObject(*looks[int(i)], _pick(rng, SIZES), corners[int(j)])
        for i, j in zip(rng.permutation(len(looks))[:n], rng.permutation(len(corners))[:n])
    )
    return [replace(s, clutter=clutter) for s in scenes]


# ----------------------------------------------------------------------------- drawing

_SUPERSAMPLE = 2  # 2x2 samples per pixel: smooth edges at 64 px


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    n = size * _SUPERSAMPLE
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which sample points (offsets from the centre, in frame units, y down) fall inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    if shape == "triangle":
        # Equilateral, pointing up, circumradius 1.2 r, centroid at the centre: three edges at inradius 0.6 r.
        h = 0.6 * r
        return (dy <= h) & (0.866 * dx - 0.5 * dy <= h) & (-0.866 * dx - 0.5 * dy <= h)
    raise ValueError(f"unknown shape {shape!r}")


def _draw(placed: Iterable[tuple[SceneObject, float, float]], size: int) -> np.ndarray:
    """The one drawing routine: objects at centres (x, y) in frame units over the background -> [S, S, 3] uint8."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUND
    g = _grid(size)
    for o, cx, cy in placed:
        r = RADIUS[o.size]
        # Only the pixels around the shape (it reaches 1.2 r from its centre) can be covered.
        x0, x1 = max(0, int((cx - 1.25 * r) * size)), min(size, int(np.ceil((cx + 1.25 * r) * size)))
        y0, y1 = max(0, int((cy - 1.25 * r) * size)), min(size, int(np.ceil((cy + 1.25 * r) * size)))
        ss = _SUPERSAMPLE
        inside = _inside(o.shape, g[None, x0 * ss : x1 * ss] - cx, g[y0 * ss : y1 * ss, None] - cy, r)
        alpha = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))  # coverage [h, w]
        window = img[y0:y1, x0:x1]
        window += alpha[..., None] * (np.asarray(COLOURS[o.colour], dtype=np.float64) - window)
    return np.rint(img).astype(np.uint8)


def centre(o: SceneObject, progress: float = 0.5) -> tuple[float, float]:
    """Where o's centre is (x, y in frame units, y down) at progress 0..1 through the clip."""
    if o.motion == "still":
        return CELL_XY[o.position] if o.position in CELL_XY else CORNERS[o.position]
    start, end = (0.8, 0.2) if o.motion in ("left", "up") else (0.2, 0.8)
    along = start + (end - start) * progress
    if AXIS[o.motion] == "h":
        return along, CELL_XY[o.position][1]
    return CELL_XY[o.position][0], along


def render_frame(scene: Scene, size: int) -> np.ndarray:
    """A still scene drawn as one [S, S, 3] uint8 RGB image (moving objects at the middle of their lane)."""
    return _draw(((o, *centre(o)) for o in scene.objects + scene.clutter), size)


def _boundary(sixth: int, n_frames: int) -> int:
    # Rounding half up is symmetric (b(6-k) == n - b(k)) unless k * n is an odd multiple of 3, so a
    # visibility span and its mirror image cover time-reversed frames exactly (always when n is even).
    return (sixth * n_frames + SIXTHS // 2) // SIXTHS


def render_video(scene: Scene, size: int, n_frames: int) -> np.ndarray:
    """The scene as [T, S, S, 3] uint8 RGB frames; motion runs linearly from the first frame to the last."""
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for t in range(n_frames):
        progress = t / (n_frames - 1) if n_frames > 1 else 0.5
        seen = [o for o in scene.objects if _boundary(o.visible[0], n_frames) <= t < _boundary(o.visible[1], n_frames)]
        frames[t] = _draw(((o, *centre(o, progress)) for o in scene.clutter + tuple(seen)), size)
    return frames


# ----------------------------------------------------------------------------- facts and captions

Fact = tuple
Caption = tuple[str, frozenset]
Template = Callable[[np.random.Generator], Caption]


def _events(o: SceneObject) -> list[tuple[str, int]]:
    a, b = o.visible
    return ([("appears", a)] if a > 0 else []) + ([("disappears", b)] if b < SIXTHS else [])


def scene_facts(scene: Scene) -> set[Fact]:
    """Every statement a caption may make about the scene; a caption is true iff its facts are a subset."""
    out: set[Fact] = {("count", len(scene.objects))}
    for o in scene.objects:
        k = o.key
        out |= {("is", *k), ("size", *k, o.size), ("at", *k, o.position), ("moves", *k, o.motion)}
        out |= {(event, *k) for event, _ in _events(o)}
    for x in scene.objects:
        for y in scene.objects:
            if x is y:
                continue
            (ax, bx), (ay, by) = x.visible, y.visible
            if ax < ay and bx < by:
                out.add(("before", x.key, y.key))
                if bx == ay:
                    out.add(("replaced", x.key, y.key))
            for ex, tx in _events(x):
                for ey, ty in _events(y):
                    if tx < ty:
                        out.add(("event_before", x.key, ex, y.key, ey))
            # Spatial relations only between still objects that are seen together.
            if x.motion == y.motion == "still" and max(ax, ay) < min(bx, by):
                (xx, xy), (yx, yy) = CELL_XY[x.position], CELL_XY[y.position]
                if xx < yx:
                    out.add(("left_of", x.key, y.key))
                if xy < yy:
                    out.add(("above", x.key, y.key))
    return out


def _np(o: SceneObject, rng: np.random.Generator) -> Caption:
    """'a [size] colour shape', e.g. 'a big red ball'."""
    words = ["a"]
    fs = {("is", *o.key)}
    if rng.random() < 0.3:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
        fs.add(("size", *o.key, o.size))
    words += [o.colour, _pick(rng, SHAPE_WORDS[o.shape])]
    return " ".join(words), frozenset(fs)


def _where(o: SceneObject, rng: np.random.Generator) -> str:
    return _pick(rng, LANE_WORDS[o.position] if o.motion != "still" else CELL_WORDS[o.position])


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _templates(scene: Scene, static: bool) -> list[Template]:
    """Caption makers for the scene; static keeps to shapes, colours, sizes and positions."""
    objs = scene.objects
    out: list[Template] = []

    def placed(o: SceneObject, rng: np.random.Generator) -> Caption:
        """'a red ball on the left' or, when moving, 'a red ball moving left along the top'."""
        text, fs = _np(o, rng)
        fs = fs | {("at", *o.key, o.position)}
        if o.motion != "still":
            return f"{text} {_pick(rng, MOTION_ING[o.motion])} {_where(o, rng)}", fs | {("moves", *o.key, o.motion)}
        return f"{text} {_where(o, rng)}", fs

    for o in objs:
        if o.motion == "still" or static:
            def still(rng, o=o):
                text, fs = placed(o, rng)
                form = int(rng.integers(2 if static or o.visible != (0, SIXTHS) else 3))
                if form == 2:
                    np_text, np_fs = _np(o, rng)
                    verb = _pick(rng, MOTION_WORDS["still"])
                    said = {("at", *o.key, o.position), ("moves", *o.key, "still")}
                    return f"{np_text} {verb} {_where(o, rng)}", np_fs | said
                return (f"there is {text}" if form else text), fs

            out.append(still)
        if o.motion != "still" and not static:
            def moving(rng, o=o):
                text, fs = _np(o, rng)
                fs = fs | {("at", *o.key, o.position), ("moves", *o.key, o.motion)}
                verb, where = _pick(rng, MOTION_WORDS[o.motion]), _where(o, rng)
                return (f"{text} {verb} {where}" if rng.random() < 0.5 else f"{where}, {text} {verb}"), fs

            out.append(moving)
        if _events(o) and not static:
            def event(rng, o=o):
                text, fs = _np(o, rng)
                fs = fs | {("at", *o.key, o.position)}
                said = [_pick(rng, EVENT_WORDS[ev]) for ev, _ in _events(o)]
                fs = fs | {(ev, *o.key) for ev, _ in _events(o)}
                later = f" and then {said[1]}" if len(said) == 2 else ""
                return f"{text} {said[0]} {_where(o, rng)}{later}", fs

            out.append(event)

    if len(objs) >= 2:
        def layout(rng):
            parts, fs = [], frozenset()
            for i in rng.permutation(len(objs)):
                text, f = placed(objs[int(i)], rng)
                parts.append(text)
                fs |= f
            return _pick(rng, ("", "there is ", "a scene with ")) + _join(parts), fs

        out.append(layout)

    def count(rng):
        parts, fs = [], frozenset({("count", len(objs))})
        for i in rng.permutation(len(objs)):
            text, f = _np(objs[int(i)], rng)
            parts.append(text)
            fs |= f
        noun = _pick(rng, ("objects", "shapes")) if len(objs) > 1 else _pick(rng, ("object", "shape"))
        lead = f"only {NUMBER_WORDS[len(objs)]} {noun}" if len(objs) == 1 else f"{NUMBER_WORDS[len(objs)]} {noun}"
        return f"{lead}: {_join(parts)}", fs

    if not scene.clutter:  # clutter would make every count wrong
        out.append(count)

    true = scene_facts(scene)
    by_key = {o.key: o for o in objs}
    for fact in sorted(true):
        if fact[0] == "left_of" or fact[0] == "above":
            x, y = by_key[fact[1]], by_key[fact[2]]

            def relation(rng, x=x, y=y, fact=fact):
                (tx, fx), (ty, fy) = _np(x, rng), _np(y, rng)
                fs = fx | fy | {fact}
                if fact[0] == "left_of":
                    forms = (f"{tx} is to the left of {ty}", f"{ty} is to the right of {tx}", f"{tx} is left of {ty}")
                else:
                    forms = (f"{tx} is above {ty}", f"{ty} is below {tx}", f"{tx} is higher than {ty}")
                return _pick(rng, forms), fs

            out.append(relation)
        if static:
            continue
        if fact[0] == "before":
            x, y = by_key[fact[1]], by_key[fact[2]]

            def before(rng, x=x, y=y, fact=fact):
                (tx, fx), (ty, fy) = _np(x, rng), _np(y, rng)
                fs = fx | fy | {fact}
                forms = [f"first {tx}, then {ty}", f"{tx} is shown before {ty}", f"{ty} comes after {tx}"]
                if rng.random() < 0.3:
                    forms = [f"first {tx} {_where(x, rng)}, then {ty} {_where(y, rng)}"]
                    fs |= {("at", *x.key, x.position), ("at", *y.key, y.position)}
                if ("replaced", x.key, y.key) in true:
                    forms.append(f"{tx} is replaced by {ty}")
                    text = _pick(rng, forms)
                    return text, fs | ({("replaced", x.key, y.key)} if "replaced" in text else set())
                return _pick(rng, forms), fs

            out.append(before)
        if fact[0] == "event_before":
            x, ex, y, ey = by_key[fact[1]], fact[2], by_key[fact[3]], fact[4]

            def event_order(rng, x=x, ex=ex, y=y, ey=ey, fact=fact):
                (tx, fx), (ty, fy) = _np(x, rng), _np(y, rng)
                vx, vy = _pick(rng, EVENT_WORDS[ex]), _pick(rng, EVENT_WORDS[ey])
                forms = (
                    f"first {tx} {vx}, then {ty} {vy}", f"{tx} {vx} before {ty} {vy}", f"{ty} {vy} after {tx} {vx}"
                )
                return _pick(rng, forms), fx | fy | {fact, (ex, *x.key), (ey, *y.key)}

            out.append(event_order)

    movers = [o for o in objs if o.motion != "still"]
    if not static:
        for m in movers:
            for o in objs:
                if o is m:
                    continue

                def contrast(rng, m=m, o=o):
                    (tm, fm), (to, fo) = _np(m, rng), _np(o, rng)
                    vm, vo = _pick(rng, MOTION_WORDS[m.motion]), _pick(rng, MOTION_WORDS[o.motion])
                    text = f"{tm} {vm} while {to} {vo}" if rng.random() < 0.6 else f"{tm} {vm} and {to} {vo}"
                    return text, fm | fo | {("moves", *m.key, m.motion), ("moves", *o.key, o.motion)}

                out.append(contrast)
    return out


def _captions(
    scene: Scene, rng: np.random.Generator, static: bool = False, against: Scene | None = None
) -> list[Caption]:
    """Three to five distinct true captions, each with the facts it states; with `against`, each one is false for
    that scene."""
    makers = _templates(scene, static)
    ruled_out = scene_facts(against) if against is not None else None
    want = int(rng.integers(3, 6))
    out: dict[str, frozenset] = {}
    for attempt in range(200):
        if attempt % len(makers) == 0:
            order = rng.permutation(len(makers))  # go through every template before repeating one
        text, fs = makers[int(order[attempt % len(makers)])](rng)
        if ruled_out is not None and fs <= ruled_out:
            continue
        if text not in out:
            out[text] = frozenset(fs)
            if len(out) == want:
                break
    return list(out.items())


def frame_captions(scene: Scene, rng: np.random.Generator, against: Scene | None = None) -> list[str]:
    """Three to five captions of a still scene: shapes, colours, sizes and positions only; with `against`, each one
    is false for that scene (none when no such caption exists)."""
    return [text for text, _ in _captions(scene, rng, static=True, against=against)]


def video_captions(scene: Scene, rng: np.random.Generator, twin: Scene | None = None) -> list[Caption]:
    """Three to five captions of a video scene, each with the facts it states; with a twin, every caption is false
    for the twin."""
    return _captions(scene, rng, against=twin)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedVideo:
    """One video of the benchmark: its path relative to the root (the manifest's video id), scene, captions, twin."""

    video: str
    group: int
    scene: Scene
    captions: tuple[str, ...]
    facts: tuple[frozenset, ...]  # what each caption states: true of a scene iff a subset of scene_facts(scene)
    split: str
    twin_kind: str | None
    twin_of: str | None


def plan(videos: int, seed: int, clutter: int = 0) -> list[PlannedVideo]:
    """The benchmark's annotations, group by group; the first k videos are the same for any videos >= k.

    Clutter draws from a stream of its own: the scenes are those of the set without it (the captions are drawn
    alike, less the counting ones).
    """
    out: list[PlannedVideo] = []
    seen: set[frozenset] = set()
    group = 0
    while len(out) < videos:
        rng = np.random.default_rng([seed, group])
        kind = _pick(rng, TWIN_KINDS) if rng.random() < PAIR_PROBABILITY else None
        while True:
            scene, twin = _sample_group(rng, kind)
            # Two identical videos would make a right answer count as wrong; the object order does not matter.
            keys = [frozenset(s.objects) for s in (scene, twin) if s is not None]
            if not seen.intersection(keys):
                seen.update(keys)
                break
        members = [scene] if twin is None or len(out) + 2 > videos else [scene, twin]
        if clutter:
            members = _add_clutter(np.random.default_rng([seed, group, 2]), members, clutter)
        ids = [f"videos/v{len(out) + m:05d}.mp4" for m in range(len(members))]
        for m, s in enumerate(members):
            other = members[1 - m] if len(members) == 2 else None
            captions = video_captions(s, np.random.default_rng([seed, group, m, 1]), other)
            out.append(PlannedVideo(
                video=ids[m],
                group=group,
                scene=s,
                captions=tuple(text for text, _ in captions),
                facts=tuple(fs for _, fs in captions),
                split=SPLIT_CYCLE[group % len(SPLIT_CYCLE)],
                twin_kind=kind if other is not None else None,
                twin_of=ids[1 - m] if other is not None else None,
            ))
        group += 1
    return out


# ----------------------------------------------------------------------------- writing


def encode_video(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode [T, S, S, 3] uint8 RGB frames as H.264 yuv420p .mp4, reproducibly, atomically."""
    _, h, w, _ = frames.shape
    tmp = path.with_name(f".{path.name}.part")
    stream = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
        .output(
            str(tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=18, preset="medium",
            # One thread and bitexact muxing: the same frames always give the same bytes.
            threads=1, map_metadata=-1, fflags="+bitexact", **{"flags:v": "+bitexact"},
        )
    )
    # A session of its own: a Ctrl-C in the terminal reaches only us, and we stop ffmpeg (it would exit "failed").
    proc = subprocess.Popen(stream.compile(cmd=ffmpeg_exe(), overwrite_output=True), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(np.ascontiguousarray(frames).tobytes())
    except BaseException:  # Ctrl-C, or the pool stopping this worker: no ffmpeg and no .part file left behind
        proc.kill()
        proc.wait()
        tmp.unlink(missing_ok=True)
        raise
    if proc.returncode:
        tmp.unlink(missing_ok=True)
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{path}: ffmpeg failed to encode: {' | '.join(tail)}")
    os.replace(tmp, path)  # only a whole video ever has its final name: a re-run takes those as done


def _render_one(task: tuple[Scene, str, int, int, int]) -> str:
    scene, path, size, n_frames, fps = task
    encode_video(render_video(scene, size, n_frames), Path(path), fps)
    return path


def _worker_init() -> None:
    """Pool worker: Ctrl-C is the parent's to handle; Pool.terminate()'s SIGTERM exits through encode_video's cleanup
    (stopping ffmpeg, removing the .part file) instead of killing the worker in the middle of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # again, for a worker the pool starts later to replace one
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@contextlib.contextmanager
def _sigint_held():
    """Processes started in here ignore SIGINT from their first instruction on (exec keeps an ignored signal), so a
    Ctrl-C reaches only this process, which stops them, and no worker prints a traceback. A Ctrl-C meanwhile is held
    back (blocked; Linux never discards a blocked signal) and raised on the way out."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield  # only the main thread sets handlers; _worker_init still ignores SIGINT once the worker runs
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a held Ctrl-C is raised here


def _render_all(tasks: list[tuple], workers: int) -> None:
    """Render and encode the tasks' videos; on Ctrl-C (or an error) the pending ones are dropped and the running ones
    stopped at once, their ffmpeg included."""
    if not tasks:  # a finished set: no empty progress bar
        return
    progress = functools.partial(tqdm, total=len(tasks), desc="synthetic videos", unit="video")
    if workers == 1:
        with progress() as bar:
            for task in tasks:
                _render_one(task)
                bar.update()
        return
    pool = None
    try:
        with _sigint_held():  # before the progress bar starts its thread, which a held Ctrl-C could be lost to
            # spawn: the caller may hold threads (torch, tqdm) that make fork unsafe.
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
        with progress() as bar:
            for _ in pool.imap_unordered(_render_one, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 4)))):
                bar.update()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    else:
        pool.close()
    finally:
        if pool is not None:
            pool.join()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


LOCK = ".lock"  # in out/, held by the make-synthetic writing it


def set_state(out: Path) -> str:
    """What out/ holds: 'empty' (nothing, or no folder yet), 'finished' (params.json and manifest.csv), 'unfinished'
    (params.json only: a run was killed) or 'other' (a file, or files that make-synthetic did not write)."""
    out = Path(out)
    if not out.exists():
        return "empty"
    if not out.is_dir():
        return "other"
    if (out / "params.json").is_file():
        return "finished" if (out / "manifest.csv").is_file() else "unfinished"
    # A run killed while writing params.json leaves only its temporary file (and its lock).
    return "other" if any(p.name not in (".params.json.part", LOCK) for p in out.iterdir()) else "empty"


OPTIONS = {"format": "format", "videos": "--videos", "seed": "--seed", "size": "--size", "seconds": "--seconds",
           "fps": "fps", "clutter": "--clutter"}  # params.json's keys as make-synthetic's options (frames follow)


def recorded_params(out: Path) -> dict | None:
    """The params out/ was made with (None: no params.json), with what older versions left out filled in where known."""
    path = out / "params.json"
    if not path.is_file():
        return None
    old = {"clutter": 0, **json.loads(path.read_text(encoding="utf-8"))}
    if "videos" not in old and set_state(out) == "finished":  # a set from before the count was recorded
        old["videos"] = len((out / "scenes.jsonl").read_text(encoding="utf-8").splitlines())
    return old


def _refuse_other(out: Path) -> None:
    """Someone else's files (their own manifest.csv, say) are never written over, nor written beside."""
    if set_state(out) == "other":
        what = "holds files but no params.json, so it is not a synthetic set made by make-synthetic" if out.is_dir() \
            else "is a file, not a folder"
        raise UserError(f"{out}: {what}; choose another --out (a new or empty folder)")


def _prepare(out: Path, params: dict, planned: Sequence[str], overwrite: bool) -> None:
    """Make out/ hold the planned videos of these params only: a set made with others is refused unless overwrite,
    and then its stale videos are removed before anything is written."""
    videos = out / "videos"
    params_path = out / "params.json"
    _refuse_other(out)
    old, new = recorded_params(out), {"clutter": 0, **params}
    differ = [k for k in OPTIONS if old is not None and old.get(k, new[k]) != new[k]]
    if differ and not overwrite:  # re-rendering it would leave every cache extracted from it stale
        made = " ".join(f"{OPTIONS[k]} {old[k]}" for k in differ)
        asked = " ".join(f"{OPTIONS[k]} {new[k]}" for k in differ)
        raise UserError(f"{out}: holds a synthetic set made with {made}, not {asked}; pass --overwrite to make it "
                        "again (caches extracted from it go stale) or choose another --out")
    if differ:
        log.warning("%s: made with %s; making it again with %s", out, old, new)
        (out / "manifest.csv").unlink(missing_ok=True)  # first: from here on the folder reads as unfinished
    # Another count keeps the first videos (plan is a prefix); anything else changes every one.
    keep = set(planned) if set(differ) <= {"videos"} else set()
    for path in sorted(videos.glob("v*.mp4")) if videos.is_dir() else []:
        if path.relative_to(out).as_posix() not in keep:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # params.json first: a run killed before it wrote anything else leaves a folder that is still ours.
    write_text_atomic(params_path, json.dumps(params, indent=1) + "\n")
    videos.mkdir(exist_ok=True)
    for part in videos.glob(".*.part"):  # left by a killed run
        part.unlink()


def make_synthetic(
    out: Path,
    videos: int = 1000,
    seed: int = 0,
    size: int = 64,
    seconds: float = 2.0,
    fps: int = 12,
    workers: int | None = None,
    clutter: int = 0,
    overwrite: bool = False,
) -> Path:
    """Render the benchmark into out/ (videos/*.mp4, scenes.jsonl, manifest.csv last); resumes a killed run.

    clutter: unnamed objects in the corners of every video (0 to 4; see the module docstring).
    overwrite: make the set again when out/ holds one made with other parameters (refused otherwise).
    """
    n_frames = int(round(seconds * fps))
    if videos < 1:
        raise UserError(f"--videos {videos}: need at least 1 video")
    if size < 16 or size % 2:
        raise UserError(f"--size {size}: need an even frame size of at least 16 pixels (H.264 yuv420p)")
    if fps < 1 or n_frames < 2:
        raise UserError(f"--seconds {seconds} at {fps} fps gives {n_frames} frames; need at least 2")
    if not 0 <= clutter <= len(CORNERS):
        raise UserError(f"--clutter {clutter}: need 0 to {len(CORNERS)} objects (one per corner)")
    out = Path(out)
    params = {"format": FORMAT_VERSION, "videos": videos, "seed": seed, "size": size, "seconds": seconds, "fps": fps,
              "frames": n_frames}
    if clutter:  # only then, as before clutter existed
        params["clutter"] = clutter
    planned = plan(videos, seed, clutter)
    _refuse_other(out)  # before the lock file goes into out/
    out.mkdir(parents=True, exist_ok=True)
    # one writer a set: two would share each video's .part file, and one's clean-up deletes the other's
    with held_lock(out / LOCK, True, f"{out}: another make-synthetic is writing this set; wait for it to finish, or "
                   "choose another --out"):
        _prepare(out, params, [p.video for p in planned], overwrite)
        todo = [p for p in planned if not (out / p.video).is_file()]
        if todo:
            # A manifest next to missing videos would read as a finished set.
            (out / "manifest.csv").unlink(missing_ok=True)
        log.info("%s: %d synthetic videos (%d to render, %d already there)", out, videos, len(todo),
                 videos - len(todo))
        tasks = [(p.scene, str(out / p.video), size, n_frames, fps) for p in todo]
        workers = max(1, min(workers or _cpus(), len(tasks) or 1))
        _render_all(tasks, workers)

        lines = [
            json.dumps({
                "video": p.video, "group": p.group, "twin_kind": p.twin_kind, "twin_of": p.twin_of,
                "split": p.split, "description": describe(p.scene), "scene": p.scene.to_json(),
            })
            for p in planned
        ]
        write_text_atomic(out / "scenes.jsonl", "\n".join(lines) + "\n")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["video", "caption", "split"])
        for p in planned:
            for caption in p.captions:
                writer.writerow([p.video, caption, p.split])
        write_text_atomic(out / "manifest.csv", buf.getvalue())  # last: its presence means the set is complete
    return out


def read_scenes(data_root: Path) -> list[dict]:
    """The records of data_root/scenes.jsonl, each with its scene parsed back into a Scene."""
    path = Path(data_root) / "scenes.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; generate the set with make-synthetic --out {data_root}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{**row, "scene": Scene.from_json(row["scene"])} for row in rows]


def read_plan(data_root: Path) -> list[PlannedVideo]:
    """The set's annotations with the facts each caption states, made again from its params.json (plan is
    deterministic); refused when they are not the set's own scenes and captions (a set made by another version)."""
    data_root = Path(data_root)
    rows = read_scenes(data_root)
    params = recorded_params(data_root)
    if params is None:
        raise UserError(f"{data_root}: has no params.json, so it is not a set made by make-synthetic; generate the "
                        f"set with make-synthetic --out {data_root}")
    clutter = params["clutter"]
    planned = plan(len(rows), params["seed"], clutter)
    captions = [(row["video"], row["caption"]) for _, row in read_csv(data_root / "manifest.csv", ("video", "caption"))]
    if [(p.video, p.scene) for p in planned] != [(r["video"], r["scene"]) for r in rows] or \
            [(p.video, c) for p in planned for c in p.captions] != captions:
        again = f"make-synthetic --out NEW_FOLDER --videos {len(rows)} --seed {params['seed']}"
        raise UserError(f"{data_root}: its scenes or captions are not what this version of make-synthetic makes "
                        f"from its params.json; make the set again in a new folder "
                        f"({again}{f' --clutter {clutter}' if clutter else ''}) and extract that")
    return planned


def true_of(planned: Sequence[PlannedVideo]) -> dict[tuple[str, str], frozenset[str]]:
    """(video, caption) -> the videos among these that the caption is true of (its own included).

    A caption true of n videos caps R@1: a ranker that knows every fact still has to guess among n.
    """
    facts = [(p.video, scene_facts(p.scene)) for p in planned]
    return {(p.video, c): frozenset(v for v, f in facts if fs <= f) for p in planned for c, fs in zip(p.captions, p.facts)}
