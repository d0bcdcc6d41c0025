"""`cli.py export-h5`: the cache's arrays in one HDF5 file, for tools that read HDF5 features."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.cache import DONE, FeatureCache
from pipeline.errors import UserError, first_line
from pipeline.files import check_output_path, written_atomically

log = logging.getLogger(__name__)

_STRINGS = ("video_ids", "video_paths", "video_split", "video_error", "video_source", "captions")


def export_h5(cache: FeatureCache, out: Path, progress: bool = True) -> Path:
    """Copy every array (and the metadata as attributes) into out, written atomically.

    Everything that can be checked before writing is (the folder, write permission, free space), so a refusal
    costs nothing; a damaged cache chunk or a failed write leaves no partial file behind.
    """
    out = Path(out)
    check_output_path(out, "--out", folder=False)
    if not out.parent.is_dir():
        raise UserError(f"{out}: its folder does not exist; pass --out a file path in an existing folder")
    cache.check_outside(out, "--out")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"{out}: its folder is not writable; pass --out a file path in a folder you can write to")
    names = sorted(name for name, _ in cache.group.arrays())
    need = sum(cache[name].nbytes for name in names if name not in _STRINGS)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise UserError(f"{out}: the export needs about {need / 1e6:,.1f} MB and {free / 1e6:,.1f} MB are free there; "
                        "free space or pass --out a file on another disk")
    unfinished = int((cache.video_status() != DONE).sum())
    if unfinished:
        log.warning("%s: %d of %d videos are not extracted (pending or failed): their rows are zeros in %s; "
                    "video_status there says which", cache.path, unfinished, cache.n_videos, out)
    try:
        with written_atomically(out, ".{}.partial") as tmp, h5py.File(tmp, "w") as h5:
            h5.attrs.update({k: (str(v) if v is None or isinstance(v, (dict, list)) else v)
                             for k, v in cache.attrs.items()})
            for name in tqdm(names, desc="export", unit="array", disable=not progress):
                _copy_array(cache, name, h5)
    except OSError as e:
        # HDF5 puts the system's error number in its own long message
        code = e.errno or next((int(n) for n in re.findall(r"errno = (\d+)", str(e))), None)
        raise UserError(f"{out}: could not write it ({os.strerror(code) if code else first_line(e)}); free space or "
                        "pass --out a file on another disk") from None
    return out


def _copy_array(cache: FeatureCache, name: str, h5: h5py.File) -> None:
    """One cache array into h5, chunk by chunk (never the whole array in memory); a chunk that does not read back
    is one line naming it and the fix."""
    arr = cache[name]

    def read(lo: int, hi: int) -> np.ndarray:
        try:
            return arr[lo:hi]
        except Exception as e:  # noqa: BLE001 - any codec, shape or length error means damaged bytes
            raise UserError(f"{cache.path}: {name} rows {lo}..{hi - 1} do not read back ({first_line(e)}); run "
                            "`python cli.py info --verify` on it, then your extract command with --repair") from None

    if name in _STRINGS:
        h5.create_dataset(name, data=np.asarray(read(0, arr.shape[0]), dtype=object), dtype=h5py.string_dtype())
        return
    dset = h5.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks if arr.size else None)
    step = arr.chunks[0]
    for lo in range(0, arr.shape[0], step):
        dset[lo: lo + step] = read(lo, lo + step)
