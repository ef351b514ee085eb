"""A hospital's export joins a federation of other sources: ``fedskin partition --join``.

`fedskin partition` records where each site's images are (``data_format``, ``data_path``);
``--join`` adds the sites of manifests written before, and a simulation reads every site from
its own source. Attacks first, each one line naming the file and row: a manifest row pointing
outside its data folder, a relabelled row, a site name (or image) in two manifests, a class
the run does not have, a run's data-path without a joined site's images. Then the joined manifest
loads each site from its own source. (The joined federation trained and scored by `fedskin
evaluate`: tests/test_evaluate.py, whose module run is the README's joined federation.)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from common.config import RunConfig
from common.data.partition import read_manifest, with_source
from common.data.site_data import load_site
from common.data.sources import load_source
from common.data.synth import synthesize
from simulations.cli import app

SIZE = 16
WIDE = {"COLUMNS": "3000"}
_JOIN = ["partition", "csv", "--data-path"]  # the console's error line is not wrapped


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small HAM10000 download (two iid sites, sites.csv) and a hospital's mixed export."""
    root = tmp_path_factory.mktemp("join")
    ham = synthesize("ham-dataverse", root / "ham", n_images=120, image_size=SIZE, seed=0)
    export = synthesize("csv", root / "export", n_images=45, image_size=SIZE, seed=1)
    isic = synthesize("isic2020", root / "isic", n_images=80, image_size=SIZE, seed=2)
    sites, isic_sites = root / "sites.csv", root / "isic-sites.csv"
    two = ["--scheme", "iid", "--num-sites", "2", "--out"]
    _ok("partition", "ham-dataverse", "--data-path", str(ham), *two, str(sites))
    _ok(
        "partition",
        "isic2020",
        "--data-path",
        str(isic),
        "--site",
        "isic-a",
        "--out",
        str(isic_sites),
    )
    site = root / "site.csv"
    _ok("partition", "csv", "--data-path", str(export), "--site", "hospital-a", "--out", str(site))
    joined = [*_JOIN, str(export), "--site", "hospital-a", "--join", str(sites), "--out"]
    printed = _ok(*joined, str(root / "federation.csv"))
    (root / "printed.txt").write_text(printed)
    return {
        "root": root,
        "ham": ham,
        "export": export,
        "sites": sites,
        "isic": isic_sites,
        "site": site,
    }


def _fedskin(*args: str):
    return CliRunner().invoke(app, list(args), env=WIDE)


def _ok(*args: str) -> str:
    result = _fedskin(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _error_line(result, code: int) -> str:
    """The one error line of a refused command (no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    return line


def _join(world: dict[str, Path], site: str, *joined: Path, out: str = "fed.csv"):
    args = ["partition", "csv", "--data-path", str(world["export"]), "--site", site]
    for path in joined:
        args += ["--join", str(path)]
    return _fedskin(*args, "--out", str(world["root"] / out))


def _edited(world: dict[str, Path], source: Path, name: str, row: int, **values: str) -> Path:
    """A copy of manifest ``source`` with some cells of data row ``row`` changed."""
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    for column, value in values.items():
        table.loc[row, column] = value
    path = world["root"] / name
    table.to_csv(path, index=False, lineterminator="\n")
    return path


def _simulate(run_config: str):
    return _fedskin("simulate", "--run-config", f"{run_config} num-server-rounds=1")


# ----------------------------------------------------------------- attacks


def test_a_manifest_row_pointing_outside_its_data_folder_is_refused(world):
    outside = world["root"] / "outside.png"  # a real image, beside (not in) the export
    outside.write_bytes((world["export"] / "images" / "case-00001.png").read_bytes())
    bad = _edited(world, world["site"], "outside.csv", 0, image_id="../outside.png")

    line = _error_line(_simulate(f"manifest='{bad}' data-format='csv'"), 2)

    assert "outside.csv" in line and "line 2: ../outside.png" in line, line
    assert "not in the csv data" in line


def test_a_relabelled_manifest_row_is_refused(world):
    table = read_manifest(world["site"])
    other = "mel" if table.loc[0, "label_name"] != "mel" else "nv"
    bad = _edited(
        world,
        world["site"],
        "relabelled.csv",
        0,
        label=str(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"].index(other)),
        label_name=other,
    )

    line = _error_line(_simulate(f"manifest='{bad}' data-format='csv'"), 2)

    assert "relabelled.csv" in line and "label differs" in line and "line 2:" in line, line


def test_a_site_name_in_two_manifests_is_refused(world):
    taken = read_manifest(world["sites"])["site"].iloc[0]

    line = _error_line(_join(world, taken, world["sites"]), 1)

    assert (
        str(world["sites"]) in line and f"site name [{taken!r}] already in the federation" in line
    ), line
    assert f"site {taken}" in line


def test_an_image_in_two_manifests_is_refused(world):
    """The same images joined under another site name (a copy of a manifest renamed)."""
    renamed = _edited(world, world["site"], "copy.csv", 0)  # hospital-a's rows...
    table = pd.read_csv(renamed, dtype=str, keep_default_na=False)
    table["site"] = "hospital-b"  # ...under a new name
    table.to_csv(renamed, index=False, lineterminator="\n")

    line = _error_line(_join(world, "hospital-a", renamed), 1)

    assert "copy.csv" in line and "image ['images/case-00000.jpg'" in line and "line 2:" in line, (
        line
    )


def test_a_class_the_federation_does_not_have_is_refused(world):
    other_format = _error_line(_join(world, "hospital-a", world["isic"]), 1)
    assert "isic-sites.csv" in other_format and "benign" in other_format, other_format
    assert "akiec" in other_format  # both class lists named

    foreign = _edited(world, world["sites"], "foreign.csv", 3, label="7", label_name="scc")
    row = _error_line(_join(world, "hospital-a", foreign), 1)
    assert "foreign.csv" in row and "class ['scc'] is not one of the federation's" in row, row
    assert "line 5:" in row, row

    run = _error_line(_simulate(f"manifest='{world['site']}' data-format='isic2020'"), 2)
    assert "site.csv" in run and "hospital-a's csv data has classes" in run, run


def test_a_data_path_other_than_a_sites_recorded_folder_is_refused(world):
    """A run naming a data-path reads every site from it: a joined manifest's other sites
    are not there (one line, and the hint to leave data-path out)."""
    fed = world["root"] / "federation.csv"
    run = f"manifest='{fed}' data-format='csv' data-path='{world['export']}'"

    line = _error_line(_simulate(run), 2)

    assert "federation.csv" in line and "not in the csv data" in line, line
    assert "leave data-path out" in line and "site site" in line, line


def test_a_manifest_without_its_sources_cannot_be_joined(world):
    bare = world["root"] / "bare.csv"
    read_manifest(world["sites"]).drop(columns=["data_format", "data_path"]).to_csv(
        bare, index=False
    )
    line = _error_line(_join(world, "hospital-a", bare), 1)
    assert "bare.csv" in line and "records no data source" in line, line


# ----------------------------------------------------------------- the joined manifest


def test_joined_sites_each_read_their_own_source(world, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    printed = (world["root"] / "printed.txt").read_text()
    fed = read_manifest(world["root"] / "federation.csv")

    ham_sites = sorted(set(read_manifest(world["sites"])["site"]))
    assert sorted(set(fed["site"])) == sorted(["hospital-a", *ham_sites])
    source = fed.drop_duplicates("site").set_index("site")
    assert source.loc["hospital-a", "data_format"] == "csv"
    assert Path(source.loc["hospital-a", "data_path"]) == world["export"].resolve()
    assert set(source.loc[ham_sites, "data_format"]) == {"ham-dataverse"}
    # the next command needs no data-path: the manifest says where each site's images are
    nxt = next(ln.strip() for ln in printed.splitlines() if ln.strip().startswith("fedskin "))
    assert "data-path" not in nxt and "federation.csv" in nxt, nxt

    run = RunConfig.from_mapping(
        {"manifest": str(world["root"] / "federation.csv"), "image-size": SIZE}
    )
    export = load_source("csv", world["export"]).meta.set_index("image_id")
    hospital = load_site(run, {"site": "hospital-a"})
    rows = fed[fed["site"] == "hospital-a"]
    for split in ("train", "validation", "test"):
        part = rows[rows["split"] == split]
        assert hospital.n(split) == len(part)
        assert hospital.labels[split].tolist() == export.loc[part["image_id"], "label"].tolist()
    kinds = {Path(i).suffix for i in rows["image_id"]}
    assert kinds == {".jpg", ".png", ".dcm"}  # JPEG, PNG and pydicom-written DICOM
    first = load_site(run, {"site": ham_sites[0]})
    assert first.n("train") == int(
        ((fed["site"] == ham_sites[0]) & (fed["split"] == "train")).sum()
    )


def test_a_recorded_source_is_absolute_and_a_hub_id_kept(world, monkeypatch):
    """The manifest may be read from another folder: a local data path is recorded
    absolute; a path that is nothing here (ham-hf's hub id) is kept as given."""
    monkeypatch.chdir(world["root"])
    table = read_manifest(world["site"])
    assert with_source(table, "csv", "export")["data_path"].iloc[0] == str(world["export"])
    hub = with_source(table, "ham-hf", "marmal88/skin_cancer")
    assert set(hub["data_path"]) == {"marmal88/skin_cancer"}
