"""Synthetic skin-lesion data sets written in the *real* on-disk formats.

Why: the public data sets cannot be downloaded here (and are large), but every loader,
partitioner and training path must be exercised end to end. :func:`synthesize` writes a data
set in exactly the layout :func:`common.data.sources.load_source` reads, with metadata drawn
from the published per-source statistics (several images per lesion, several lesions per
patient, per-source diagnosis mix) and images a small CNN can learn from at 32 px: classes
differ in colour, shape, border and texture, and each acquisition site leaves its own colour
cast, brightness, vignetting and zoom, so site heterogeneity is real.

The metadata: :mod:`common.data.synth_tables` (with the tiny-set deviations from the real
statistics); the images: :mod:`common.data.lesion_image`; one writer per format:
:mod:`common.data.synth_writers`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.data.formats import REGISTRY, SYNTH_FORMATS
from common.data.schema import default_home


def synthesize(
    fmt: str,
    out: str | Path,
    *,
    n_images: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    dicom: bool = True,
    jpeg_copies: bool = False,
) -> Path:
    """Write a synthetic data set of format ``fmt`` into the (new or empty) folder ``out``.

    ``dicom``/``jpeg_copies`` only apply to ``isic2020`` (DICOM files, JPEG copies in
    ``jpeg/train``; without DICOM the JPEGs are always written). Same seed => byte-identical
    metadata files.
    """
    if fmt not in SYNTH_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(SYNTH_FORMATS)}")
    if n_images < 1 or image_size < 8:
        raise ValueError("need n_images >= 1 and image_size >= 8")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"synthesize: output folder {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    entry = REGISTRY[fmt]
    options = {"dicom": dicom, "jpeg_copies": jpeg_copies}
    entry.write(out, n_images, image_size, seed, **{k: options[k] for k in entry.write_options})
    return out


def ensure_builtin(
    fmt: str = "ham-dataverse", n_images: int = 1500, image_size: int = 48, seed: int = 0
) -> Path:
    """The built-in synthetic data set (the default data), synthesized once and reused.

    Written to a temporary sibling folder and renamed into place, so an interrupted run leaves
    nothing half-written and concurrent callers end up sharing one complete copy.
    """
    target = default_home() / "builtin" / f"{fmt}-{n_images}-{image_size}-{seed}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        synthesize(fmt, tmp, n_images=n_images, image_size=image_size, seed=seed)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a real failure, not a lost race with another process
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
