"""`cli.py export-h5`: the cache's arrays in one HDF5 file, for tools that read HDF5 features."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.cache import FeatureCache
from pipeline.errors import UserError

_STRINGS = ("video_ids", "video_paths", "video_split", "video_error", "video_source", "captions")


def export_h5(cache: FeatureCache, out: Path, progress: bool = True) -> Path:
    """Copy every array (and the metadata as attributes) into out, written atomically."""
    out = Path(out)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"{out}: {'is a folder' if out.is_dir() else 'its folder does not exist'}; "
                        "pass --out a file path in an existing folder")
    tmp = out.with_name(f".{out.name}.partial")
    with h5py.File(tmp, "w") as h5:
        h5.attrs.update({k: (str(v) if v is None or isinstance(v, (dict, list)) else v) for k, v in cache.attrs.items()})
        names = sorted(name for name, _ in cache.group.arrays())
        for name in tqdm(names, desc="export", unit="array", disable=not progress):
            arr = cache[name]
            if name in _STRINGS:
                h5.create_dataset(name, data=np.asarray(arr[:], dtype=object), dtype=h5py.string_dtype())
                continue
            dset = h5.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks if arr.size else None)
            step = arr.chunks[0]
            for lo in range(0, arr.shape[0], step):  # chunk by chunk: never the whole array in memory
                dset[lo: lo + step] = arr[lo: lo + step]
    os.replace(tmp, out)
    return out
