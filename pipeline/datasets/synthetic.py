"""The synthetic benchmark as a dataset: a set made by make-synthetic, read like any manifest; the default set is
generated on first use into the default data root only."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.datasets import default_data_root, register
from pipeline.datasets.manifest import read_manifest
from pipeline.errors import UserError
from pipeline.records import VideoRecord
from pipeline.synthetic import make_synthetic, recorded_params, set_state

log = logging.getLogger(__name__)

DEFAULT_VIDEOS = 1000
RESUMED = ("videos", "seed", "size", "seconds", "fps", "clutter")  # make_synthetic's arguments kept in params.json


@register("synthetic", generates=True)
def load(data_root: Path, *, videos: int = DEFAULT_VIDEOS) -> list[VideoRecord]:
    """Records of the synthetic set in data_root; the default data root, when missing or empty, gets the default set
    first (and an unfinished one is finished with its own params.json)."""
    data_root = Path(data_root)
    state = set_state(data_root)
    if state == "finished":
        return read_manifest(data_root)
    # Anywhere else (a real dataset's folder, a mistyped path) a generated set would only be in the way.
    if state == "other" or data_root.resolve() != default_data_root("synthetic").resolve():
        raise UserError(f"{data_root}: holds no finished synthetic set (manifest.csv and params.json from "
                        "make-synthetic); pass --dataset msvd|msrvtt|manifest for another dataset, or make a set "
                        "with make-synthetic --out DIR (a new or empty folder, or an unfinished set) and pass that "
                        "as --data-root")
    if state == "empty":
        log.info("%s: no synthetic set yet; generating the default one (%d videos) there", data_root, videos)
        make_synthetic(data_root, videos=videos)
    else:  # a killed generation: go on with its own parameters
        params = recorded_params(data_root)
        log.info("%s: finishing the synthetic set a killed run left unfinished", data_root)
        make_synthetic(data_root, **{"videos": videos, **{k: params[k] for k in RESUMED if k in params}})
    return read_manifest(data_root)
