"""Loaders for the real on-disk formats of the public skin-lesion data sets.

Each loader reads the publisher's own layout (no conversion step), normalises the metadata to
``schema.COLUMNS`` and hands back a lazy image reader. Bad input is never passed on silently:
``on_bad="error"`` raises a :class:`DataError` at the first class of bad rows (what, how many,
first ids with file and line); ``on_bad="skip"`` drops those rows and lists them in the
:class:`LoadReport`. Soft problems (unknown age/sex, lesions that straddle the publisher's
splits, missing lesion ids) become report warnings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.data import synth  # imports no loader: no cycle (synth.ensure_builtin at call time)
from common.data.formats import FORMATS, get_format
from common.data.imaging import decode_image_bytes, decode_image_file, read_dicom
from common.data.schema import (
    COLUMNS,
    HAM_CLASSES,
    ISIC2019_CLASSES,
    ISIC2020_CLASSES,
    DataError,
    LoadReport,
    SourceData,
)
from common.names import SPLITS

# Which formats exist, their classes and which loader below reads each: common/data/formats.py.

# FLamby Fed-ISIC2019 center index -> name (Terrail et al. 2022, FLamby fed_isic2019 README).
FEDISIC_CENTERS: dict[int, str] = {
    0: "BCN",
    1: "HAM_vidir_molemax",
    2: "HAM_vidir_modern",
    3: "HAM_rosendahl",
    4: "MSK",
    5: "HAM_vienna_dias",
}

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_FROM_NAME = re.compile(r"^(train|training|validation|valid|val|test)(?=[-_.])", re.I)
_SPLIT_ALIASES = {"training": "train", "valid": "validation", "val": "validation"}
_FIRST = 5  # how many offending ids a message lists
_TEXT_COLUMNS = ("image_id", "group_id", "label_name", "sex", "anatom_site", "dx_type")
_OPTIONAL_TEXT_COLUMNS = ("source_site", "source_split")  # "" where the source has none


# ----------------------------------------------------------------------------- image readers


class FileImageReader:
    """image_id -> RGB array from a JPEG/PNG/DICOM file; picklable (plain dict of paths)."""

    def __init__(self, paths: dict[str, Path], on_bad: str = "error") -> None:
        self.paths = paths
        self.on_bad = on_bad

    def path_of(self, image_id: str) -> Path:
        try:
            return self.paths[image_id]
        except KeyError:
            raise DataError(f"unknown image id {image_id!r}: not in this source") from None

    def __call__(self, image_id: str) -> np.ndarray:
        path = self.path_of(image_id)
        if path.suffix.lower() == ".dcm":
            return read_dicom(path)
        return decode_image_file(path)


class ParquetImageReader:
    """image_id -> RGB array from HF ``Image`` bytes embedded in parquet shards.

    Images are not held in memory: one row group's image column is read on demand and the last
    few are kept (sequential access, as in cache building, then reads each group once).
    """

    def __init__(
        self, locations: dict[str, tuple[str, int, int]], on_bad: str = "error", keep: int = 8
    ) -> None:
        self.locations = locations  # image_id -> (shard path, row group, index in group)
        self.on_bad = on_bad
        self.keep = keep
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        state["_groups"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _group(self, shard: str, rg: int) -> Any:
        import pyarrow.parquet as pq  # lazily: heavy, parquet sources only

        key = (shard, rg)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        try:
            col = pq.ParquetFile(shard).read_row_group(rg, columns=["image"]).column("image")
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise DataError(f"cannot read images from parquet shard {shard}: {exc}") from exc
        col = col.combine_chunks()
        with self._lock:
            self._groups[key] = col
            while len(self._groups) > self.keep:
                self._groups.popitem(last=False)
        return col

    def __call__(self, image_id: str) -> np.ndarray:
        try:
            shard, rg, idx = self.locations[image_id]
        except KeyError:
            raise DataError(f"unknown image id {image_id!r}: not in this source") from None
        value = self._group(shard, rg)[idx].as_py()
        where = f"{shard} (row group {rg}, row {idx}, image_id {image_id})"
        data, rel = (
            (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        )
        if data:
            return decode_image_bytes(data, where)
        if rel and (Path(shard).parent / rel).is_file():
            return decode_image_file(Path(shard).parent / rel)
        raise DataError(f"image missing: no embedded bytes in {where}")


class BytesImageReader:
    """image_id -> RGB array from encoded bytes held in memory (hub downloads)."""

    def __init__(self, blobs: dict[str, bytes], origin: str, on_bad: str = "error") -> None:
        self.blobs = blobs
        self.origin = origin
        self.on_bad = on_bad

    def __call__(self, image_id: str) -> np.ndarray:
        data = self.blobs.get(image_id)
        if not data:
            raise DataError(f"image missing for image_id {image_id!r} in {self.origin}")
        return decode_image_bytes(data, f"{self.origin} image_id {image_id}")


# ----------------------------------------------------------------------------- helpers


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a metadata table as strings (ids stay exact); parse errors name the file."""
    sep = "\t" if path.suffix.lower() in (".tab", ".tsv") else ","
    try:
        return pd.read_csv(path, dtype=str, sep=sep)
    except FileNotFoundError as exc:
        raise DataError(f"metadata file missing: {path}") from exc
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse metadata file {path}: {exc}") from exc


def _require(columns: Iterable[str], required: Iterable[str], file: Path | str) -> None:
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise DataError(f"{file}: missing required column(s) {missing}; found {sorted(columns)}")


def _col(df: pd.DataFrame, name: str, report: LoadReport, file: Path | str) -> pd.Series:
    """An optional column, or all-NaN with a warning when the file lacks it."""
    if name in df.columns:
        return df[name]
    report.warnings.append(f"{file}: optional column {name!r} absent; filled as unknown")
    return pd.Series([np.nan] * len(df), index=df.index, dtype=object)


def _clean_str(s: pd.Series) -> pd.Series:
    out = s.astype("string").str.strip()
    return out.where(~out.isna() & (out != "") & (out.str.lower() != "nan"), pd.NA)


def _text(s: pd.Series) -> pd.Series:
    """Trimmed strings, "" where empty or missing."""
    return _clean_str(s).fillna("").astype(str)


def _lines(file_name: str, n: int) -> list[str]:
    """Where each row of a CSV came from, for messages (the header is line 1)."""
    return [f"{file_name} line {i + 2}" for i in range(n)]


def norm_sex(s: pd.Series) -> pd.Series:
    """male/female/unknown from any of M/F/male/Female/empty/NaN."""
    low = _clean_str(s).str.lower()
    mapped = low.map({"male": "male", "m": "male", "female": "female", "f": "female"})
    return mapped.fillna("unknown").astype(str)


def norm_site(s: pd.Series) -> pd.Series:
    """Lower-case anatomic site, 'unknown' when missing."""
    return _clean_str(s).str.lower().fillna("unknown").astype(str)


def norm_age(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


def _set_demographics(
    df: pd.DataFrame, column: Callable[[str], pd.Series], age: str, sex: str, site: str
) -> None:
    """Fill ``age``, ``sex`` and ``anatom_site`` from the source's own column names, each
    normalised the same way whatever the source (``column`` reads one, or warns and fills
    it as unknown)."""
    df["age"] = norm_age(column(age))
    df["sex"] = norm_sex(column(sex))
    df["anatom_site"] = norm_site(column(site))


def _labels(names: pd.Series, classes: list[str]) -> tuple[pd.Series, pd.Series]:
    """(label index with -1 for unknown, label name) from class names."""
    lookup = {c: i for i, c in enumerate(classes)}
    clean = _text(names)
    return clean.map(lambda v: lookup.get(v, -1)).astype(int), clean


def _labels_from_int(values: pd.Series, classes: list[str]) -> tuple[pd.Series, pd.Series]:
    """(label, label name) from integer targets; anything outside range(len(classes)) is -1."""
    num = pd.to_numeric(values, errors="coerce")
    ok = num.notna() & (num == num.round()) & (num >= 0) & (num < len(classes))
    label = num.where(ok, -1).fillna(-1).astype(int)
    name = label.map(lambda i: classes[i] if i >= 0 else "")
    name = name.where(ok, values.astype(str))
    return label, name.astype(str)


def _scan_images(dirs: Iterable[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
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


def _flag_bad(
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
        f"{i} ({w})" for i, w in zip(ids[:_FIRST], bad["_where"].tolist()[:_FIRST], strict=True)
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
                f"(normalised to {'NaN' if col == 'age' else 'unknown'}); first ids {ids[:_FIRST]}"
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
            f"test; first: {list(straddling.index[:_FIRST])}. Use a group-aware split."
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
    return _flag_bad(df, mask, "unreadable image", "images", report, on_bad, f" ({first})")


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
class _Rows:
    """What a loader read, normalised to the schema's columns, before the shared checks."""

    fmt: str
    df: pd.DataFrame  # COLUMNS, plus _where (file and line) and _path (None: image missing)
    reader: Callable[[str], np.ndarray]
    report: LoadReport
    file: Path | str  # the metadata file that messages name
    root: str  # the source's path (or hub id), part of the cache key
    meta_files: list[Path] = field(default_factory=list)  # their size/mtime key the cache


def _drop_bad_rows(rows: _Rows, classes: list[str], on_bad: str) -> pd.DataFrame:
    """Duplicated ids, unknown labels and missing image files, in that order."""
    df, file, report = rows.df, rows.file, rows.report
    dup = df["image_id"].duplicated(keep="first")
    df = _flag_bad(df, dup, "duplicated image id", file, report, on_bad)
    bad_label = df["label"] < 0
    values = sorted(set(df.loc[bad_label, "label_name"].astype(str)))[:_FIRST]
    detail = f" {values} (known: {classes})"
    df = _flag_bad(df, bad_label, "unknown label", file, report, on_bad, detail)
    if "_path" in df.columns:
        df = _flag_bad(df, df["_path"].isna(), "image file missing", file, report, on_bad)
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


def _finish(rows: _Rows, on_bad: str, verify_images: bool) -> SourceData:
    """Shared checks in a fixed order, then the SourceData (name, classes: the registry's)."""
    entry = get_format(rows.fmt)
    classes = list(entry.classes)
    df = _drop_bad_rows(rows, classes, on_bad)
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


# ----------------------------------------------------------------------------- HAM10000 (HF)


def _split_of(shard: Path) -> str:
    m = _SPLIT_FROM_NAME.match(shard.name) or _SPLIT_FROM_NAME.match(shard.parent.name + "-")
    if not m:
        return ""
    s = m.group(1).lower()
    return _SPLIT_ALIASES.get(s, s)


def _ham_columns(df: pd.DataFrame, report: LoadReport, file: Path | str) -> pd.DataFrame:
    """Normalise HAM10000 metadata columns (shared by the HF and Dataverse copies)."""
    out = pd.DataFrame(index=df.index)
    out["image_id"] = _text(df["image_id"])
    group = _clean_str(df["lesion_id"])
    if group.isna().any():
        report.warnings.append(
            f"{file}: {int(group.isna().sum())} row(s) without lesion_id; using image_id as group"
        )
    out["group_id"] = group.fillna(out["image_id"]).astype(str)
    out["label"], out["label_name"] = _labels(df["dx"], HAM_CLASSES)
    _set_demographics(out, lambda c: _col(df, c, report, file), "age", "sex", "localization")
    out["dx_type"] = _text(_col(df, "dx_type", report, file))
    return out


def _load_ham_hub(repo_id: str, on_bad: str, verify_images: bool) -> SourceData:
    try:
        import datasets  # type: ignore[import-not-found]  # optional (extra "hub"), heavy
    except ImportError:
        raise DataError(
            f"{repo_id!r} is not a local folder. Loading it from the Hugging Face hub needs the "
            "`datasets` library and network access: `pip install datasets` (or "
            "`pip install fedskin[hub]`), or download the parquet shards and pass their folder."
        ) from None
    dd = datasets.load_dataset(repo_id)
    frames = []
    blobs: dict[str, bytes] = {}
    for split, ds in dd.items():
        ds = ds.cast_column("image", datasets.Image(decode=False))
        part = ds.to_pandas()
        part["_split"] = _SPLIT_ALIASES.get(str(split), str(split))
        part["_where"] = [f"hub {repo_id} split {split} row {i}" for i in range(len(part))]
        frames.append(part)
    raw = pd.concat(frames, ignore_index=True)
    _require(raw.columns, ["image", "image_id", "lesion_id", "dx"], repo_id)
    report = LoadReport(source=f"ham-hf {repo_id}", n_rows_read=len(raw))
    df = _ham_columns(raw, report, repo_id)
    df["source_site"] = ""
    df["source_split"] = raw["_split"]
    df["_where"] = raw["_where"]
    for image_id, img in zip(df["image_id"], raw["image"], strict=True):
        if isinstance(img, dict) and img.get("bytes") and image_id not in blobs:
            blobs[image_id] = img["bytes"]
    df["_path"] = df["image_id"].where(df["image_id"].isin(blobs), None)
    reader = BytesImageReader(blobs, f"hub {repo_id}")
    rows = _Rows("ham-hf", df, reader, report, file=repo_id, root=repo_id)
    return _finish(rows, on_bad, verify_images)


def load_ham_hf(path: str | Path, on_bad: str = "error", verify_images: bool = False) -> SourceData:
    """HAM10000 as the HF hub copy ``marmal88/skin_cancer``: parquet shards, split by name."""
    import pyarrow.parquet as pq  # lazily: heavy, parquet sources only

    root = Path(path)
    if not root.exists():
        if _HUB_ID.match(str(path)):
            return _load_ham_hub(str(path), on_bad, verify_images)
        raise DataError(f"ham-hf: no such folder {root}")
    shards = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    if not shards:
        raise DataError(f"ham-hf: no *.parquet shards under {root}")
    required = ["image", "image_id", "lesion_id", "dx"]
    frames = []
    locations: dict[str, tuple[str, int, int]] = {}
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except Exception as exc:  # ArrowInvalid, OSError ...
            raise DataError(f"cannot read parquet shard {shard}: {exc}") from exc
        names = pf.schema_arrow.names
        _require(names, required, shard)
        try:
            part = pf.read(columns=[c for c in names if c != "image"]).to_pandas()
        except Exception as exc:
            raise DataError(f"cannot read parquet shard {shard}: {exc}") from exc
        part = part.astype({c: "string" for c in part.columns if c != "age"})
        part["_split"] = _split_of(shard)
        part["_where"] = [f"{shard.name} row {i}" for i in range(len(part))]
        rg_of = np.repeat(
            np.arange(pf.num_row_groups),
            [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)],
        )
        starts = np.concatenate([[0], np.cumsum(np.bincount(rg_of))[:-1]]) if len(rg_of) else []
        for i, image_id in enumerate(part["image_id"]):
            rg = int(rg_of[i])
            key = str(image_id)
            if key not in locations:
                locations[key] = (str(shard), rg, i - int(starts[rg]))
        frames.append(part)
    raw = pd.concat(frames, ignore_index=True)
    report = LoadReport(source=f"ham-hf {root}", n_rows_read=len(raw))
    df = _ham_columns(raw, report, root)
    df["source_site"] = ""
    df["source_split"] = raw["_split"].astype(str)
    df["_where"] = raw["_where"]
    reader = ParquetImageReader(locations, on_bad)
    rows = _Rows("ham-hf", df, reader, report, root, str(root.resolve()), meta_files=shards)
    return _finish(rows, on_bad, verify_images)


# ----------------------------------------------------------------------------- HAM (Dataverse)


def _find_one(root: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    for n in names:
        hits = sorted(root.rglob(n))
        if hits:
            return hits[0]
    raise DataError(f"{what}: none of {names} found under {root}")


def load_ham_dataverse(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """HAM10000 from Harvard Dataverse: HAM10000_metadata.csv + JPEG part folders."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"ham-dataverse: no such folder {root}")
    if root.is_file():
        csv, root = root, root.parent
    else:
        csv = _find_one(
            root,
            ["HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata"],
            "ham-dataverse metadata",
        )
    raw = _read_csv(csv)
    _require(raw.columns, ["lesion_id", "image_id", "dx"], csv)
    report = LoadReport(source=f"ham-dataverse {root}", n_rows_read=len(raw))
    df = _ham_columns(raw, report, csv.name)
    if "dataset" in raw.columns:
        df["source_site"] = _text(raw["dataset"])
    else:
        report.warnings.append(f"{csv.name}: no 'dataset' column (Kaggle copy?): source_site ''")
        df["source_site"] = ""
    df["source_split"] = ""
    df["_where"] = _lines(csv.name, len(raw))
    paths = _scan_images([root], _IMAGE_SUFFIXES)
    df["_path"] = df["image_id"].map(paths)
    reader = FileImageReader(dict(paths), on_bad)
    rows = _Rows("ham-dataverse", df, reader, report, csv, str(root.resolve()), meta_files=[csv])
    return _finish(rows, on_bad, verify_images)


# ----------------------------------------------------------------------------- ISIC 2020


def _institutions(
    paths: dict[str, Path], ids: list[str], report: LoadReport
) -> tuple[dict[str, str], dict[str, str]]:
    """InstitutionName per image (headers only) when the first DICOM has it; else {}.

    Returns (site by id, header error by id).
    """
    import pydicom  # lazily: heavy, DICOM sources only
    from rich.progress import track

    dcm = [i for i in ids if paths[i].suffix.lower() == ".dcm"]
    if not dcm:
        return {}, {}

    def header(image_id: str) -> str:
        ds = pydicom.dcmread(
            paths[image_id], stop_before_pixels=True, specific_tags=["InstitutionName"]
        )
        return str(ds.get("InstitutionName", "") or "").strip()

    errors: dict[str, str] = {}
    try:
        first = header(dcm[0])
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad headers
        errors[dcm[0]] = f"{paths[dcm[0]]}: {exc}"
        first = ""
    if not first:
        return {}, errors
    sites: dict[str, str] = {dcm[0]: first}
    for image_id in track(dcm[1:], description="reading DICOM headers", transient=True):
        try:
            sites[image_id] = header(image_id)
        except Exception as exc:  # noqa: BLE001
            errors[image_id] = f"{paths[image_id]}: {exc}"
    return sites, errors


def load_isic2020(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """SIIM-ISIC 2020: train.csv + train/<image_name>.dcm (or JPEG copies)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"isic2020: no such folder {root}")
    csv = _find_one(
        root,
        [
            "train.csv",
            "ISIC_2020_Training_GroundTruth_v2.csv",
            "ISIC_2020_Training_GroundTruth.csv",
        ],
        "isic2020 metadata",
    )
    raw = _read_csv(csv)
    _require(raw.columns, ["image_name", "patient_id", "target"], csv)
    report = LoadReport(source=f"isic2020 {root}", n_rows_read=len(raw))
    df = pd.DataFrame(index=raw.index)
    df["image_id"] = _text(raw["image_name"])
    group = _clean_str(raw["patient_id"])
    if group.isna().any():
        report.warnings.append(
            f"{csv.name}: {int(group.isna().sum())} row(s) without patient_id; group = image"
        )
    df["group_id"] = group.fillna(df["image_id"]).astype(str)
    df["label"], df["label_name"] = _labels_from_int(raw["target"], ISIC2020_CLASSES)
    columns = ("age_approx", "sex", "anatom_site_general_challenge")
    _set_demographics(df, lambda c: _col(raw, c, report, csv.name), *columns)
    df["dx_type"] = ""  # ISIC 2020 does not record how the diagnosis was confirmed
    df["source_split"] = "train"
    df["_where"] = _lines(csv.name, len(raw))
    # DICOM first (the primary format), JPEG copies as fallback.
    dicoms = _scan_images([root / "train"], (".dcm",))
    jpegs = _scan_images(
        [root / "jpeg" / "train", root / "train", root / "ISIC_2020_Training_JPEG"], _IMAGE_SUFFIXES
    )
    paths = {**jpegs, **dicoms}
    df["_path"] = df["image_id"].map(paths)
    df["source_site"] = ""
    # Run the generic row checks first so only kept rows get their headers read.
    probe = df[~df["image_id"].duplicated(keep="first")]
    ids = [i for i in probe.loc[probe["_path"].notna(), "image_id"] if i in paths]
    sites, header_errors = _institutions(paths, ids, report)
    if header_errors:
        first = next(iter(header_errors.values()))
        df = _flag_bad(
            df, df["image_id"].isin(header_errors), "unreadable DICOM header", csv, report,
            on_bad, f" ({first})",
        )  # fmt: skip
    if sites:
        df["source_site"] = df["image_id"].map(sites).fillna("").astype(str)
    else:
        report.warnings.append("isic2020: no DICOM InstitutionName found: source_site ''")
    reader = FileImageReader(paths, on_bad)
    rows = _Rows("isic2020", df, reader, report, csv, str(root.resolve()), meta_files=[csv])
    return _finish(rows, on_bad, verify_images)


# ----------------------------------------------------------------------------- Fed-ISIC2019


def load_fedisic2019(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """FLamby Fed-ISIC2019: train_test_split + preprocessed JPEGs (+ ISIC 2019 metadata)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"fedisic2019: no such folder {root}")
    split_file = _find_one(
        root, ["train_test_split", "train_test_folds.csv", "train_test_split.csv"],
        "fedisic2019 split file",
    )  # fmt: skip
    raw = _read_csv(split_file)
    _require(raw.columns, ["image", "target", "center", "fold"], split_file)
    report = LoadReport(source=f"fedisic2019 {root}", n_rows_read=len(raw))
    df = pd.DataFrame(index=raw.index)
    df["image_id"] = _text(raw["image"])
    df["label"], df["label_name"] = _labels_from_int(raw["target"], ISIC2019_CLASSES)
    center = pd.to_numeric(raw["center"], errors="coerce")
    df["source_site"] = [
        FEDISIC_CENTERS.get(int(c), str(r)) if pd.notna(c) else str(r)
        for c, r in zip(center, raw["center"], strict=True)
    ]
    unknown_centers = sorted(
        set(raw.loc[~center.isin(list(FEDISIC_CENTERS)), "center"].astype(str))
    )
    if unknown_centers:
        report.warnings.append(
            f"{split_file.name}: center value(s) {unknown_centers[:_FIRST]} are not FLamby's "
            "0-5; kept as given"
        )
    df["source_split"] = _text(raw["fold"])
    df["dx_type"] = ""
    df["_where"] = _lines(split_file.name, len(raw))

    meta_files = [split_file]
    meta_csv = next(
        (
            p
            for p in [
                root / "ISIC_2019_Training_Metadata.csv",
                root / "ISIC_2019_Training_Metadata_FL.csv",
            ]
            + sorted(root.rglob("ISIC_2019_Training_Metadata*.csv"))
            if p.is_file()
        ),
        None,
    )
    if meta_csv is not None:
        extra = _read_csv(meta_csv)
        _require(extra.columns, ["image"], meta_csv)
        extra = extra.drop_duplicates("image").set_index("image")
        meta_files.append(meta_csv)

        def pick(col: str) -> pd.Series:
            if col not in extra.columns:
                report.warnings.append(f"{meta_csv.name}: optional column {col!r} absent")
                return pd.Series(np.nan, index=df.index, dtype=object)
            return df["image_id"].map(extra[col])

        _set_demographics(df, pick, "age_approx", "sex", "anatom_site_general")
        lesion = _clean_str(pick("lesion_id"))
    else:
        report.warnings.append(
            "fedisic2019: no ISIC_2019_Training_Metadata.csv: age/sex/site unknown"
        )
        df["age"] = np.nan
        df["sex"] = "unknown"
        df["anatom_site"] = "unknown"
        lesion = pd.Series(pd.NA, index=df.index, dtype="string")
    if lesion.isna().any():
        ids = df.loc[lesion.isna(), "image_id"].tolist()
        report.warnings.append(
            f"fedisic2019: {len(ids)} image(s) without lesion_id use their image id as group "
            f"(images of one lesion may then be split apart); first {ids[:_FIRST]}"
        )
    df["group_id"] = lesion.fillna(df["image_id"]).astype(str)
    img_dirs = [root / "ISIC_2019_Training_Input_preprocessed", root / "ISIC_2019_Training_Input"]
    if not any(d.is_dir() for d in img_dirs):
        img_dirs = [root]
    paths = _scan_images(img_dirs, _IMAGE_SUFFIXES)
    df["_path"] = df["image_id"].map(paths)
    reader = FileImageReader(paths, on_bad)
    rows = _Rows("fedisic2019", df, reader, report, split_file, str(root.resolve()), meta_files)
    return _finish(rows, on_bad, verify_images)


# ----------------------------------------------------------------------------- a hospital's CSV

CSV_LABELS = "labels.csv"  # what a csv export folder holds (or pass the CSV file itself)
CSV_LABEL_MAP = "label-map.csv"  # optional, beside the CSV: from,to (to: a HAM class name)
_CSV_SUFFIXES = (*_IMAGE_SUFFIXES, ".dcm")
_LEAVES = "path leaves the folder"


def _csv_label_map(file: Path, classes: list[str]) -> dict[str, str]:
    """``from`` (lower case) -> class name; a bad row raises naming the file and line."""
    raw = _read_csv(file)
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    _require(raw.columns, ["from", "to"], file)
    known = {c.lower(): c for c in classes}
    out: dict[str, str] = {}
    for i, (src, dst) in enumerate(zip(_text(raw["from"]), _text(raw["to"]), strict=True)):
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
            raise DataError(f"csv: no {CSV_LABELS} in folder {given} (or pass the CSV file)")
    elif given.is_file():
        csv = given
    else:
        raise DataError(f"csv: no such file or folder {given}")
    root = csv.parent
    raw = _read_csv(csv)
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    _require(raw.columns, ["image", "label"], csv)
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
    cells = [_csv_image_path(root, v) for v in _text(raw["image"])]
    df["image_id"] = [c[0] for c in cells]
    refused = pd.Series([c[2] for c in cells], index=raw.index)
    group = _clean_str(raw["group"]) if "group" in raw.columns else None
    df["group_id"] = (group if group is not None else df["image_id"]).fillna(df["image_id"])
    df["group_id"] = df["group_id"].astype(str)
    given_label = _text(raw["label"])
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    index = given_label.map(lambda v: lookup.get(mapping.get(v.lower(), v).lower(), -1))
    df["label"] = index.astype(int)
    df["label_name"] = [
        classes[i] if i >= 0 else v for i, v in zip(index, given_label, strict=True)
    ]
    _set_demographics(df, lambda c: _col(raw, c, report, csv.name), "age", "sex", "anatom_site")
    df["dx_type"] = _text(raw["dx_type"]) if "dx_type" in raw.columns else ""
    df["source_site"] = _text(raw["site"]) if "site" in raw.columns else ""
    split = _text(raw["split"]).str.lower() if "split" in raw.columns else None
    df["source_split"] = split.map(lambda s: _SPLIT_ALIASES.get(s, s)) if split is not None else ""
    df["_where"] = _lines(csv.name, len(raw))
    df["_path"] = [c[1] if c[1] is not None and c[1].is_file() else None for c in cells]
    # Refused paths first (never looked at again; leaving the folder before anything else),
    # then the values this format alone checks, then the shared checks.
    for reason in sorted(set(refused) - {""}, key=lambda r: (r != _LEAVES, r)):
        df = _flag_bad(df, refused.loc[df.index] == reason, reason, csv, report, on_bad)
        refused = refused.loc[df.index]
    bad_split = ~df["source_split"].isin(["", *SPLITS])
    values = sorted(set(df.loc[bad_split, "source_split"]))[:_FIRST]
    detail = f" {values} (allowed: {list(SPLITS)} or empty)"
    df = _flag_bad(df, bad_split, "unknown split", csv, report, on_bad, detail)
    rows = _Rows(
        "csv", df, FileImageReader({}, on_bad), report, csv, str(root.resolve()), meta_files
    )
    df = _drop_bad_rows(rows, classes, on_bad)  # duplicates, unknown labels, missing files
    splits = df[df["source_split"] != ""].groupby("group_id")["source_split"].nunique()
    two = df["group_id"].isin(splits.index[splits > 1])
    detail = f" {sorted(set(df.loc[two, 'group_id']))[:_FIRST]} (a group must stay in one split)"
    df = _flag_bad(df, two, "group in two splits", csv, report, on_bad, detail)
    rows.df = df
    rows.reader = FileImageReader(dict(zip(df["image_id"], df["_path"], strict=True)), on_bad)
    return _finish(rows, on_bad, verify_images)


# ----------------------------------------------------------------------------- entry point


def load_source(
    fmt: str, path: str | Path, *, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """Load a data source in its publisher's on-disk format (see module docstring)."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    return get_format(fmt, FORMATS).load(path, on_bad=on_bad, verify_images=verify_images)


def open_source(
    fmt: str, path: str | Path | None = None, *, n_images: int = 1500, image_size: int = 32
) -> SourceData:
    """Any registered format: ``synth-ham``, or a format given no path, is the built-in
    synthetic set in that format's layout (made once, :func:`synth.ensure_builtin`)."""
    entry = get_format(fmt)
    if entry.builtin and path is not None:
        raise DataError(f"{fmt} is the built-in synthetic data set: it takes no data path")
    if entry.builtin or path is None:
        stored = entry.stored_as or entry.name
        folder = synth.ensure_builtin(stored, n_images=n_images, image_size=image_size)
        return load_source(stored, folder)
    return load_source(fmt, path)
