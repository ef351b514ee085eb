"""What every loader shares (one uniform contract per data source, as FLamby's): reading a
metadata table, normalising its columns to ``schema.COLUMNS``, flagging bad rows (raise, or
drop and report) and the shared checks that turn a loader's :class:`Rows` into
:class:`SourceData` (:func:`finish`). The loaders: ``ham.py``, ``isic.py``, ``csv_export.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.formats import LayoutError, get_format
from common.data.readers import FileImageReader
from common.data.schema import COLUMNS, DataError, LoadReport, SourceData

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FIRST_IDS = 5  # how many offending ids a message lists
SPLIT_ALIASES = {"training": "train", "valid": "validation", "val": "validation"}
_TEXT_COLUMNS = ("image_id", "group_id", "label_name", "sex", "anatom_site", "dx_type")
_OPTIONAL_TEXT_COLUMNS = ("source_site", "source_split")  # "" where the source has none


def read_csv(path: Path) -> pd.DataFrame:
    """Read a metadata table as strings (ids stay exact); parse errors name the file."""
    sep = "\t" if path.suffix.lower() in (".tab", ".tsv") else ","
    try:
        return pd.read_csv(path, dtype=str, sep=sep)
    except FileNotFoundError as exc:
        raise DataError(f"metadata file missing: {path}") from exc
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse metadata file {path}: {exc}") from exc


def require_columns(columns: Iterable[str], required: Iterable[str], file: Path | str) -> None:
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise DataError(f"{file}: missing required column(s) {missing}; found {sorted(columns)}")


def optional_column(df: pd.DataFrame, name: str, report: LoadReport, file: Path | str) -> pd.Series:
    """An optional column, or all-NaN with a warning when the file lacks it."""
    if name in df.columns:
        return df[name]
    report.warnings.append(f"{file}: optional column {name!r} absent; filled as unknown")
    return pd.Series([np.nan] * len(df), index=df.index, dtype=object)


def clean_str(s: pd.Series) -> pd.Series:
    out = s.astype("string").str.strip()
    return out.where(~out.isna() & (out != "") & (out.str.lower() != "nan"), pd.NA)


def text(s: pd.Series) -> pd.Series:
    """Trimmed strings, "" where empty or missing."""
    return clean_str(s).fillna("").astype(str)


def row_lines(file_name: str, n: int) -> list[str]:
    """Where each row of a CSV came from, for messages (the header is line 1)."""
    return [f"{file_name} line {i + 2}" for i in range(n)]


def ids_and_groups(
    raw: pd.DataFrame, id_col: str, group_col: str, report: LoadReport, file: Path | str
) -> pd.DataFrame:
    """A frame of ``image_id`` and ``group_id`` from a table's own columns; a row without a
    group is its own group (one warning counts them)."""
    df = pd.DataFrame(index=raw.index)
    df["image_id"] = text(raw[id_col])
    group = clean_str(raw[group_col])
    if group.isna().any():
        n = int(group.isna().sum())
        report.warnings.append(f"{file}: {n} row(s) without {group_col}; using {id_col} as group")
    df["group_id"] = group.fillna(df["image_id"]).astype(str)
    return df


def norm_sex(s: pd.Series) -> pd.Series:
    """male/female/unknown from any of M/F/male/Female/empty/NaN."""
    low = clean_str(s).str.lower()
    mapped = low.map({"male": "male", "m": "male", "female": "female", "f": "female"})
    return mapped.fillna("unknown").astype(str)


def norm_site(s: pd.Series) -> pd.Series:
    """Lower-case anatomic site, 'unknown' when missing."""
    return clean_str(s).str.lower().fillna("unknown").astype(str)


def norm_age(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


def set_demographics(
    df: pd.DataFrame, column: Callable[[str], pd.Series], age: str, sex: str, site: str
) -> None:
    """Fill ``age``, ``sex`` and ``anatom_site`` from the source's own column names, each
    normalised the same way whatever the source (``column`` reads one, or warns and fills
    it as unknown)."""
    df["age"] = norm_age(column(age))
    df["sex"] = norm_sex(column(sex))
    df["anatom_site"] = norm_site(column(site))


def labels_from_names(names: pd.Series, classes: list[str]) -> tuple[pd.Series, pd.Series]:
    """(label index with -1 for unknown, label name) from class names."""
    lookup = {c: i for i, c in enumerate(classes)}
    clean = text(names)
    return clean.map(lambda v: lookup.get(v, -1)).astype(int), clean


def labels_from_int(values: pd.Series, classes: list[str]) -> tuple[pd.Series, pd.Series]:
    """(label, label name) from integer targets; anything outside range(len(classes)) is -1."""
    num = pd.to_numeric(values, errors="coerce")
    ok = num.notna() & (num == num.round()) & (num >= 0) & (num < len(classes))
    label = num.where(ok, -1).fillna(-1).astype(int)
    name = label.map(lambda i: classes[i] if i >= 0 else "")
    name = name.where(ok, values.astype(str))
    return label, name.astype(str)


def scan_images(dirs: Iterable[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path for all files with one of ``suffixes`` under ``dirs`` (first one wins)."""
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for root, _dirs, files in os.walk(d):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in suffixes and stem not in found:
                    found[stem] = Path(root) / name
    return found


def flag_bad(
    df: pd.DataFrame,
    mask: pd.Series,
    reason: str,
    file: Path | str,
    report: LoadReport,
    on_bad: str,
    detail: str = "",
) -> pd.DataFrame:
    """Raise on (or drop and record) the rows in ``mask``; messages list ids and lines."""
    if not bool(mask.any()):
        return df
    bad = df.loc[mask]
    ids = bad["image_id"].astype(str).tolist()
    where = [
        f"{i} ({w})"
        for i, w in zip(ids[:FIRST_IDS], bad["_where"].tolist()[:FIRST_IDS], strict=True)
    ]
    if on_bad == "error":
        raise DataError(
            f"{file}: {len(ids)} row(s) with {reason}{detail}; first: {', '.join(where)}. "
            "Fix the data or load with on_bad='skip' to drop and report them."
        )
    for i in ids:
        report.skip(reason, i)
    return df.loc[~mask]


def _warn_unknown_demographics(df: pd.DataFrame, report: LoadReport, file: Path | str) -> None:
    for col, mask in (("age", df["age"].isna()), ("sex", df["sex"] == "unknown")):
        if mask.any():
            ids = df.loc[mask, "image_id"].tolist()
            report.warnings.append(
                f"{file}: {int(mask.sum())} row(s) with empty/unknown {col} "
                f"(normalised to {'NaN' if col == 'age' else 'unknown'}); "
                f"first ids {ids[:FIRST_IDS]}"
            )


def _warn_split_straddle(df: pd.DataFrame, report: LoadReport, unit: str) -> None:
    published = df[df["source_split"] != ""]
    if published.empty:
        return
    n_splits = published.groupby("group_id")["source_split"].nunique()
    straddling = n_splits[n_splits > 1]
    if len(straddling):
        n_img = int(published["group_id"].isin(straddling.index).sum())
        report.warnings.append(
            f"{len(straddling)} {unit}(s) ({n_img} images) appear in more than one of the "
            f"publisher's splits (source_split), so that split leaks {unit}s between train and "
            f"test; first: {list(straddling.index[:FIRST_IDS])}. Use a group-aware split."
        )


def _verify(
    df: pd.DataFrame, reader: Callable[[str], np.ndarray], report: LoadReport, on_bad: str
) -> pd.DataFrame:
    """Decode every image once (threads, rich progress bar); unreadable ones are bad rows."""
    from rich.progress import Progress  # lazily: only when images are verified

    def check(image_id: str) -> str | None:
        try:
            reader(image_id)
        except DataError as exc:
            return str(exc)
        return None

    ids = df["image_id"].tolist()
    errors: dict[str, str] = {}
    with Progress(transient=True) as progress, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        task = progress.add_task(f"verifying {len(ids)} images", total=len(ids))
        for image_id, err in zip(ids, pool.map(check, ids), strict=True):
            if err is not None:
                errors[image_id] = err
            progress.advance(task)
    if not errors:
        return df
    mask = df["image_id"].isin(errors)
    first = next(iter(errors.values()))
    return flag_bad(df, mask, "unreadable image", "images", report, on_bad, f" ({first})")


def _fingerprint(fmt: str, root: str, files: Iterable[Path], ids: list[str]) -> str:
    """Stable cache key: format, path, size/mtime of the metadata files, rows kept."""
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    payload = json.dumps({"format": fmt, "path": root, "files": stats, "n": len(ids)})
    h = hashlib.sha256(payload.encode())
    h.update("\n".join(ids).encode())
    return h.hexdigest()[:16]


@dataclass
class Rows:
    """What a loader read, normalised to the schema's columns, before the shared checks."""

    fmt: str
    df: pd.DataFrame  # COLUMNS, plus _where (file and line) and _path (None: image missing)
    reader: Callable[[str], np.ndarray]
    report: LoadReport
    file: Path | str  # the metadata file that messages name
    root: str  # the source's path (or hub id), part of the cache key
    meta_files: list[Path] = field(default_factory=list)  # their size/mtime key the cache


def drop_bad_rows(rows: Rows, classes: list[str], on_bad: str) -> pd.DataFrame:
    """Duplicated ids, unknown labels and missing image files, in that order."""
    df, file, report = rows.df, rows.file, rows.report
    dup = df["image_id"].duplicated(keep="first")
    df = flag_bad(df, dup, "duplicated image id", file, report, on_bad)
    bad_label = df["label"] < 0
    values = sorted(set(df.loc[bad_label, "label_name"].astype(str)))[:FIRST_IDS]
    detail = f" {values} (known: {classes})"
    df = flag_bad(df, bad_label, "unknown label", file, report, on_bad, detail)
    if "_path" in df.columns:
        df = flag_bad(df, df["_path"].isna(), "image file missing", file, report, on_bad)
    return df


def _schema_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Exactly ``schema.COLUMNS`` with their dtypes, indexed 0..n-1."""
    meta = df[COLUMNS].reset_index(drop=True)
    meta["label"] = meta["label"].astype(np.int64)
    meta["age"] = meta["age"].astype(float)
    for c in _TEXT_COLUMNS:
        meta[c] = meta[c].astype(str)
    for c in _OPTIONAL_TEXT_COLUMNS:
        meta[c] = meta[c].fillna("").astype(str)
    return meta


def finish(rows: Rows, on_bad: str, verify_images: bool) -> SourceData:
    """Shared checks in a fixed order, then the SourceData (name, classes: the registry's)."""
    entry = get_format(rows.fmt)
    classes = list(entry.classes)
    df = drop_bad_rows(rows, classes, on_bad)
    if verify_images:
        df = _verify(df, rows.reader, rows.report, on_bad)
    _warn_unknown_demographics(df, rows.report, rows.file)
    _warn_split_straddle(df, rows.report, entry.group)
    meta = _schema_frame(df)
    rows.report.n_kept = len(meta)
    if hasattr(rows.reader, "on_bad"):
        rows.reader.on_bad = on_bad  # type: ignore[attr-defined]
    return SourceData(
        name=entry.dataset,
        format=rows.fmt,
        classes=classes,
        meta=meta,
        reader=rows.reader,
        report=rows.report,
        fingerprint=_fingerprint(rows.fmt, rows.root, rows.meta_files, meta["image_id"].tolist()),
    )


@dataclass
class Table:
    """A source's metadata table as read (:meth:`read`), and the last steps every loader of
    image files shares: each row's image file (:meth:`image_files`), then :func:`finish`."""

    fmt: str
    root: Path  # the source's folder
    file: Path  # its metadata table
    raw: pd.DataFrame  # the table, as strings
    report: LoadReport
    paths: dict[str, Path] = field(default_factory=dict)  # image id -> file (image_files)

    @classmethod
    def read(
        cls,
        path: str | Path,
        fmt: str,
        names: list[str],
        what: str,
        required: list[str],
        file_ok: bool = False,
    ) -> Table:
        """The first of ``names`` under the folder ``path`` (or, ``file_ok``, the file
        ``path``), with its ``required`` columns."""
        root = Path(path)
        if not (root.exists() if file_ok else root.is_dir()):
            raise LayoutError(f"{fmt}: no such folder {root}")
        if root.is_file():
            file, root = root, root.parent
        else:
            file = find_one(root, names, f"{fmt} {what}")
        raw = read_csv(file)
        require_columns(raw.columns, required, file)
        return cls(fmt, root, file, raw, LoadReport(source=f"{fmt} {root}", n_rows_read=len(raw)))

    def image_files(self, df: pd.DataFrame, paths: dict[str, Path], where: str) -> None:
        """Each row's image file in ``df["_path"]`` (NaN: missing); a source with no image
        file at all in ``where`` is refused (another layout)."""
        if not paths:
            raise LayoutError(f"{self.fmt}: no image files in {where} under {self.root}")
        self.paths = paths
        df["_path"] = df["image_id"].map(paths)

    def finish(
        self,
        df: pd.DataFrame,
        on_bad: str,
        verify_images: bool,
        meta_files: list[Path] | None = None,
    ) -> SourceData:
        """:func:`finish` for rows whose images are the files found by :meth:`image_files`."""
        reader = FileImageReader(self.paths, on_bad)
        root, files = str(self.root.resolve()), meta_files or [self.file]
        rows = Rows(self.fmt, df, reader, self.report, self.file, root, files)
        return finish(rows, on_bad, verify_images)


def find_one(root: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    for n in names:
        hits = sorted(root.rglob(n))
        if hits:
            return hits[0]
    raise LayoutError(f"{what}: none of {names} found under {root}")
