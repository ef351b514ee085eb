"""Bad input: each problem gives a DataError naming the file and row/id, or a report entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from common.data.formats import get_format
from common.data.schema import DataError
from common.data.sources import load_source
from common.data.synth import synthesize
from tests.helpers import copy_dataset


@pytest.fixture
def dataverse(synth_ham_dataverse: Path, tmp_path: Path) -> Path:
    return copy_dataset(synth_ham_dataverse, tmp_path / "ham")


@pytest.fixture
def isic(synth_isic2020: Path, tmp_path: Path) -> Path:
    return copy_dataset(synth_isic2020, tmp_path / "isic")


def _edit_csv(path: Path, edit) -> pd.DataFrame:  # noqa: ANN001 - a small lambda
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = edit(df)
    df.to_csv(path, index=False)
    return df


def test_corrupt_jpeg(dataverse: Path) -> None:
    bad = sorted(dataverse.rglob("*.jpg"))[2]
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 10)
    src = load_source("ham-dataverse", dataverse)  # not detectable without decoding
    with pytest.raises(DataError, match=str(bad)):
        src.read_image(bad.stem)
    with pytest.raises(DataError, match=bad.stem) as err:
        load_source("ham-dataverse", dataverse, verify_images=True)
    assert "unreadable image" in str(err.value) and bad.name in str(err.value)
    skipped = load_source("ham-dataverse", dataverse, verify_images=True, on_bad="skip")
    assert skipped.report.skipped == {"unreadable image": [bad.stem]}
    assert bad.stem not in set(skipped.meta["image_id"])
    assert "skipped 1 (unreadable image)" in skipped.report.summary()


def test_truncated_dicom(isic: Path) -> None:
    bad = sorted((isic / "train").glob("*.dcm"))[4]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 1500])  # header intact, pixel data cut short
    src = load_source("isic2020", isic)
    with pytest.raises(DataError, match=bad.name) as err:
        src.read_image(bad.stem)
    assert "DICOM" in str(err.value)
    skipped = load_source("isic2020", isic, verify_images=True, on_bad="skip")
    assert skipped.report.skipped == {"unreadable image": [bad.stem]}


def test_dicom_header_garbage(isic: Path) -> None:
    bad = sorted((isic / "train").glob("*.dcm"))[1]
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=bad.name):
        load_source("isic2020", isic)
    src = load_source("isic2020", isic, on_bad="skip")
    assert src.report.skipped == {"unreadable DICOM header": [bad.stem]}


def test_dicom_without_pixel_data(isic: Path) -> None:
    bad = sorted((isic / "train").glob("*.dcm"))[0]
    ds = pydicom.dcmread(bad)
    del ds.PixelData
    ds.save_as(bad, enforce_file_format=True)
    src = load_source("isic2020", isic)
    with pytest.raises(DataError, match="no pixel data") as err:
        src.read_image(bad.stem)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize(
    ("fixture", "fmt", "file", "column"),
    [
        ("synth_ham_dataverse", "ham-dataverse", "HAM10000_metadata.csv", "dx"),
        ("synth_isic2020", "isic2020", "train.csv", "patient_id"),
        ("synth_fedisic2019", "fedisic2019", "train_test_split", "target"),
    ],
)
def test_missing_required_column(
    fixture: str, fmt: str, file: str, column: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = copy_dataset(request.getfixturevalue(fixture), tmp_path / "d")
    _edit_csv(root / file, lambda df: df.drop(columns=column))
    for on_bad in ("error", "skip"):  # always an error
        with pytest.raises(DataError, match=file) as err:
            load_source(fmt, root, on_bad=on_bad)
        assert repr(column) in str(err.value)


def test_missing_column_parquet(synth_ham_hf: Path, tmp_path: Path) -> None:
    root = copy_dataset(synth_ham_hf, tmp_path / "hf")
    shard = sorted((root / "data").glob("test-*.parquet"))[0]
    pq.write_table(pq.read_table(shard).drop(["lesion_id"]), shard)
    with pytest.raises(DataError, match="lesion_id") as err:
        load_source("ham-hf", root)
    assert shard.name in str(err.value)


def test_unknown_label(dataverse: Path) -> None:
    csv = dataverse / "HAM10000_metadata.csv"
    df = _edit_csv(csv, lambda d: d.assign(dx=d["dx"].where(d.index != 5, "wart")))
    bad_id = df.loc[5, "image_id"]
    with pytest.raises(DataError, match=bad_id) as err:
        load_source("ham-dataverse", dataverse)
    msg = str(err.value)
    assert "unknown label" in msg and "wart" in msg and "line 7" in msg and csv.name in msg
    src = load_source("ham-dataverse", dataverse, on_bad="skip")
    assert src.report.skipped == {"unknown label": [bad_id]} and len(src.meta) == len(df) - 1


def test_unknown_target_fedisic(synth_fedisic2019: Path, tmp_path: Path) -> None:
    root = copy_dataset(synth_fedisic2019, tmp_path / "f")
    df = _edit_csv(
        root / "train_test_split", lambda d: d.assign(target=d["target"].where(d.index != 2, "9"))
    )
    with pytest.raises(DataError, match=df.loc[2, "image"]):
        load_source("fedisic2019", root)


def test_image_file_missing(dataverse: Path) -> None:
    gone = sorted(dataverse.rglob("*.jpg"))[9]
    gone.unlink()
    with pytest.raises(DataError, match=gone.stem) as err:
        load_source("ham-dataverse", dataverse)
    assert "image file missing" in str(err.value) and "HAM10000_metadata.csv" in str(err.value)
    src = load_source("ham-dataverse", dataverse, on_bad="skip")
    assert src.report.skipped == {"image file missing": [gone.stem]}
    assert gone.stem not in set(src.meta["image_id"])


def test_nan_age_and_sex_are_warnings(dataverse: Path) -> None:
    def edit(d: pd.DataFrame) -> pd.DataFrame:
        d.loc[[0, 1], "age"] = ""
        d.loc[1, "sex"] = ""
        d.loc[2, "sex"] = "unknown"
        return d

    df = _edit_csv(dataverse / "HAM10000_metadata.csv", edit)
    src = load_source("ham-dataverse", dataverse)  # not an error
    meta = src.meta.set_index("image_id")
    ids = df["image_id"]
    assert meta.loc[[ids[0], ids[1]], "age"].isna().all()
    assert (meta.loc[[ids[1], ids[2]], "sex"] == "unknown").all()
    age_warn = next(w for w in src.report.warnings if "unknown age" in w)
    sex_warn = next(w for w in src.report.warnings if "unknown sex" in w)
    assert ids[0] in age_warn and ids[1] in age_warn
    assert ids[1] in sex_warn and ids[2] in sex_warn
    assert src.report.n_skipped() == 0


def test_duplicated_image_id(dataverse: Path) -> None:
    csv = dataverse / "HAM10000_metadata.csv"
    df = _edit_csv(csv, lambda d: pd.concat([d, d.iloc[[4]]], ignore_index=True))
    dup = df.loc[4, "image_id"]
    with pytest.raises(DataError, match=dup) as err:
        load_source("ham-dataverse", dataverse)
    assert "duplicated image id" in str(err.value) and f"line {len(df) + 1}" in str(err.value)
    src = load_source("ham-dataverse", dataverse, on_bad="skip")
    assert src.report.skipped == {"duplicated image id": [dup]}
    assert src.meta["image_id"].is_unique and len(src.meta) == len(df) - 1


def test_unparseable_metadata(dataverse: Path) -> None:
    (dataverse / "HAM10000_metadata.csv").write_bytes(b"")
    with pytest.raises(DataError, match="HAM10000_metadata.csv"):
        load_source("ham-dataverse", dataverse)


# ------------------------------------------------------------------ a folder of another layout
# What each layout requires first, as its loader names it when the folder lacks it.
EXPECTED = {
    "ham-hf": "*.parquet shards",
    "ham-dataverse": "HAM10000_metadata.csv",
    "isic2020": "train.csv",
    "fedisic2019": "train_test_split",
    "csv": "labels.csv",
}


@pytest.fixture(scope="module")
def layouts(
    tmp_path_factory: pytest.TempPathFactory,
    synth_ham_hf: Path,
    synth_ham_dataverse: Path,
    synth_isic2020: Path,
    synth_fedisic2019: Path,
) -> dict[str, Path]:
    """A folder of each layout (the session's, read-only; csv made here) and an empty one."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "empty").mkdir()
    return {
        "ham-hf": synth_ham_hf,
        "ham-dataverse": synth_ham_dataverse,
        "isic2020": synth_isic2020,
        "fedisic2019": synth_fedisic2019,
        "csv": synthesize("csv", root / "csv", n_images=12, image_size=16, seed=0),
        "empty": root / "empty",
    }


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_a_folder_of_another_layout_names_the_missing_file(
    fmt: str, layouts: dict[str, Path]
) -> None:
    for other, folder in layouts.items():
        if other == fmt:
            continue
        with pytest.raises(DataError) as err:
            load_source(fmt, folder)
        message = str(err.value)
        assert "\n" not in message, message
        assert EXPECTED[fmt] in message and str(folder) in message, (other, message)
        # and the whole layout the user chose, from the format registry
        assert message.endswith(f"({fmt} layout: {get_format(fmt).layout})"), message


@pytest.mark.parametrize(
    ("fmt", "keep", "expected"),
    [
        ("ham-dataverse", "HAM10000_metadata.csv", "HAM10000_images_part_*/"),
        ("isic2020", "train.csv", "train/"),
        ("fedisic2019", "train_test_split", "ISIC_2019_Training_Input_preprocessed/"),
    ],
)
def test_metadata_without_any_image_names_the_image_folder(
    fmt: str, keep: str, expected: str, layouts: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copy(next(layouts[fmt].rglob(keep)), tmp_path / keep)

    with pytest.raises(DataError, match=r"no image files in .* layout:") as err:
        load_source(fmt, tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_run_refused_for_its_data_leaves_no_empty_folder(tmp_path: Path) -> None:
    from simulations.runner import simulate  # the runner: Flower and Ray behind it

    out = tmp_path / "runs" / "refused"
    bad = {"data-format": "ham-dataverse", "data-path": str(tmp_path / "no-such-folder")}
    with pytest.raises(DataError, match="no such folder"):
        simulate(None, bad, out=out)
    assert not out.exists() and not out.parent.exists()
