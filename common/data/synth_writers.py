"""The synthetic writers, one per on-disk format, each in exactly the layout its loader reads
(common/data/ham.py, isic.py, csv_export.py); metadata from synth_tables.py, images from
lesion_image.py. Same seed => byte-identical metadata files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.data.lesion_image import render_all
from common.data.schema import ISIC2019_CLASSES
from common.data.synth_tables import (
    CLASS_FLOOR,
    FEDISIC_IMAGES_PER_LESION,
    FEDISIC_TABLE,
    HF_SPLITS,
    ISIC2019_SITES,
    allocate,
    ham_table,
    isic2020_table,
    lesion_sizes,
    pick_weighted,
    unique_ids,
)


def _jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


# ----------------------------------------------------------------------------- writers


def write_ham_dataverse(out: Path, n_images: int, size: int, seed: int) -> None:
    df = ham_table(n_images, seed)
    images = render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    _write_csv(df.drop(columns="_lesion"), out / "HAM10000_metadata.csv")
    # Like the real download: images split by id order over two part folders.
    order = np.argsort(df["image_id"].to_numpy(), kind="stable")
    half = (len(df) + 1) // 2
    for rank, i in enumerate(order):
        part = out / f"HAM10000_images_part_{1 if rank < half else 2}"
        part.mkdir(exist_ok=True)
        (part / f"{df.at[i, 'image_id']}.jpg").write_bytes(_jpeg(images[i]))


def write_ham_hf(out: Path, n_images: int, size: int, seed: int) -> None:
    import pyarrow as pa  # lazily: heavy, the parquet layout only
    import pyarrow.parquet as pq

    df = ham_table(n_images, seed)
    images = render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    # Split by image, not by lesion, as the hub copy does (so lesions straddle splits).
    rng = np.random.default_rng([seed, 20])
    split = np.array(pick_weighted(rng, HF_SPLITS, len(df)))
    for name in HF_SPLITS:  # every split non-empty
        if not (split == name).any():
            split[rng.integers(len(df))] = name
    features = {
        "image": {"_type": "Image"},
        **{c: {"dtype": "string", "_type": "Value"} for c in ("image_id", "lesion_id", "dx")},
        "dx_type": {"dtype": "string", "_type": "Value"},
        "age": {"dtype": "float64", "_type": "Value"},
        "sex": {"dtype": "string", "_type": "Value"},
        "localization": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("image_id", pa.string()),
            ("lesion_id", pa.string()),
            ("dx", pa.string()),
            ("dx_type", pa.string()),
            ("age", pa.float64()),
            ("sex", pa.string()),
            ("localization", pa.string()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    data = out / "data"
    data.mkdir()
    for name in HF_SPLITS:
        idx = np.flatnonzero(split == name)
        n_shards = 2 if name == "train" and len(idx) > 1 else 1
        for s, chunk in enumerate(np.array_split(idx, n_shards)):
            part = df.iloc[chunk]
            cols = {
                "image": [
                    {"bytes": _jpeg(images[i]), "path": f"{df.at[i, 'image_id']}.jpg"}
                    for i in chunk
                ],
                **{c: part[c].tolist() for c in schema.names if c != "image"},
            }
            table = pa.Table.from_pydict(cols, schema=schema)
            pq.write_table(
                table, data / f"{name}-{s:05d}-of-{n_shards:05d}.parquet", row_group_size=100
            )


def _dicom_bytes(arr: np.ndarray, row: pd.Series, institution: str, seed: int) -> bytes:
    """A valid VL Photographic Image DICOM (RGB, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset  # lazily: heavy, DICOM only
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    name = row["image_name"]
    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image Storage
    sop_uid = generate_uid(entropy_srcs=[str(seed), name, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), row["patient_id"], "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), name, "series"])
    ds.Modality = "XC"
    ds.InstitutionName = institution
    ds.PatientID = row["patient_id"]
    ds.PatientSex = {"male": "M", "female": "F"}.get(row["sex"], "O")
    if pd.notna(row["age_approx"]):
        ds.PatientAge = f"{int(row['age_approx']):03d}Y"
    site = row["anatom_site_general_challenge"]
    if isinstance(site, str) and site:
        ds.BodyPartExamined = re.sub(r"[^A-Z0-9 _]", " ", site.upper())[:16]  # CS charset
    ds.ImageComments = row["diagnosis"]
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_isic2020(
    out: Path, n_images: int, size: int, seed: int, *, dicom: bool = True, jpeg_copies: bool = False
) -> None:
    df, _ = isic2020_table(n_images, seed)
    # Each image is its own lesion (ISIC 2020 has one image per lesion in the vast majority).
    images = render_all(
        df["diagnosis"].tolist(), df["_inst"].tolist(), list(range(len(df))), size, seed
    )
    _write_csv(df.drop(columns="_inst"), out / "train.csv")
    if dicom:
        (out / "train").mkdir()
        for i, row in df.iterrows():
            data = _dicom_bytes(images[i], row, row["_inst"], seed)
            (out / "train" / f"{row['image_name']}.dcm").write_bytes(data)
    if jpeg_copies or not dicom:
        (out / "jpeg" / "train").mkdir(parents=True)
        for i, name in enumerate(df["image_name"]):
            (out / "jpeg" / "train" / f"{name}.jpg").write_bytes(_jpeg(images[i]))


def write_fedisic2019(out: Path, n_images: int, size: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 40])
    per_center = allocate(
        n_images, {c: t[1] + t[2] for c, t in FEDISIC_TABLE.items()}, floor=4 * CLASS_FLOOR
    )
    rows = []
    lesion_no = 0
    for c, (name, n_train, n_test, counts) in FEDISIC_TABLE.items():
        alloc = allocate(per_center[c], dict(enumerate(counts)), floor=CLASS_FLOOR)
        test_frac = n_test / (n_train + n_test)
        for target, k in alloc.items():
            if not k:
                continue
            # FLamby's split is by image, stratified by center (lesions can straddle it).
            folds = np.array(["train"] * k, dtype=object)
            n_test_k = min(k - 1, round(k * test_frac)) if k > 1 else 0
            folds[rng.choice(k, n_test_k, replace=False)] = "test"
            j = 0
            for n_views in lesion_sizes(k, FEDISIC_IMAGES_PER_LESION[name], rng):
                age = float(np.clip(5 * round(rng.normal(55, 17) / 5), 5, 85))
                sex = "male" if rng.random() < 0.52 else "female"
                site = pick_weighted(rng, ISIC2019_SITES)
                for _ in range(n_views):
                    rows.append((lesion_no, target, c, name, folds[j], age, sex, site))
                    j += 1
                lesion_no += 1
    df = pd.DataFrame(
        rows, columns=["_lesion", "target", "center", "_name", "fold", "age", "sex", "site"]
    )
    ids = unique_ids(rng, len(df), 0, 73_000)
    df.insert(0, "image", [f"ISIC_{i:07d}" for i in ids])
    lesion_nums = unique_ids(rng, lesion_no, 0, 99_999)
    prefix = df["_name"].map(
        lambda n: "BCN" if n == "BCN" else "HAM" if n.startswith("HAM") else ""
    )
    df["lesion_id"] = [
        f"{p}_{lesion_nums[les]:07d}" if p else np.nan
        for p, les in zip(prefix, df["_lesion"], strict=True)
    ]
    df = df.sort_values("image", kind="stable").reset_index(drop=True)
    labels = [ISIC2019_CLASSES[t] for t in df["target"]]
    images = render_all(labels, df["_name"].tolist(), df["_lesion"].tolist(), size, seed)
    split = df[["image", "target", "center", "fold"]].copy()
    split["fold2"] = split["fold"] + "_" + split["center"].astype(str)
    _write_csv(split, out / "train_test_split")
    meta = pd.DataFrame(
        {
            "image": df["image"],
            "age_approx": df["age"],
            "anatom_site_general": df["site"].replace("", np.nan),
            "lesion_id": df["lesion_id"],
            "sex": df["sex"],
        }
    )
    _write_csv(meta, out / "ISIC_2019_Training_Metadata.csv")
    img_dir = out / "ISIC_2019_Training_Input_preprocessed"
    img_dir.mkdir()
    for i, name in enumerate(df["image"]):
        (img_dir / f"{name}.jpg").write_bytes(_jpeg(images[i]))


# Words a hospital's own export might use for a class, mapped by the label-map.csv written
# beside its labels.csv (the other rows use the HAM class names in mixed case).
CSV_EXPORT_WORDS = {"mel": "Melanoma", "nv": "Naevus", "bcc": "Basal cell carcinoma"}


def write_csv_export(out: Path, n_images: int, size: int, seed: int) -> None:
    """A hospital's own export (format ``csv``): ``labels.csv`` listing JPEG, PNG and DICOM
    images under ``images/`` (every third file of each kind), with a ``label-map.csv`` for
    the hospital's own class words, patient-level groups and a group-safe split."""
    df = ham_table(n_images, seed)
    images = render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    rng = np.random.default_rng([seed, 50])
    lesions = np.unique(df["_lesion"].to_numpy())
    shares = {"train": 0.7, "validation": 0.15, "test": 0.15}
    split_of = dict(zip(lesions, pick_weighted(rng, shares, len(lesions)), strict=True))
    (out / "images").mkdir()
    # the hospital's own names: a case number, its patients (no HAM10000 ids, so the export
    # can join a federation of the built-in sites, whose images and lesions it must not share)
    patients = df["lesion_id"].str.replace("HAM_", "patient-", regex=False)
    names, labels = [], []
    for i, row in df.iterrows():
        kind = ("jpg", "png", "dcm")[int(i) % 3]
        rel = f"images/case-{int(i):05d}.{kind}"
        if kind == "jpg":
            data = _jpeg(images[i])
        elif kind == "png":
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            data = buf.getvalue()
        else:
            fields = {
                "image_name": Path(rel).stem, "patient_id": patients[i],
                "sex": row["sex"], "age_approx": row["age"],
                "anatom_site_general_challenge": row["localization"], "diagnosis": row["dx"],
            }  # fmt: skip
            data = _dicom_bytes(images[i], pd.Series(fields), "Hospital A", seed)
        (out / rel).write_bytes(data)
        names.append(rel)
        word = CSV_EXPORT_WORDS.get(row["dx"]) if rng.random() < 0.3 else None
        labels.append(word or (row["dx"].upper() if rng.random() < 0.5 else row["dx"]))
    table = pd.DataFrame(
        {
            "image": names,
            "label": labels,
            "group": patients,
            "site": "hospital-a",
            "split": df["_lesion"].map(split_of),
            "age": df["age"],
            "sex": df["sex"],
            "anatom_site": df["localization"],
        }
    )
    _write_csv(table, out / "labels.csv")
    words = pd.DataFrame({"from": list(CSV_EXPORT_WORDS.values()), "to": list(CSV_EXPORT_WORDS)})
    _write_csv(words, out / "label-map.csv")
