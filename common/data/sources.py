"""Loaders for the real on-disk formats of the public skin-lesion data sets.

Each loader reads the publisher's own layout (no conversion step), normalises the metadata to
``schema.COLUMNS`` and hands back a lazy image reader. Bad input is never passed on silently:
``on_bad="error"`` raises a :class:`DataError` at the first class of bad rows (what, how many,
first ids with file and line); ``on_bad="skip"`` drops those rows and lists them in the
:class:`LoadReport`. Soft problems (unknown age/sex, lesions that straddle the publisher's
splits, missing lesion ids) become report warnings.
"""

from __future__ import annotations

from pathlib import Path

from common.data import synth  # imports no loader: no cycle (synth.ensure_builtin at call time)
from common.data.formats import FORMATS, get_format
from common.data.schema import DataError, SourceData

# Which formats exist, their classes and which loader reads each: common/data/formats.py;
# the loaders: ham.py, isic.py, csv_export.py, sharing rows.py (the contract) and readers.py.


def load_source(
    fmt: str, path: str | Path, *, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """Load a data source in its publisher's on-disk format (see module docstring)."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    return get_format(fmt, FORMATS).load(path, on_bad=on_bad, verify_images=verify_images)


def source_location(
    fmt: str, path: str | Path | None = None, *, n_images: int = 1500, image_size: int = 32
) -> tuple[str, Path]:
    """(format, folder) the data of ``fmt`` at ``path`` is read from: ``synth-ham``, or a
    format given no path, is the built-in synthetic set in that format's layout (made once,
    :func:`synth.ensure_builtin`)."""
    entry = get_format(fmt)
    if entry.builtin and path is not None:
        raise DataError(f"{fmt} is the built-in synthetic data set: it takes no data path")
    if entry.builtin or path is None:
        stored = entry.stored_as or entry.name
        return stored, synth.ensure_builtin(stored, n_images=n_images, image_size=image_size)
    return fmt, Path(path)


def open_source(
    fmt: str, path: str | Path | None = None, *, n_images: int = 1500, image_size: int = 32
) -> SourceData:
    """Any registered format, loaded from :func:`source_location`."""
    return load_source(*source_location(fmt, path, n_images=n_images, image_size=image_size))
