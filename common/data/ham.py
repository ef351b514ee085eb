"""HAM10000 loaders: the Hugging Face copy (parquet shards or a hub id) and the Harvard
Dataverse copy (HAM10000_metadata.csv + JPEG folders)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.formats import LayoutError
from common.data.readers import BytesImageReader, ParquetImageReader
from common.data.rows import (
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    Rows,
    Table,
    finish,
    ids_and_groups,
    labels_from_names,
    optional_column,
    require_columns,
    row_lines,
    scan_images,
    set_demographics,
    text,
)
from common.data.schema import HAM_CLASSES, DataError, LoadReport, SourceData

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_FROM_NAME = re.compile(r"^(train|training|validation|valid|val|test)(?=[-_.])", re.I)


def _split_of(shard: Path) -> str:
    m = _SPLIT_FROM_NAME.match(shard.name) or _SPLIT_FROM_NAME.match(shard.parent.name + "-")
    if not m:
        return ""
    s = m.group(1).lower()
    return SPLIT_ALIASES.get(s, s)


def _ham_columns(df: pd.DataFrame, report: LoadReport, file: Path | str) -> pd.DataFrame:
    """Normalise HAM10000 metadata columns (shared by the HF and Dataverse copies)."""
    out = ids_and_groups(df, "image_id", "lesion_id", report, file)
    out["label"], out["label_name"] = labels_from_names(df["dx"], HAM_CLASSES)
    set_demographics(
        out, lambda c: optional_column(df, c, report, file), "age", "sex", "localization"
    )
    out["dx_type"] = text(optional_column(df, "dx_type", report, file))
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
        part["_split"] = SPLIT_ALIASES.get(str(split), str(split))
        part["_where"] = [f"hub {repo_id} split {split} row {i}" for i in range(len(part))]
        frames.append(part)
    raw = pd.concat(frames, ignore_index=True)
    require_columns(raw.columns, ["image", "image_id", "lesion_id", "dx"], repo_id)
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
    rows = Rows("ham-hf", df, reader, report, file=repo_id, root=repo_id)
    return finish(rows, on_bad, verify_images)


def load_ham_hf(path: str | Path, on_bad: str = "error", verify_images: bool = False) -> SourceData:
    """HAM10000 as the HF hub copy ``marmal88/skin_cancer``: parquet shards, split by name."""
    import pyarrow.parquet as pq  # lazily: heavy, parquet sources only

    root = Path(path)
    if not root.exists():
        if _HUB_ID.match(str(path)):
            return _load_ham_hub(str(path), on_bad, verify_images)
        raise LayoutError(f"ham-hf: no such folder {root}")
    shards = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    if not shards:
        raise LayoutError(f"ham-hf: no *.parquet shards under {root}")
    required = ["image", "image_id", "lesion_id", "dx"]
    frames = []
    locations: dict[str, tuple[str, int, int]] = {}
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except Exception as exc:  # ArrowInvalid, OSError ...
            raise DataError(f"cannot read parquet shard {shard}: {exc}") from exc
        names = pf.schema_arrow.names
        require_columns(names, required, shard)
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
    rows = Rows("ham-hf", df, reader, report, root, str(root.resolve()), meta_files=shards)
    return finish(rows, on_bad, verify_images)


def load_ham_dataverse(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """HAM10000 from Harvard Dataverse: HAM10000_metadata.csv + JPEG part folders."""
    names = ["HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata"]
    required = ["lesion_id", "image_id", "dx"]
    table = Table.read(path, "ham-dataverse", names, "metadata", required, file_ok=True)
    raw, report, csv = table.raw, table.report, table.file
    df = _ham_columns(raw, report, csv.name)
    if "dataset" in raw.columns:
        df["source_site"] = text(raw["dataset"])
    else:
        report.warnings.append(f"{csv.name}: no 'dataset' column (Kaggle copy?): source_site ''")
        df["source_site"] = ""
    df["source_split"] = ""
    df["_where"] = row_lines(csv.name, len(raw))
    paths = scan_images([table.root], IMAGE_SUFFIXES)
    table.image_files(df, paths, "HAM10000_images_part_*/")
    return table.finish(df, on_bad, verify_images)
