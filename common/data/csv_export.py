"""A hospital's own export: labels.csv (image, label[, group, site, split, age, sex,
anatom_site]) + JPEG/PNG/DICOM files beside it, with an optional label-map.csv."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from common.data.formats import LayoutError, get_format
from common.data.readers import FileImageReader
from common.data.rows import (
    FIRST_IDS,
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    Rows,
    clean_str,
    drop_bad_rows,
    finish,
    flag_bad,
    optional_column,
    read_csv,
    require_columns,
    row_lines,
    set_demographics,
    text,
)
from common.data.schema import DataError, LoadReport, SourceData
from common.names import SPLITS

CSV_LABELS = "labels.csv"  # what a csv export folder holds (or pass the CSV file itself)
CSV_LABEL_MAP = "label-map.csv"  # optional, beside the CSV: from,to (to: a HAM class name)
_CSV_SUFFIXES = (*IMAGE_SUFFIXES, ".dcm")
_LEAVES = "path leaves the folder"


def _csv_label_map(file: Path, classes: list[str]) -> dict[str, str]:
    """``from`` (lower case) -> class name; a bad row raises naming the file and line."""
    raw = read_csv(file)
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    require_columns(raw.columns, ["from", "to"], file)
    known = {c.lower(): c for c in classes}
    out: dict[str, str] = {}
    for i, (src, dst) in enumerate(zip(text(raw["from"]), text(raw["to"]), strict=True)):
        where = f"{file.name} line {i + 2}"
        if not src:
            raise DataError(f"{file}: empty 'from' value ({where})")
        if dst.lower() not in known:
            raise DataError(f"{file}: 'to' value {dst!r} is not one of {classes} ({where})")
        if out.get(src.lower(), known[dst.lower()]) != known[dst.lower()]:
            raise DataError(f"{file}: {src!r} is mapped twice, to different classes ({where})")
        out[src.lower()] = known[dst.lower()]
    return out


def _csv_image_path(root: Path, value: str) -> tuple[str, Path | None, str]:
    """(image id, path or None, why refused) of one ``image`` cell, confined to ``root``."""
    text = value.strip().replace("\\", "/")
    if not text:
        return "", None, "no image path"
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return text, None, _LEAVES
    rel = Path(os.path.normpath(text)).as_posix()
    if rel == ".." or rel.startswith("../"):
        return text, None, _LEAVES
    path = (root / rel).resolve()  # follows symlinks: one pointing outside is refused too
    if not path.is_relative_to(root.resolve()):
        return rel, None, _LEAVES
    if path.suffix.lower() not in _CSV_SUFFIXES:
        return rel, None, f"not a JPEG, PNG or DICOM file (suffix {path.suffix or 'none'})"
    return rel, path, ""


def load_csv_export(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """A hospital's own export: a CSV (or a folder holding ``labels.csv``) listing images.

    Columns: ``image`` (path relative to the CSV's folder: JPEG, PNG or DICOM), ``label``
    (a HAM10000 class name, any case, or a ``from`` value of ``label-map.csv`` beside the
    CSV) and optional ``group`` (patient or lesion; default: the image), ``site``, ``split``
    (train/validation/test), ``age``, ``sex``, ``anatom_site``. Rows whose image path leaves
    the folder (``../``, absolute, a symlink to outside), is not an image file, or whose group
    is in two splits are bad rows, like duplicates, unknown labels and missing images.
    """
    given = Path(path)
    if given.is_dir():
        csv = given / CSV_LABELS
        if not csv.is_file():
            raise LayoutError(f"csv: no {CSV_LABELS} in folder {given} (or pass the CSV file)")
    elif given.is_file():
        csv = given
    else:
        raise LayoutError(f"csv: no such file or folder {given}")
    root = csv.parent
    raw = read_csv(csv)
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    require_columns(raw.columns, ["image", "label"], csv)
    if raw.empty:
        raise DataError(f"{csv}: empty table (a header but no rows)")
    classes = list(get_format("csv").classes)
    meta_files = [csv]
    mapping: dict[str, str] = {}
    if (root / CSV_LABEL_MAP).is_file():
        mapping = _csv_label_map(root / CSV_LABEL_MAP, classes)
        meta_files.append(root / CSV_LABEL_MAP)
    report = LoadReport(source=f"csv {csv}", n_rows_read=len(raw))
    df = pd.DataFrame(index=raw.index)
    cells = [_csv_image_path(root, v) for v in text(raw["image"])]
    df["image_id"] = [c[0] for c in cells]
    refused = pd.Series([c[2] for c in cells], index=raw.index)
    group = clean_str(raw["group"]) if "group" in raw.columns else None
    df["group_id"] = (group if group is not None else df["image_id"]).fillna(df["image_id"])
    df["group_id"] = df["group_id"].astype(str)
    given_label = text(raw["label"])
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    index = given_label.map(lambda v: lookup.get(mapping.get(v.lower(), v).lower(), -1))
    df["label"] = index.astype(int)
    df["label_name"] = [
        classes[i] if i >= 0 else v for i, v in zip(index, given_label, strict=True)
    ]
    set_demographics(
        df, lambda c: optional_column(raw, c, report, csv.name), "age", "sex", "anatom_site"
    )
    df["dx_type"] = text(raw["dx_type"]) if "dx_type" in raw.columns else ""
    df["source_site"] = text(raw["site"]) if "site" in raw.columns else ""
    split = text(raw["split"]).str.lower() if "split" in raw.columns else None
    df["source_split"] = split.map(lambda s: SPLIT_ALIASES.get(s, s)) if split is not None else ""
    df["_where"] = row_lines(csv.name, len(raw))
    df["_path"] = [c[1] if c[1] is not None and c[1].is_file() else None for c in cells]
    # Refused paths first (never looked at again; leaving the folder before anything else),
    # then the values this format alone checks, then the shared checks.
    for reason in sorted(set(refused) - {""}, key=lambda r: (r != _LEAVES, r)):
        df = flag_bad(df, refused.loc[df.index] == reason, reason, csv, report, on_bad)
        refused = refused.loc[df.index]
    bad_split = ~df["source_split"].isin(["", *SPLITS])
    values = sorted(set(df.loc[bad_split, "source_split"]))[:FIRST_IDS]
    detail = f" {values} (allowed: {list(SPLITS)} or empty)"
    df = flag_bad(df, bad_split, "unknown split", csv, report, on_bad, detail)
    rows = Rows(
        "csv", df, FileImageReader({}, on_bad), report, csv, str(root.resolve()), meta_files
    )
    df = drop_bad_rows(rows, classes, on_bad)  # duplicates, unknown labels, missing files
    splits = df[df["source_split"] != ""].groupby("group_id")["source_split"].nunique()
    two = df["group_id"].isin(splits.index[splits > 1])
    detail = f" {sorted(set(df.loc[two, 'group_id']))[:FIRST_IDS]} (a group must stay in one split)"
    df = flag_bad(df, two, "group in two splits", csv, report, on_bad, detail)
    rows.df = df
    rows.reader = FileImageReader(dict(zip(df["image_id"], df["_path"], strict=True)), on_bad)
    return finish(rows, on_bad, verify_images)
