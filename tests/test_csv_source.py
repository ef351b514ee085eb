"""Format ``csv``: a hospital's own export (labels.csv + JPEG/PNG/DICOM), and one-site manifests.

Attacks first: every bad input gives one line naming the file and the row; an image path that
leaves the export's folder (``../``, absolute, a symlink to outside) is refused. Then a mixed
JPEG/PNG/DICOM export loads with the right labels and groups, and ``fedskin partition --site``
writes one site that keeps groups whole and the export's own split.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from common.data.partition import SPLITS, one_site, read_manifest
from common.data.schema import HAM_CLASSES, DataError
from common.data.sources import load_source
from common.data.synth import synthesize

SIZE = 16
HEADER = "image,label,group,split\n"


def _png(path: Path, colour: tuple[int, int, int] = (200, 120, 90), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), colour).save(path, format=fmt)
    return path


def _mono_dicom(path: Path, photometric: str = "MONOCHROME2") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = SIZE, SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(SIZE * SIZE, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path


def _export(root: Path, rows: str, header: str = HEADER) -> Path:
    """An export folder: a.jpg, b.png, c.png, d.jpg and the given labels.csv rows."""
    root.mkdir(parents=True, exist_ok=True)
    _png(root / "a.jpg", fmt="JPEG")
    _png(root / "b.png")
    _png(root / "img" / "c.png")
    _png(root / "d.jpg", fmt="JPEG")
    (root / "labels.csv").write_text(header + rows)
    return root


def _one_line_error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_source("csv", path, **kw)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------- attacks: leaving the folder


@pytest.mark.parametrize(
    "image", ["../outside.jpg", "img/../../outside.jpg", "/etc/passwd", "C:/Windows/x.png"]
)
def test_path_leaving_the_folder_is_refused(tmp_path: Path, image: str) -> None:
    _png(tmp_path / "outside.jpg", fmt="JPEG")
    rows = f"a.jpg,nv,g1,train\n{image},mel,g2,train\nmissing.jpg,nv,g3,train\n"
    root = _export(tmp_path / "export", rows)
    msg = _one_line_error(root)
    assert "path leaves the folder" in msg  # reported before any other bad row
    assert "labels.csv" in msg and "line 3" in msg
    # skip mode drops that row and says why; the good row stays
    src = load_source("csv", root, on_bad="skip")
    assert src.meta["image_id"].tolist() == ["a.jpg"]
    assert "path leaves the folder" in src.report.skipped
    assert "image file missing" in src.report.skipped


def test_symlink_to_outside_is_refused(tmp_path: Path) -> None:
    secret = _png(tmp_path / "secret.png")
    root = _export(tmp_path / "export", "a.jpg,nv,g1,train\nlink.png,mel,g2,train\n")
    (root / "link.png").symlink_to(secret)
    msg = _one_line_error(root)
    assert "path leaves the folder" in msg and "link.png" in msg and "line 3" in msg
    # a symlink that stays inside the folder is fine
    (root / "link.png").unlink()
    (root / "link.png").symlink_to(root / "b.png")
    assert len(load_source("csv", root).meta) == 2


# ----------------------------------------------------------------- attacks: bad rows


@pytest.mark.parametrize(
    ("rows", "reason", "line"),
    [
        ("a.jpg,nv,g1,train\nmissing.jpg,nv,g2,train\n", "image file missing", 3),
        ("a.jpg,nv,g1,train\nb.png,melanoma,g2,train\n", "unknown label ['melanoma']", 3),
        ("a.jpg,nv,g1,train\n./a.jpg,mel,g2,train\n", "duplicated image id", 3),
        ("a.jpg,nv,g1,train\nb.png,mel,g1,test\n", "group in two splits", 2),
        ("a.jpg,nv,g1,train\nb.png,mel,g2,dev\n", "unknown split ['dev']", 3),
        ("a.jpg,nv,g1,train\nlabels.csv,mel,g2,train\n", "not a JPEG, PNG or DICOM", 3),
        ("a.jpg,nv,g1,train\n,mel,g2,train\n", "no image path", 3),
    ],
    ids=["missing", "label", "duplicate", "two-splits", "split", "not-image", "empty-path"],
)
def test_bad_row_gives_one_line_naming_file_and_row(
    tmp_path: Path, rows: str, reason: str, line: int
) -> None:
    root = _export(tmp_path / "export", rows)
    msg = _one_line_error(root)
    assert reason in msg and f"labels.csv line {line}" in msg and str(root) in msg
    kept = load_source("csv", root, on_bad="skip")
    assert kept.report.n_skipped() >= 1 and kept.report.n_kept == 2 - kept.report.n_skipped()


def test_unreadable_image_names_the_file_and_row(tmp_path: Path) -> None:
    root = _export(tmp_path / "export", "a.jpg,nv,g1,train\nbroken.png,mel,g2,train\n")
    (root / "broken.png").write_bytes(b"not a png at all")
    msg = _one_line_error(root, verify_images=True)
    assert "unreadable image" in msg and "broken.png" in msg and "labels.csv line 3" in msg


def test_empty_table_and_missing_columns(tmp_path: Path) -> None:
    root = _export(tmp_path / "empty", "")
    assert "empty table" in _one_line_error(root)
    (root / "labels.csv").write_text("")
    assert "cannot parse" in _one_line_error(root)
    root = _export(tmp_path / "nolabel", "a.jpg,g1\n", header="image,group\n")
    msg = _one_line_error(root)
    assert "missing required column(s) ['label']" in msg and "labels.csv" in msg
    assert "no labels.csv" in _one_line_error(tmp_path / "nolabel" / "img")
    assert "no such file or folder" in _one_line_error(tmp_path / "nope")


def test_label_map_and_case(tmp_path: Path) -> None:
    root = _export(
        tmp_path / "export",
        "a.jpg,Melanoma,g1,train\nb.png,NV,g2,validation\nimg/c.png,naevus,g3,test\n"
        "d.jpg,Bcc,g4,train\n",
    )
    (root / "label-map.csv").write_text("from,to\nmelanoma,MEL\nNaevus,nv\n")
    src = load_source("csv", root)
    got = dict(zip(src.meta["image_id"], src.meta["label_name"], strict=True))
    assert got == {"a.jpg": "mel", "b.png": "nv", "img/c.png": "nv", "d.jpg": "bcc"}
    assert src.meta.set_index("image_id").loc["a.jpg", "label"] == HAM_CLASSES.index("mel")
    (root / "label-map.csv").write_text("from,to\nmelanoma,mel\nnaevus,mole\n")
    msg = _one_line_error(root)
    assert "label-map.csv" in msg and "line 3" in msg and "'mole'" in msg


# ----------------------------------------------------------------- what loads


def test_mixed_export_loads_with_labels_groups_and_rgb(tmp_path: Path) -> None:
    root = synthesize("csv", tmp_path / "export", n_images=24, image_size=SIZE, seed=3)
    table = pd.read_csv(root / "labels.csv", dtype=str)
    words = pd.read_csv(root / "label-map.csv", dtype=str)
    mapping = {f.lower(): t for f, t in zip(words["from"], words["to"], strict=True)}
    src = load_source("csv", root, verify_images=True)
    assert src.report.n_kept == len(table) == 24 and not src.report.skipped
    meta = src.meta.set_index("image_id")
    for row in table.itertuples():
        want = mapping.get(row.label.lower(), row.label.lower())
        assert meta.loc[row.image, "label_name"] == want
        assert HAM_CLASSES[int(meta.loc[row.image, "label"])] == want
        assert meta.loc[row.image, "group_id"] == row.group
        assert meta.loc[row.image, "source_split"] == row.split
        assert meta.loc[row.image, "source_site"] == "hospital-a"
    suffixes = {Path(i).suffix for i in src.meta["image_id"]}
    assert suffixes == {".jpg", ".png", ".dcm"}
    for suffix in suffixes:
        image_id = next(i for i in src.meta["image_id"] if i.endswith(suffix))
        arr = src.read_image(image_id)
        assert arr.dtype == np.uint8 and arr.shape == (SIZE, SIZE, 3), suffix


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_grey_dicom_reads_as_rgb(tmp_path: Path, photometric: str) -> None:
    root = _export(tmp_path / "export", "a.jpg,nv,,\nscan.dcm,mel,,\n")
    _mono_dicom(root / "scan.dcm", photometric)
    src = load_source("csv", root, verify_images=True)
    arr = src.read_image("scan.dcm")
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all()
    assert src.meta.set_index("image_id").loc["scan.dcm", "group_id"] == "scan.dcm"  # default


def test_csv_is_a_ham_classed_format() -> None:
    from common.config import RunConfig
    from common.data.site_data import classes_for

    assert classes_for("csv") == HAM_CLASSES
    run = RunConfig.from_mapping({"data-format": "csv", "data-path": "/data/export"})
    assert run.data_format == "csv"


# ----------------------------------------------------------------- one-site manifests


def test_one_site_keeps_the_exports_split_and_groups(tmp_path: Path) -> None:
    root = synthesize("csv", tmp_path / "export", n_images=60, image_size=SIZE, seed=1)
    src = load_source("csv", root)
    man = one_site(src.meta, "hospital-a", classes=src.classes)
    assert set(man["site"]) == {"hospital-a"} and len(man) == 60
    given = src.meta.set_index("image_id")["source_split"]
    assert (man.set_index("image_id")["split"] == given.reindex(man["image_id"])).all()
    assert (man.groupby("group_id")["split"].nunique() == 1).all()


def test_one_site_without_a_split_is_group_safe(tmp_path: Path) -> None:
    root = synthesize("csv", tmp_path / "export", n_images=60, image_size=SIZE, seed=2)
    table = pd.read_csv(root / "labels.csv", dtype=str)
    table.drop(columns="split").to_csv(root / "labels.csv", index=False)
    src = load_source("csv", root)
    man = one_site(src.meta, "hospital-a", classes=src.classes, seed=4)
    assert set(man["split"]) == set(SPLITS)
    assert (man.groupby("group_id")["split"].nunique() == 1).all()
    assert man.equals(one_site(src.meta, "hospital-a", classes=src.classes, seed=4))
    # some rows with a split and some without: refused, not half kept
    table.loc[0, "split"] = ""
    table.to_csv(root / "labels.csv", index=False)
    with pytest.raises(DataError, match="have no split in the export"):
        one_site(load_source("csv", root).meta, "hospital-a", classes=src.classes)
    with pytest.raises(DataError, match="site name"):
        one_site(src.meta, "../evil", classes=src.classes)


def test_one_site_makes_a_missing_held_out_split_from_train(tmp_path: Path) -> None:
    root = synthesize("csv", tmp_path / "export", n_images=60, image_size=SIZE, seed=5)
    table = pd.read_csv(root / "labels.csv", dtype=str)
    table["split"] = table["split"].replace({"validation": "train"})
    table.to_csv(root / "labels.csv", index=False)
    src = load_source("csv", root)
    man = one_site(src.meta, "h", classes=src.classes).set_index("image_id")
    given = src.meta.set_index("image_id")["source_split"]
    test = given[given == "test"].index
    assert (man.loc[test, "split"] == "test").all()  # the export's test split is untouched
    assert (man["split"] == "validation").any()
    assert set(man.loc[man["split"] == "validation"].index) <= set(given[given == "train"].index)
    assert (man.groupby("group_id")["split"].nunique() == 1).all()


def test_partition_cli_one_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.cli import app

    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    root = synthesize("csv", tmp_path / "export", n_images=60, image_size=SIZE, seed=1)
    out = tmp_path / "site.csv"
    wide = {"COLUMNS": "250"}
    args = ["partition", "csv", "--data-path", str(root), "--site", "hospital-a", "--out"]
    result = CliRunner().invoke(app, [*args, str(out)], env=wide)
    assert result.exit_code == 0, result.output
    man = read_manifest(out)
    assert set(man["site"]) == {"hospital-a"}
    assert "fedskin simulate --run-config" in result.output
    assert f"manifest='{out.resolve()}'" in result.output
    assert "site='hospital-a'" in result.output
    refused = CliRunner().invoke(app, [*args, str(out), "--scheme", "iid"], env=wide)
    assert refused.exit_code != 0
    # existing schemes unchanged; one site by num_sites still points to --site
    one = CliRunner().invoke(
        app,
        ["partition", "csv", "--data-path", str(root), "--scheme", "iid", "--num-sites", "1"],
        env=wide,
    )
    assert one.exit_code == 1 and "--site NAME" in one.output
