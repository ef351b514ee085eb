"""ISIC loaders: SIIM-ISIC 2020 (train.csv + DICOM or JPEG copies) and FLamby's
Fed-ISIC2019 (train_test_split + preprocessed JPEGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.data.rows import (
    FIRST_IDS,
    IMAGE_SUFFIXES,
    Table,
    clean_str,
    flag_bad,
    ids_and_groups,
    labels_from_int,
    optional_column,
    read_csv,
    require_columns,
    row_lines,
    scan_images,
    set_demographics,
    text,
)
from common.data.schema import ISIC2019_CLASSES, ISIC2020_CLASSES, LoadReport, SourceData

# FLamby Fed-ISIC2019 center index -> name (Terrail et al. 2022, FLamby fed_isic2019 README).
FEDISIC_CENTERS: dict[int, str] = {
    0: "BCN",
    1: "HAM_vidir_molemax",
    2: "HAM_vidir_modern",
    3: "HAM_rosendahl",
    4: "MSK",
    5: "HAM_vienna_dias",
}


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
    names = [
        "train.csv",
        "ISIC_2020_Training_GroundTruth_v2.csv",
        "ISIC_2020_Training_GroundTruth.csv",
    ]
    required = ["image_name", "patient_id", "target"]
    table = Table.read(path, "isic2020", names, "metadata", required)
    root, csv, raw, report = table.root, table.file, table.raw, table.report
    df = ids_and_groups(raw, "image_name", "patient_id", report, csv.name)
    df["label"], df["label_name"] = labels_from_int(raw["target"], ISIC2020_CLASSES)
    columns = ("age_approx", "sex", "anatom_site_general_challenge")
    set_demographics(df, lambda c: optional_column(raw, c, report, csv.name), *columns)
    df["dx_type"] = ""  # ISIC 2020 does not record how the diagnosis was confirmed
    df["source_split"] = "train"
    df["_where"] = row_lines(csv.name, len(raw))
    # DICOM first (the primary format), JPEG copies as fallback.
    dicoms = scan_images([root / "train"], (".dcm",))
    jpegs = scan_images(
        [root / "jpeg" / "train", root / "train", root / "ISIC_2020_Training_JPEG"], IMAGE_SUFFIXES
    )
    paths = {**jpegs, **dicoms}
    table.image_files(df, paths, "train/ (or jpeg/train/)")
    df["source_site"] = ""
    # Run the generic row checks first so only kept rows get their headers read.
    probe = df[~df["image_id"].duplicated(keep="first")]
    ids = [i for i in probe.loc[probe["_path"].notna(), "image_id"] if i in paths]
    sites, header_errors = _institutions(paths, ids, report)
    if header_errors:
        first = next(iter(header_errors.values()))
        df = flag_bad(
            df, df["image_id"].isin(header_errors), "unreadable DICOM header", csv, report,
            on_bad, f" ({first})",
        )  # fmt: skip
    if sites:
        df["source_site"] = df["image_id"].map(sites).fillna("").astype(str)
    else:
        report.warnings.append("isic2020: no DICOM InstitutionName found: source_site ''")
    return table.finish(df, on_bad, verify_images)


# ----------------------------------------------------------------------------- Fed-ISIC2019


def load_fedisic2019(
    path: str | Path, on_bad: str = "error", verify_images: bool = False
) -> SourceData:
    """FLamby Fed-ISIC2019: train_test_split + preprocessed JPEGs (+ ISIC 2019 metadata)."""
    names = ["train_test_split", "train_test_folds.csv", "train_test_split.csv"]
    required = ["image", "target", "center", "fold"]
    table = Table.read(path, "fedisic2019", names, "split file", required)
    root, split_file, raw, report = table.root, table.file, table.raw, table.report
    df = pd.DataFrame(index=raw.index)
    df["image_id"] = text(raw["image"])
    df["label"], df["label_name"] = labels_from_int(raw["target"], ISIC2019_CLASSES)
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
            f"{split_file.name}: center value(s) {unknown_centers[:FIRST_IDS]} are not FLamby's "
            "0-5; kept as given"
        )
    df["source_split"] = text(raw["fold"])
    df["dx_type"] = ""
    df["_where"] = row_lines(split_file.name, len(raw))

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
        extra = read_csv(meta_csv)
        require_columns(extra.columns, ["image"], meta_csv)
        extra = extra.drop_duplicates("image").set_index("image")
        meta_files.append(meta_csv)

        def pick(col: str) -> pd.Series:
            if col not in extra.columns:
                report.warnings.append(f"{meta_csv.name}: optional column {col!r} absent")
                return pd.Series(np.nan, index=df.index, dtype=object)
            return df["image_id"].map(extra[col])

        set_demographics(df, pick, "age_approx", "sex", "anatom_site_general")
        lesion = clean_str(pick("lesion_id"))
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
            f"(images of one lesion may then be split apart); first {ids[:FIRST_IDS]}"
        )
    df["group_id"] = lesion.fillna(df["image_id"]).astype(str)
    img_dirs = [root / "ISIC_2019_Training_Input_preprocessed", root / "ISIC_2019_Training_Input"]
    if not any(d.is_dir() for d in img_dirs):
        img_dirs = [root]
    paths = scan_images(img_dirs, IMAGE_SUFFIXES)
    table.image_files(df, paths, "ISIC_2019_Training_Input_preprocessed/")
    return table.finish(df, on_bad, verify_images, meta_files)
