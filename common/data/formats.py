"""The data formats: one registry entry per format (its classes, loader and synthetic writer).

Every list of formats is derived from :data:`REGISTRY`: the loaders ``load_source`` accepts
(:data:`FORMATS`), the formats ``synthesize`` can write (:data:`SYNTH_FORMATS`), the class
names a model head is sized from (:data:`FORMAT_CLASSES`) and the ``data-format`` values a
run config allows. A format's loader lives in ``common/data/ham.py``, ``isic.py`` or
``csv_export.py`` and its writer in ``common/data/synth_writers.py``; the entry names them
(``module:function``), and they are looked up when called, so this module imports neither
(both import it) and there is no import cycle.

``synth-ham`` is the built-in data: synthetic HAM10000 made on first use and stored in the
``ham-dataverse`` layout (``stored_as``), so it is loaded and written as that format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.schema import (
    HAM_CLASSES,
    ISIC2019_CLASSES,
    ISIC2020_CLASSES,
    DataError,
    SourceData,
)


@dataclass(frozen=True)
class DataFormat:
    """One on-disk data format: what it holds, how to read it, how to write a synthetic copy."""

    name: str
    classes: tuple[str, ...]
    loader: str  # module:function, (path, on_bad=, verify_images=) -> data
    writer: str  # module:function, (out, n_images, size, seed, **options)
    dataset: str  # the data set it holds (SourceData.name)
    group: str  # what a group_id is: the unit that must not straddle sites or splits
    layout: str  # what its folder holds (help text)
    stored_as: str = ""  # built-in data only: the real format its files are written in
    write_options: tuple[str, ...] = ()  # keyword options of its writer (see synthesize)

    @property
    def builtin(self) -> bool:
        return bool(self.stored_as)

    @property
    def load_function(self) -> Callable[..., SourceData]:
        return _function(self.loader)

    @property
    def write_function(self) -> Callable[..., None]:
        return _function(self.writer)

    def load(self, path: str | Path, *, on_bad: str = "error", verify_images: bool = False):
        """The loader's data; a folder not in this layout is one line naming the missing
        file and the layout it belongs to."""
        try:
            return self.load_function(path, on_bad=on_bad, verify_images=verify_images)
        except LayoutError as err:
            raise DataError(f"{err} ({self.name} layout: {self.layout})") from None

    def write(self, out: Path, n_images: int, size: int, seed: int, **options: Any) -> None:
        self.write_function(out, n_images, size, seed, **options)


class LayoutError(DataError):
    """A folder without a file (or folder) the format's layout requires: the loader names
    it, :meth:`DataFormat.load` adds the whole layout."""


def _function(ref: str) -> Callable[..., Any]:
    """``module:function`` looked up when called (the loaders and writers import this module)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


BUILTIN_FORMAT = "synth-ham"

REGISTRY: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat(
            BUILTIN_FORMAT,
            tuple(HAM_CLASSES),
            "common.data.ham:load_ham_dataverse",
            "common.data.synth_writers:write_ham_dataverse",
            "ham10000",
            "lesion",
            "built-in synthetic HAM10000, made on first use (no data-path)",
            stored_as="ham-dataverse",
        ),
        DataFormat(
            "ham-hf",
            tuple(HAM_CLASSES),
            "common.data.ham:load_ham_hf",
            "common.data.synth_writers:write_ham_hf",
            "ham10000",
            "lesion",
            "*.parquet shards (train/validation/test) of the HF hub copy, or its hub id",
        ),
        DataFormat(
            "ham-dataverse",
            tuple(HAM_CLASSES),
            "common.data.ham:load_ham_dataverse",
            "common.data.synth_writers:write_ham_dataverse",
            "ham10000",
            "lesion",
            "HAM10000_metadata.csv + HAM10000_images_part_*/ JPEGs",
        ),
        DataFormat(
            "isic2020",
            tuple(ISIC2020_CLASSES),
            "common.data.isic:load_isic2020",
            "common.data.synth_writers:write_isic2020",
            "isic2020",
            "patient",
            "train.csv + train/<image_name>.dcm (or JPEG copies)",
            write_options=("dicom", "jpeg_copies"),
        ),
        DataFormat(
            "fedisic2019",
            tuple(ISIC2019_CLASSES),
            "common.data.isic:load_fedisic2019",
            "common.data.synth_writers:write_fedisic2019",
            "fedisic2019",
            "lesion",
            "train_test_split + ISIC_2019_Training_Input_preprocessed/ JPEGs",
        ),
        DataFormat(
            "csv",
            tuple(HAM_CLASSES),  # a hospital's export joins a HAM-classed federation
            "common.data.csv_export:load_csv_export",
            "common.data.synth_writers:write_csv_export",
            "csv",
            "group",
            "labels.csv (image, label[, group, site, split, age, sex, anatom_site]) + the "
            "JPEG/PNG/DICOM files it names (optional label-map.csv: from,to)",
        ),
    )
}

# Derived lists: every format, the ones on disk (loadable, synthesizable), classes by format.
ALL_FORMATS: tuple[str, ...] = tuple(REGISTRY)
FORMATS: tuple[str, ...] = tuple(n for n, f in REGISTRY.items() if not f.builtin)
SYNTH_FORMATS: tuple[str, ...] = FORMATS
FORMAT_CLASSES: dict[str, list[str]] = {n: list(f.classes) for n, f in REGISTRY.items()}


def get_format(name: str, among: tuple[str, ...] = ALL_FORMATS) -> DataFormat:
    """The registry entry of ``name``; a one-line :class:`DataError` naming the choices."""
    if name not in among:
        raise DataError(f"unknown data format {name!r}; choose one of {list(among)}")
    return REGISTRY[name]
