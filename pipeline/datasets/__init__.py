"""Dataset adapters: each turns one annotation layout into VideoRecords, nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.records import VideoRecord

Adapter = Callable[[Path], list[VideoRecord]]
ADAPTERS: dict[str, Adapter] = {}
GENERATED: set[str] = set()  # datasets whose adapter makes the data root itself when it is missing


def register(name: str, generates: bool = False) -> Callable[[Adapter], Adapter]:
    """Register an adapter under the name users pass to --dataset."""

    def wrap(fn: Adapter) -> Adapter:
        ADAPTERS[name] = fn
        if generates:
            GENERATED.add(name)
        return fn

    return wrap


def default_data_root(dataset: str) -> Path:
    """Where --data-root points when it is not given."""
    return Path("data") / dataset


def load_records(dataset: str, data_root: Path) -> list[VideoRecord]:
    """Parse a dataset's annotations into records (no decoding, no tokenising)."""
    _import_adapters()
    if dataset not in ADAPTERS:
        raise UserError(f"unknown dataset '{dataset}': choose one of {', '.join(sorted(ADAPTERS))}")
    if not data_root.is_dir() and dataset not in GENERATED:
        raise UserError(f"{data_root}: data root not found; pass --data-root DIR holding the '{dataset}' annotations")
    records = ADAPTERS[dataset](data_root)
    if not records:
        raise UserError(f"{data_root}: no videos found in the '{dataset}' annotations")
    return records


def _import_adapters() -> None:
    # Importing the modules runs their @register decorators.
    from pipeline.datasets import manifest, msrvtt, msvd, synthetic  # noqa: F401
