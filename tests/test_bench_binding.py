"""bench/binding.py's colour swaps: which captions get one, and that a kept swap is false for the scene."""

from __future__ import annotations

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from binding import false_swap, named_objects, swap_colours  # noqa: E402


def test_swap_exchanges_the_first_two_different_colours_and_keeps_the_rest():
    assert swap_colours("a red ball is left of a big blue box") == "a blue ball is left of a big red box"
    assert swap_colours("a red ball, a red box and a green dot") == "a green ball, a red box and a red dot"
    assert swap_colours("first a red triangle shows up, then a red disc") is None  # one colour only
    assert swap_colours("there is a white square on the left") is None


def test_named_objects_reads_colour_shape_pairs_through_synonyms_and_commas():
    assert named_objects("a red ball, a blue box and a tiny green rhombus") == {
        ("red", "circle"), ("blue", "square"), ("green", "diamond")}
    assert named_objects("a red thing near a blue") == set()


def test_a_swap_is_kept_only_when_the_scene_lacks_an_object_it_names():
    caption = "a red ball is above a blue box"
    assert false_swap(caption, {("red", "circle"), ("blue", "square")}) == "a blue ball is above a red box"
    # the scene also holds a blue circle and a red square: the swapped caption is true, so no pair
    assert false_swap(caption, {("red", "circle"), ("blue", "square"), ("blue", "circle"), ("red", "square")}) is None
    assert false_swap("a red ball on the left", {("red", "circle")}) is None
