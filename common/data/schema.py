"""The one contract every data source fulfils.

Each loader (HAM10000 HF / Dataverse, ISIC 2020, Fed-ISIC2019, synthetic) returns a
:class:`SourceData`: a metadata table with the normalised columns below plus a way to read
any image as an RGB uint8 array. Everything downstream (partition, cache, training) only
sees this contract, so adding a source never touches training code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import DataError as DataError  # defined at the bottom of common

if TYPE_CHECKING:  # annotations only: the run config reads the format table without them
    import numpy as np
    import pandas as pd

# Normalised metadata columns, in order. ``group_id`` is the leakage unit: HAM ``lesion_id``,
# ISIC 2020 ``patient_id``. ``source_site`` is the hospital the data itself records (HAM
# ``dataset``, Fed-ISIC2019 ``center``, DICOM InstitutionName) or "" when unknown.
# ``source_split`` is the split the publisher shipped ("train"/"validation"/"test") or "".
COLUMNS: list[str] = [
    "image_id",
    "group_id",
    "label",  # int, index into SourceData.classes
    "label_name",
    "age",  # float, NaN when unknown
    "sex",  # "male" | "female" | "unknown"
    "anatom_site",  # normalised lower-case anatomic site, "unknown" when missing
    "dx_type",  # how the diagnosis was confirmed (histo, follow_up, ...), "" when unknown
    "source_site",
    "source_split",
]

HAM_CLASSES: list[str] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ISIC2019_CLASSES: list[str] = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
ISIC2020_CLASSES: list[str] = ["benign", "malignant"]


@dataclass
class LoadReport:
    """What a loader found and did, shown to the user instead of silently passing it on."""

    source: str
    n_rows_read: int = 0
    n_kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> offending ids
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, image_id: str) -> None:
        self.skipped.setdefault(reason, []).append(str(image_id))

    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, first: int = 5) -> str:
        lines = [f"{self.source}: read {self.n_rows_read} rows, kept {self.n_kept}"]
        for reason, ids in self.skipped.items():
            lines.append(f"  skipped {len(ids)} ({reason}): first {ids[:first]}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class SourceData:
    """A loaded data source: normalised metadata plus an image reader."""

    name: str  # "ham10000" | "isic2020" | "fedisic2019"
    format: str  # "ham-hf" | "ham-dataverse" | "isic2020" | "fedisic2019"
    classes: list[str]
    meta: pd.DataFrame  # COLUMNS, one row per image, image_id unique
    reader: Callable[[str], np.ndarray]  # image_id -> HxWx3 uint8 RGB
    report: LoadReport
    fingerprint: str = ""  # stable id of the files read (cache key)

    def read_image(self, image_id: str) -> np.ndarray:
        return self.reader(image_id)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_home() -> Path:
    """Where caches and synthesized data live unless the user says otherwise."""
    return Path(os.environ.get("FEDSKIN_HOME", Path.home() / ".cache" / "fedskin"))
