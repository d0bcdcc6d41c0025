"""The synthetic benchmark as a dataset: generated on first use, then read like any manifest."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.datasets import register
from pipeline.datasets.manifest import read_manifest
from pipeline.records import VideoRecord
from pipeline.synthetic import make_synthetic

log = logging.getLogger(__name__)

DEFAULT_VIDEOS = 1000


@register("synthetic", generates=True)
def load(data_root: Path, *, videos: int = DEFAULT_VIDEOS) -> list[VideoRecord]:
    """Records of the synthetic set in data_root, generating it there first when manifest.csv is missing."""
    data_root = Path(data_root)
    if not (data_root / "manifest.csv").is_file():
        # A killed generation leaves no manifest, so this also resumes it.
        log.info("%s: no manifest.csv; generating the default synthetic set (%d videos) there", data_root, videos)
        make_synthetic(data_root, videos=videos)
    return read_manifest(data_root)
