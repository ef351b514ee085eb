"""Site partitioning: no leakage, determinism, clear errors, real heterogeneity."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import RunConfig
from common.data.institutions import PROFILES, assign_institutions, group_table
from common.data.partition import (
    MANIFEST_COLUMNS,
    partition,
    read_manifest,
    write_manifest,
)
from common.data.schema import COLUMNS, HAM_CLASSES, DataError
from common.data.site_data import ensure_manifest
from simulations.data_cli import plot_sites, site_table

# HAM10000 overall class frequencies (Tschandl et al. 2018) and rough per-class mean ages.
_HAM_P = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
_AGE = {"akiec": 67, "bcc": 66, "bkl": 60, "df": 52, "mel": 60, "nv": 45, "vasc": 50}
_SITES = ["head/neck", "trunk", "back", "upper extremity", "lower extremity", "face", "unknown"]
_SOURCES = ["vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"]


def make_meta(
    n_groups: int = 700, seed: int = 0, classes: list[str] = HAM_CLASSES, with_sites: bool = True
) -> pd.DataFrame:
    """A realistic normalised frame: 1-4 images per lesion, skewed labels, ages by diagnosis."""
    rng = np.random.default_rng(seed)
    p = np.array([_HAM_P.get(c, 100) for c in classes], dtype=float)
    labels = rng.choice(len(classes), size=n_groups, p=p / p.sum())
    rows = []
    for g, k in enumerate(labels):
        name = classes[k]
        age = float(np.clip(round(rng.normal(_AGE.get(name, 55), 12) / 5) * 5, 5, 85))
        if rng.random() < 0.03:
            age = np.nan
        sex = str(rng.choice(["male", "female", "unknown"], p=[0.52, 0.45, 0.03]))
        site = str(rng.choice(_SITES))
        dx = "follow_up" if name == "nv" and rng.random() < 0.6 else "histo"
        src = _SOURCES[int(rng.integers(len(_SOURCES)))] if with_sites else ""
        for i in range(int(rng.geometric(0.6)) if rng.random() < 0.5 else 1):
            rows.append(
                {
                    "image_id": f"ISIC_{g:05d}{i}",
                    "group_id": f"HAM_{g:05d}",
                    "label": int(k),
                    "label_name": name,
                    "age": age,
                    "sex": sex,
                    "anatom_site": site,
                    "dx_type": dx,
                    "source_site": src,
                    "source_split": "",
                }
            )
    meta = pd.DataFrame(rows, columns=COLUMNS)
    return meta.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # order must not matter


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return make_meta(seed=20)


SCHEMES = [
    ("natural", {}),
    ("institutions", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("dirichlet", {"alpha": 10.0}),
    ("iid", {}),
]
IDS = ["natural", "institutions", "dirichlet-0.3", "dirichlet-10", "iid"]


def _tv_between_sites(manifest: pd.DataFrame, n_classes: int) -> float:
    """Mean total-variation distance between every pair of sites' label distributions."""
    dist = pd.crosstab(manifest["site"], manifest["label"], normalize="index")
    dist = dist.reindex(columns=range(n_classes), fill_value=0.0).to_numpy()
    pairs = itertools.combinations(range(len(dist)), 2)
    return float(np.mean([0.5 * np.abs(dist[i] - dist[j]).sum() for i, j in pairs]))


@pytest.mark.parametrize(("scheme", "kw"), SCHEMES, ids=IDS)
def test_no_leakage_every_image_once(meta: pd.DataFrame, scheme: str, kw: dict) -> None:
    man = partition(meta, scheme, classes=HAM_CLASSES, seed=1, **kw)
    assert list(man.columns) == MANIFEST_COLUMNS
    assert sorted(man["image_id"]) == sorted(meta["image_id"])
    assert man["image_id"].is_unique
    assert (man.groupby("group_id")["site"].nunique() == 1).all()
    assert (man.groupby("group_id")["split"].nunique() == 1).all()
    assert set(man["split"]) == {"train", "validation", "test"}
    per_site = man.groupby("site")["split"].value_counts().unstack(fill_value=0)
    assert (per_site[["train", "validation", "test"]] > 0).all().all()
    # fractions roughly as asked (they are of groups, images follow)
    frac = man["split"].value_counts(normalize=True)
    assert 0.08 < frac["test"] < 0.25 and 0.08 < frac["validation"] < 0.25
    # labels carried through unchanged
    joined = man.merge(meta, on="image_id", suffixes=("", "_m"))
    assert (joined["label"] == joined["label_m"]).all()
    assert (joined["group_id"] == joined["group_id_m"]).all()


@pytest.mark.parametrize(("scheme", "kw"), SCHEMES, ids=IDS)
def test_same_seed_same_bytes_other_seed_differs(
    meta: pd.DataFrame, scheme: str, kw: dict, tmp_path: Path
) -> None:
    a = write_manifest(
        partition(meta, scheme, classes=HAM_CLASSES, seed=3, **kw), tmp_path / "a.csv"
    )
    shuffled = meta.sample(frac=1.0, random_state=99)
    b = write_manifest(
        partition(shuffled, scheme, classes=HAM_CLASSES, seed=3, **kw), tmp_path / "b.csv"
    )
    c = write_manifest(
        partition(meta, scheme, classes=HAM_CLASSES, seed=4, **kw), tmp_path / "c.csv"
    )
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    back = read_manifest(a)
    assert back["label"].dtype.kind == "i"
    pd.testing.assert_frame_equal(
        back, partition(meta, scheme, classes=HAM_CLASSES, seed=3, **kw), check_dtype=False
    )


def test_natural_uses_recorded_sites(meta: pd.DataFrame) -> None:
    man = partition(meta, "natural", classes=HAM_CLASSES)
    assert set(man["site"]) == set(_SOURCES)
    src = meta.set_index("image_id")["source_site"]
    assert (man["site"].to_numpy() == src.reindex(man["image_id"]).to_numpy()).all()


def test_natural_without_sites_is_clear_error() -> None:
    with pytest.raises(DataError, match="records no site; use scheme=institutions"):
        partition(make_meta(200, with_sites=False), "natural", classes=HAM_CLASSES)


def test_natural_partly_missing_sites_names_rows(meta: pd.DataFrame) -> None:
    m = meta.copy()
    m.loc[[3, 7], "source_site"] = ""
    with pytest.raises(DataError, match=r"2 of \d+ images have no source_site") as e:
        partition(m, "natural", classes=HAM_CLASSES)
    assert m.loc[3, "image_id"] in str(e.value) or m.loc[7, "image_id"] in str(e.value)


def _span_two_sources(meta: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Like HAM10000 (9 lesions in two ``dataset`` values): a few lesions at two sources.

    Returns the edited frame and, per edited lesion, the site the rule must choose.
    """
    m = meta.copy()
    size = m["group_id"].value_counts().sort_index()
    three = size[size == 3].index[:2].tolist()
    two = size[size == 2].index[:2].tolist()
    plan = {  # group: recorded sources in image_id order -> expected site
        three[0]: (["rosendahl", "vienna_dias", "vienna_dias"], "vienna_dias"),  # majority wins
        three[1]: (["vidir_modern", "vidir_modern", "rosendahl"], "vidir_modern"),
        two[0]: (["vienna_dias", "rosendahl"], "rosendahl"),  # tie: alphabetically first
        two[1]: (["vidir_molemax", "vidir_modern"], "vidir_modern"),  # tie ('d' < 'l')
    }
    for g, (sources, _) in plan.items():
        idx = m[m["group_id"] == g].sort_values("image_id").index
        m.loc[idx, "source_site"] = sources
    return m, {g: site for g, (_, site) in plan.items()}


def test_natural_group_at_two_sites_kept_whole_at_its_main_source(meta: pd.DataFrame) -> None:
    m, expected = _span_two_sources(meta)
    man = partition(m, "natural", classes=HAM_CLASSES)
    assert sorted(man["image_id"]) == sorted(m["image_id"])
    assert (man.groupby("group_id")["site"].nunique() == 1).all()
    site_of = man.drop_duplicates("group_id").set_index("group_id")["site"]
    assert {g: site_of[g] for g in expected} == expected
    recorded = m.set_index("image_id")["source_site"]
    kept = ~man["group_id"].isin(expected)  # every other lesion stays where it was recorded
    assert (man.loc[kept, "site"].to_numpy() == recorded[man.loc[kept, "image_id"]]).all()
    moved = pd.DataFrame(man.attrs["moved"])
    want = man[man["site"].to_numpy() != recorded[man["image_id"]].to_numpy()]
    assert sorted(moved["image_id"]) == sorted(want["image_id"])
    assert (moved["to_site"] == moved["group_id"].map(expected)).all()
    assert (moved["from_site"] == moved["image_id"].map(recorded)).all()
    note = man.attrs["notes"][0]
    assert note == man.attrs["moves_note"]
    assert note.startswith("4 groups (lesion or patient) recorded at two sources")
    assert f": {len(moved)} images moved (" in note
    for g, site in expected.items():
        assert f"{g}: " in note and f"-> {site} (" in note
    # same rule whatever the row order
    again = partition(m.sample(frac=1.0, random_state=5), "natural", classes=HAM_CLASSES)
    pd.testing.assert_frame_equal(man, again)
    assert again.attrs["moved"] == man.attrs["moved"]


def test_natural_without_split_groups_moves_nothing(meta: pd.DataFrame, tmp_path: Path) -> None:
    from common.data.partition import moves_report_path, write_moves_report

    man = partition(meta, "natural", classes=HAM_CLASSES)
    assert man.attrs["moved"] == [] and not any("kept whole" in n for n in man.attrs["notes"])
    stale = moves_report_path(tmp_path / "m.csv")
    stale.write_text("{}")
    assert write_moves_report(man, tmp_path / "m.csv") is None and not stale.exists()


@pytest.mark.parametrize(
    ("scheme", "kw", "site"),
    [
        ("natural", {}, "tiny_clinic"),
        ("iid", {"num_sites": 60}, "site"),
        ("institutions", {}, "mskcc"),  # the smallest ISIC contributor (FLamby: 819 images)
    ],
)
def test_too_small_site_names_it(meta: pd.DataFrame, scheme: str, kw: dict, site: str) -> None:
    m = meta.copy()
    if scheme == "natural":
        small = m["group_id"].isin(m["group_id"].drop_duplicates().iloc[:4])
        m.loc[small, "source_site"] = "tiny_clinic"
    mins = {"institutions": 90}.get(scheme, 20)
    with pytest.raises(DataError, match=rf"{site}\w*: \d+ images") as e:
        partition(m, scheme, classes=HAM_CLASSES, min_site_images=mins, **kw)
    assert "min_site_images" in str(e.value)


def test_site_with_too_few_groups_for_three_splits(meta: pd.DataFrame) -> None:
    m = meta.copy()
    big = m["group_id"].value_counts().index[:2]  # two groups cannot fill three splits
    m.loc[m["group_id"].isin(big), "source_site"] = "two_lesions"
    with pytest.raises(DataError, match=r"two_lesions.*2 groups"):
        partition(m, "natural", classes=HAM_CLASSES, min_site_images=1)
    three = m["group_id"].value_counts().index[2:5]  # 3 groups, but fractions leave one empty
    m.loc[m["group_id"].isin(big), "source_site"] = "vidir_modern"
    m.loc[m["group_id"].isin(three), "source_site"] = "three_lesions"
    with pytest.raises(DataError, match=r"three_lesions.*3 groups.*test_frac=0.5"):
        partition(
            m, "natural", classes=HAM_CLASSES, min_site_images=1, val_frac=0.45, test_frac=0.5
        )


def test_dirichlet_small_alpha_more_skewed(meta: pd.DataFrame) -> None:
    tv = {
        a: np.mean(
            [
                _tv_between_sites(
                    partition(meta, "dirichlet", classes=HAM_CLASSES, alpha=a, seed=s), 7
                )
                for s in range(3)
            ]
        )
        for a in (0.3, 100.0)
    }
    assert tv[0.3] > 2 * tv[100.0]
    assert tv[0.3] > 0.25


def test_institutions_are_heterogeneous(meta: pd.DataFrame) -> None:
    inst = partition(meta, "institutions", classes=HAM_CLASSES, seed=0)
    iid = partition(meta, "iid", classes=HAM_CLASSES, num_sites=inst["site"].nunique(), seed=0)
    assert set(inst["site"]) == set(PROFILES)
    tv_inst, tv_iid = _tv_between_sites(inst, 7), _tv_between_sites(iid, 7)
    assert tv_inst > 2.5 * tv_iid, (tv_inst, tv_iid)
    ages = meta.set_index("image_id")["age"]
    mean_age = ages.reindex(inst["image_id"]).groupby(inst["site"].to_numpy()).mean()
    assert mean_age.max() - mean_age.min() > 8, mean_age
    assert mean_age["athens"] < mean_age["queensland"]  # young Mediterranean vs high-UV older
    share = pd.crosstab(inst["site"], inst["label_name"], normalize="index")
    assert share.loc["vienna", "nv"] > share.loc["queensland", "nv"]  # follow-up nevus clinic
    akiec_bcc = share[["akiec", "bcc"]].sum(axis=1)
    assert akiec_bcc["queensland"] > akiec_bcc["athens"]  # keratinocyte cancers under high UV


def test_institutions_subset_and_determinism(meta: pd.DataFrame) -> None:
    man = partition(
        meta, "institutions", classes=HAM_CLASSES, institutions=["vienna", "queensland", "mia"]
    )
    assert set(man["site"]) == {"vienna", "queensland", "mia"}
    a = assign_institutions(meta, HAM_CLASSES, "athens,barcelona", seed=5)
    b = assign_institutions(meta.iloc[::-1], HAM_CLASSES, ["athens", "barcelona"], seed=5)
    assert (a == b.reindex(a.index)).all()
    assert set(a) == {"athens", "barcelona"}
    with pytest.raises(DataError, match="unknown institution.*'oslo'"):
        partition(meta, "institutions", classes=HAM_CLASSES, institutions=["vienna", "oslo"])


@pytest.mark.parametrize(
    ("classes", "sick"),
    [
        (["benign", "malignant"], "malignant"),
        (["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"], "MEL"),
    ],
)
def test_institutions_on_other_class_lists(classes: list[str], sick: str) -> None:
    m = make_meta(600, seed=2, classes=classes, with_sites=False)
    man = partition(m, "institutions", classes=classes, institutions=["mia", "athens", "vienna"])
    share = pd.crosstab(man["site"], man["label_name"], normalize="index")[sick]
    assert share["mia"] > share["athens"]  # melanoma referral centre


def test_group_label_is_most_severe() -> None:
    m = make_meta(5, with_sites=False)
    m = m.assign(group_id="P1")
    m["label"] = [5] * (len(m) - 1) + [4]  # many nevi, one melanoma
    assert group_table(m, HAM_CLASSES).loc["P1", "label"] == 4


def test_read_manifest_rejects_group_in_two_splits(meta: pd.DataFrame, tmp_path: Path) -> None:
    path = write_manifest(partition(meta, "iid", classes=HAM_CLASSES), tmp_path / "m.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    g = df["group_id"].value_counts().index[0]
    rows = df.index[df["group_id"] == g]
    df.loc[rows[0], "split"] = "test" if df.loc[rows[0], "split"] != "test" else "train"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="group in two splits") as e:
        read_manifest(path)
    assert str(path) in str(e.value) and df.loc[rows[0], "image_id"] in str(e.value)
    assert f"line {rows[0] + 2}" in str(e.value)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: d.drop(columns="site"), r"missing column\(s\) \['site'\]"),
        (lambda d: pd.concat([d, d.iloc[[0]]]), "duplicated image_id"),
        (lambda d: d.assign(split=d["split"].replace("validation", "val")), "unknown split.*'val'"),
        (lambda d: d.assign(site=np.where(d.index == 0, "elsewhere", d["site"])), None),
    ],
    ids=["missing-column", "duplicate", "bad-split", "group-two-sites"],
)
def test_read_manifest_rejects_tampering(
    meta: pd.DataFrame, tmp_path: Path, tamper, message: str | None
) -> None:
    path = write_manifest(partition(meta, "natural", classes=HAM_CLASSES), tmp_path / "m.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if message is None:  # move one image of a multi-image group to another site
        g = df["group_id"].value_counts().index[0]
        first = df.index[df["group_id"] == g][0]
        df = df.assign(site=np.where(df.index == first, "elsewhere", df["site"]))
        message = "group in two sites"
    else:
        df = tamper(df)
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as e:
        read_manifest(path)
    assert str(path) in str(e.value)


def test_bad_input_errors(meta: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="unknown scheme"):
        partition(meta, "random", classes=HAM_CLASSES)
    with pytest.raises(DataError, match="label outside 0..6"):
        partition(meta.assign(label=meta["label"] + 3), "iid", classes=HAM_CLASSES)
    with pytest.raises(DataError, match="duplicated image_id"):
        partition(pd.concat([meta, meta.iloc[:2]]), "iid", classes=HAM_CLASSES)


def test_site_table_and_plot(meta: pd.DataFrame, tmp_path: Path) -> None:
    from rich.console import Console

    man = partition(meta, "institutions", classes=HAM_CLASSES)
    console = Console(record=True, width=200)
    console.print(site_table(man, HAM_CLASSES, meta=meta))
    text = console.export_text()
    assert "queensland" in text and " age" in text and str(len(man)) in text
    png = plot_sites(man, HAM_CLASSES, tmp_path / "sites.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ------------------------------------------------------------ real loaded synthetic sources
def _check(man: pd.DataFrame, meta: pd.DataFrame) -> None:
    assert sorted(man["image_id"]) == sorted(meta["image_id"].astype(str))
    assert (man.groupby("group_id")[["site", "split"]].nunique() == 1).all().all()
    assert (man.groupby("site")["split"].nunique() == 3).all()


def test_real_ham_dataverse_all_schemes(synth_ham_dataverse: Path) -> None:
    from common.data.sources import load_source

    src = load_source("ham-dataverse", synth_ham_dataverse)
    natural = partition(src.meta, "natural", classes=src.classes, min_site_images=10)
    assert set(natural["site"]) == set(src.meta["source_site"])  # HAM `dataset` values
    _check(natural, src.meta)
    for scheme, kw in [
        ("institutions", {"institutions": ["vienna", "queensland", "barcelona"]}),
        ("dirichlet", {"num_sites": 3, "alpha": 1.0}),
        ("iid", {"num_sites": 3}),
    ]:
        _check(partition(src.meta, scheme, classes=src.classes, min_site_images=10, **kw), src.meta)


def test_real_ham_hf_has_no_sites(synth_ham_hf: Path) -> None:
    from common.data.sources import load_source

    src = load_source("ham-hf", synth_ham_hf)
    with pytest.raises(DataError, match="records no site"):
        partition(src.meta, "natural", classes=src.classes)
    man = partition(
        src.meta, "institutions", classes=src.classes, institutions=["vienna", "barcelona"]
    )
    _check(man, src.meta)


def test_real_fedisic2019_natural_centres(synth_fedisic2019: Path) -> None:
    from common.data.sources import load_source

    src = load_source("fedisic2019", synth_fedisic2019)
    man = partition(src.meta, "natural", classes=src.classes, min_site_images=5)
    _check(man, src.meta)
    assert man["site"].nunique() == src.meta["source_site"].nunique() >= 2
    with pytest.raises(DataError, match="min_site_images=1000"):
        partition(src.meta, "natural", classes=src.classes, min_site_images=1000)


def test_real_isic2020(synth_isic2020: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Patients are the groups: few patients per DICOM institution is a clear error."""
    from common.data.sources import load_source
    from common.data.synth import synthesize

    src = load_source("isic2020", synth_isic2020)
    if src.meta["source_site"].nunique() > 1:
        with pytest.raises(DataError, match=r"site '.+' has \d+ images in \d+ groups"):
            partition(src.meta, "natural", classes=src.classes, min_site_images=1)
    path = synthesize(
        "isic2020", tmp_path_factory.mktemp("isic") / "d", n_images=300, image_size=8, dicom=False
    )
    big = load_source("isic2020", path)
    for scheme, kw in [
        ("institutions", {"institutions": ["barcelona", "athens"]}),
        ("iid", {"num_sites": 2}),
    ]:
        man = partition(big.meta, scheme, classes=big.classes, min_site_images=10, **kw)
        _check(man, big.meta)
        assert man["group_id"].nunique() == big.meta["group_id"].nunique()


def test_cli_writes_manifest_and_plot(synth_ham_dataverse: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from simulations.data_cli import partition_cli

    app = typer.Typer()
    app.command()(partition_cli)
    out = tmp_path / "run" / "sites.csv"
    args = ["ham-dataverse", "--data-path", str(synth_ham_dataverse), "--scheme", "institutions"]
    args += ["--institutions", "vienna,queensland", "--min-site-images", "10", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "queensland" in res.output and str(out) in res.output.replace("\n", "")
    assert set(read_manifest(out)["site"]) == {"vienna", "queensland"}
    assert out.with_suffix(".png").stat().st_size > 5000
    bad = CliRunner().invoke(
        app,
        [
            "ham-dataverse",
            "--data-path",
            str(synth_ham_dataverse),
            "--scheme",
            "institutions",
            "--institutions",
            "oslo,vienna",
        ],
    )
    assert bad.exit_code == 1 and "unknown institution" in bad.output


def test_cli_partitions_the_builtin_set_without_a_data_path(
    synth_ham_dataverse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedskin partition synth-ham` (no --data-path) partitions the built-in data; misuse of
    it, or an unknown format, is one line (exit 1), not a traceback."""
    import typer
    from typer.testing import CliRunner

    from common.data import synth
    from simulations.data_cli import partition_cli

    made: list[str] = []

    def builtin(fmt: str, n_images: int, image_size: int) -> Path:
        made.append(fmt)
        return synth_ham_dataverse  # stands in for the 1500-image set (same layout)

    monkeypatch.setattr(synth, "ensure_builtin", builtin)
    app = typer.Typer()
    app.command()(partition_cli)
    out = tmp_path / "sites.csv"
    args = ["--min-site-images", "10", "--out", str(out)]
    res = CliRunner().invoke(app, ["synth-ham", *args])
    assert res.exit_code == 0, res.output
    assert made == ["ham-dataverse"] and len(read_manifest(out)) == 160
    for bad_args, says in (
        (["synth-ham", "--data-path", str(tmp_path)], "takes no data path"),
        (["nonsense"], "unknown data format"),
    ):
        bad = CliRunner().invoke(app, [*bad_args, *args])
        assert bad.exit_code == 1 and says in bad.output, bad.output
        assert bad.exception is None or isinstance(bad.exception, SystemExit)


@pytest.fixture(scope="module")
def ham_split_lesions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, dict]:
    """Real Dataverse layout where 3 lesions have images in two ``dataset`` values.

    Returns (folder, the second source per lesion, the site the rule must choose per lesion,
    {image_id: (lesion, from, to)} of the images that must move). Read-only once written.
    """
    from common.data.synth import synthesize

    data = synthesize(
        "ham-dataverse", tmp_path_factory.mktemp("split") / "ham", n_images=400, image_size=16
    )
    csv = data / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    size = df["lesion_id"].value_counts().sort_index()
    first = {
        src: size[size.index.isin(df.loc[df["dataset"] == src, "lesion_id"])]
        for src in ("vidir_modern", "rosendahl")
    }
    big = first["vidir_modern"][first["vidir_modern"] >= 3].index[0]  # majority stays
    tie_a = first["rosendahl"][first["rosendahl"] == 2].index[0]  # 1 + 1: alphabetical
    tie_b = first["vidir_modern"][first["vidir_modern"] == 2].index[0]
    other = {big: "vidir_molemax", tie_a: "vienna_dias", tie_b: "vidir_molemax"}
    expected = {big: "vidir_modern", tie_a: "rosendahl", tie_b: "vidir_modern"}
    moved_ids = {}
    for lesion, src in other.items():
        row = df.index[df["lesion_id"] == lesion][-1]
        df.loc[row, "dataset"] = src
        moved_ids[df.loc[row, "image_id"]] = (lesion, src, expected[lesion])
    df.to_csv(csv, index=False, lineterminator="\n")
    return data, other, expected, moved_ids


def test_cli_natural_keeps_lesions_at_two_sources_whole(
    ham_split_lesions: tuple[Path, dict, dict, dict], tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from simulations.cli import app

    data, other, expected, moved_ids = ham_split_lesions
    out = tmp_path / "run" / "sites.csv"
    args = ["partition", "ham-dataverse", "--data-path", str(data), "--scheme", "natural"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "note: 3 groups (lesion or patient) recorded at two sources were each kept whole" in text
    assert "3 images moved (" in text
    assert all(f"{g}: {other[g]} -> {site} (1 of" in text for g, site in expected.items())
    report = out.with_name("sites.moves.json")
    assert f"moves:{report}" in "".join(res.output.split())

    man = read_manifest(out)
    assert (man.groupby("group_id")["site"].nunique() == 1).all()
    site_of = man.drop_duplicates("group_id").set_index("group_id")["site"]
    assert {g: site_of[g] for g in expected} == expected
    doc = json.loads(report.read_text())
    assert doc["n_groups"] == 3 and doc["n_images"] == 3 and "alphabetically first" in doc["rule"]
    assert doc["note"] in text
    got = {r["image_id"]: (r["group_id"], r["from_site"], r["to_site"]) for r in doc["moved"]}
    assert got == moved_ids
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "sites.csv",
        "sites.moves.json",
        "sites.png",
        "sites.svg",
    ]


def test_runner_manifest_logs_moved_lesions(
    ham_split_lesions: tuple[Path, dict, dict, dict], tmp_path: Path
) -> None:
    """`fedskin simulate` builds its manifest with ensure_manifest: same rule, notes logged."""
    import logging

    data, _, expected, _ = ham_split_lesions
    cfg = {"data-format": "ham-dataverse", "data-path": str(data), "cache-dir": str(tmp_path)}
    cfg = RunConfig.from_mapping(cfg | {"scheme": "natural", "seed": 0})
    logger, records = logging.getLogger("fedskin"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        path = ensure_manifest(cfg)
        built = [r.getMessage() for r in records]
        records.clear()
        assert ensure_manifest(cfg) == path  # cached: the note is repeated from the report
        cached = [r.getMessage() for r in records]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    site_of = read_manifest(path).drop_duplicates("group_id").set_index("group_id")["site"]
    assert {g: site_of[g] for g in expected} == expected
    assert any("kept whole" in m and "3 images moved" in m for m in built), built
    assert any("kept whole" in m and path.stem + ".moves.json" in m for m in cached), cached
