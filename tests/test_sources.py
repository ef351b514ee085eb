"""Every format round-trips: synthesize, then load with the real-format loader."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.data.imaging import read_dicom
from common.data.isic import FEDISIC_CENTERS
from common.data.schema import (
    COLUMNS,
    HAM_CLASSES,
    ISIC2019_CLASSES,
    ISIC2020_CLASSES,
    DataError,
    SourceData,
)
from common.data.sources import load_source
from common.data.synth import synthesize
from common.data.synth_tables import ISIC2020_INSTITUTIONS
from tests.helpers import SYNTH_N, SYNTH_SIZE

HAM_SITES = {"vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"}


def _check_common(src: SourceData, fmt: str, classes: list[str]) -> None:
    meta = src.meta
    assert list(meta.columns) == COLUMNS
    assert len(meta) == SYNTH_N[fmt] == src.report.n_kept == src.report.n_rows_read
    assert src.classes == classes and src.format == fmt
    assert meta["image_id"].is_unique
    assert meta["label"].dtype == np.int64 and meta["age"].dtype == float
    assert (meta["label_name"] == [classes[i] for i in meta["label"]]).all()
    assert set(meta["sex"]) <= {"male", "female", "unknown"}
    assert (meta["anatom_site"] == meta["anatom_site"].str.lower()).all()
    assert src.report.n_skipped() == 0
    for image_id in meta["image_id"].iloc[[0, -1]]:
        img = src.read_image(image_id)
        assert img.shape == (SYNTH_SIZE, SYNTH_SIZE, 3) and img.dtype == np.uint8
        assert img.std() > 3  # a picture, not a blank


def test_ham_dataverse_roundtrip(synth_ham_dataverse: Path) -> None:
    src = load_source("ham-dataverse", synth_ham_dataverse)
    _check_common(src, "ham-dataverse", HAM_CLASSES)
    meta = src.meta
    assert set(meta["label_name"]) == set(HAM_CLASSES)  # floor keeps every class
    assert set(meta["source_site"]) == HAM_SITES
    assert (meta["source_split"] == "").all()
    assert meta["group_id"].str.startswith("HAM_").all()
    assert meta["group_id"].nunique() < len(meta)  # several images per lesion
    # JPEGs really come from both part folders
    parts = {p.parent.name for p in synth_ham_dataverse.rglob("*.jpg")}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_ham_hf_roundtrip(synth_ham_hf: Path) -> None:
    shards = sorted(p.name for p in (synth_ham_hf / "data").glob("*.parquet"))
    assert "train-00000-of-00002.parquet" in shards and "test-00000-of-00001.parquet" in shards
    src = load_source("ham-hf", synth_ham_hf)
    _check_common(src, "ham-hf", HAM_CLASSES)
    meta = src.meta
    assert set(meta["source_split"]) == {"train", "validation", "test"}
    assert (meta["source_site"] == "").all()
    # split by image, like the hub copy: lesions straddle splits and the report says so
    assert any("more than one of the publisher's splits" in w for w in src.report.warnings)
    # the same images as the Dataverse copy of the same seed
    dv = synthesize("ham-dataverse", synth_ham_hf.parent / "dv", n_images=20, image_size=16)
    hf = synthesize("ham-hf", synth_ham_hf.parent / "hf", n_images=20, image_size=16)
    a, b = load_source("ham-dataverse", dv), load_source("ham-hf", hf)
    i = a.meta["image_id"].iloc[3]
    assert np.abs(a.read_image(i).astype(int) - b.read_image(i).astype(int)).mean() < 2


def test_isic2020_roundtrip_dicom(synth_isic2020: Path) -> None:
    assert (synth_isic2020 / "train").glob("*.dcm")
    src = load_source("isic2020", synth_isic2020)
    _check_common(src, "isic2020", ISIC2020_CLASSES)
    meta = src.meta
    assert set(meta["source_site"]) == set(ISIC2020_INSTITUTIONS)  # from DICOM InstitutionName
    assert meta["group_id"].str.startswith("IP_").all()
    assert meta["group_id"].nunique() < len(meta) / 3  # many images per patient
    per_site = meta.groupby("source_site")["label"].sum()
    assert (per_site >= 1).all(), per_site  # positives at every site (documented floor)
    ds = pydicom.dcmread(next((synth_isic2020 / "train").glob("*.dcm")))
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID


def test_isic2020_jpeg_fallback(tmp_path: Path) -> None:
    out = synthesize("isic2020", tmp_path / "jpg", n_images=30, image_size=16, dicom=False)
    assert not (out / "train").exists() and (out / "jpeg" / "train").is_dir()
    src = load_source("isic2020", out)
    assert len(src.meta) == 30 and (src.meta["source_site"] == "").all()
    assert src.read_image(src.meta["image_id"][0]).shape == (16, 16, 3)


def test_fedisic2019_roundtrip(synth_fedisic2019: Path) -> None:
    src = load_source("fedisic2019", synth_fedisic2019)
    _check_common(src, "fedisic2019", ISIC2019_CLASSES)
    meta = src.meta
    assert set(meta["source_site"]) == set(FEDISIC_CENTERS.values())
    assert set(meta["source_split"]) == {"train", "test"}
    assert set(meta["label_name"]) == set(ISIC2019_CLASSES)
    msk = meta[meta["source_site"] == "MSK"]
    assert (msk["group_id"] == msk["image_id"]).all()  # no lesion ids: image id fallback
    assert any("without lesion_id" in w for w in src.report.warnings)
    ham = meta[meta["source_site"].str.startswith("HAM_")]
    assert ham["group_id"].str.startswith("HAM_").all()
    assert meta["age"].notna().mean() > 0.9


def test_verify_images_clean(synth_ham_dataverse: Path) -> None:
    src = load_source("ham-dataverse", synth_ham_dataverse, verify_images=True)
    assert src.report.n_skipped() == 0 and len(src.meta) == SYNTH_N["ham-dataverse"]


def test_fingerprint_stable_and_sensitive(synth_fedisic2019: Path, tmp_path: Path) -> None:
    a = load_source("fedisic2019", synth_fedisic2019)
    b = load_source("fedisic2019", synth_fedisic2019)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) >= 12
    out = synthesize("fedisic2019", tmp_path / "f", n_images=40, image_size=16)
    c = load_source("fedisic2019", out)
    split = out / "train_test_split"
    st = split.stat()
    os.utime(split, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_source("fedisic2019", out).fingerprint != c.fingerprint


def test_hub_id_without_datasets() -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the hub path needs network")
    with pytest.raises(DataError, match="pip install datasets") as err:
        load_source("ham-hf", "marmal88/skin_cancer")
    assert "network" in str(err.value)


def test_unknown_format_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data format"):
        load_source("kaggle", tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_source("ham-dataverse", tmp_path / "nope")
    with pytest.raises(ValueError, match="on_bad"):
        load_source("ham-dataverse", tmp_path, on_bad="ignore")


def test_one_registry_lists_the_formats() -> None:
    """Every list of formats is the registry's; each entry's loader and writer exist."""
    from common.data import formats, site_data, sources, synth

    assert set(formats.REGISTRY) == set(site_data.FORMAT_CLASSES) == set(formats.ALL_FORMATS)
    assert sources.FORMATS == synth.SYNTH_FORMATS == formats.FORMATS
    assert formats.BUILTIN_FORMAT not in formats.FORMATS
    builtin = formats.REGISTRY[formats.BUILTIN_FORMAT]
    assert builtin.stored_as in formats.FORMATS
    for entry in formats.REGISTRY.values():
        assert callable(entry.load_function), entry.name
        assert callable(entry.write_function), entry.name
        assert site_data.classes_for(entry.name) == list(entry.classes)


# ----------------------------------------------------------------------------- DICOM photometric


def _dicom(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_photometric(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    out = read_dicom(_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)

    grey = rng.integers(0, 256, (8, 10), dtype=np.uint8)
    mono2 = read_dicom(_dicom(tmp_path / "m2.dcm", grey, "MONOCHROME2"))
    assert mono2.shape == (8, 10, 3) and all(np.array_equal(mono2[..., c], grey) for c in range(3))
    mono1 = read_dicom(_dicom(tmp_path / "m1.dcm", grey, "MONOCHROME1"))
    assert np.array_equal(mono1[..., 0], 255 - grey)  # MONOCHROME1: 0 is white

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    back = read_dicom(_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 3


def test_loaders_normalise_demographics(tmp_path: Path, synth_ham_dataverse: Path) -> None:
    from tests.helpers import copy_dataset

    root = copy_dataset(synth_ham_dataverse, tmp_path / "d")
    csv = root / "HAM10000_metadata.csv"
    df = pd.read_csv(csv, dtype=str)
    df.loc[0, "sex"] = "M"
    df.loc[1, "sex"] = "Female"
    df.loc[2, "localization"] = "Lower Extremity "
    df.to_csv(csv, index=False)
    meta = load_source("ham-dataverse", root).meta.set_index("image_id")
    assert meta.at[df.loc[0, "image_id"], "sex"] == "male"
    assert meta.at[df.loc[1, "image_id"], "sex"] == "female"
    assert meta.at[df.loc[2, "image_id"], "anatom_site"] == "lower extremity"
