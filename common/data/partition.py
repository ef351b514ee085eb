"""Split one data source into hospital sites and train/validation/test without leakage.

The manifest this writes (``image_id, group_id, label, label_name, site, split``) is the only
thing training reads to know which images a site owns, so every invariant is enforced here
and re-checked on read: a group (lesion or patient) lives in exactly one site and one split,
every image in exactly one (site, split), and the same seed gives a byte-identical file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.formats import get_format
from common.data.institutions import assign_institutions, group_table, resolve_names
from common.data.schema import DataError
from common.data.site_schemes import (
    NO_SITE_MSG,
    describe_moves,
    dirichlet_sites,
    iid_sites,
    natural_sites,
    numbered_site_names,
)
from common.data.splits import group_split, split_site, sub_seed
from common.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_seal,
    manifest_seal,
    seal_path,
)
from common.names import SCHEMES as SCHEMES  # the run config checks scheme against them too
from common.names import SPLITS as SPLITS

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: list[str] = ["image_id", "group_id", "label", "label_name", "site", "split"]
# Optional: where each site's images are (`fedskin partition` records them; one per site), so
# one manifest can join sites of different sources (`fedskin partition --join`).
SOURCE_COLUMNS: list[str] = ["data_format", "data_path"]
MOVE_COLUMNS: list[str] = ["image_id", "group_id", "from_site", "to_site"]
_STREAMS = {"natural": 0, "institutions": 1, "dirichlet": 2, "iid": 3}
_FIRST = 5  # offending ids/rows quoted in error messages


# ------------------------------------------------------------------ public API
def _validate_meta(meta: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    need = ["image_id", "group_id", "label", "label_name"]
    missing = [c for c in need if c not in meta.columns]
    if missing:
        raise DataError(f"metadata lacks column(s) {missing}")
    if meta.empty:
        raise DataError("metadata has no rows to partition")
    m = meta.copy()
    m["image_id"] = m["image_id"].astype(str)
    m["group_id"] = m["group_id"].astype(str)
    dup = m["image_id"].duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"duplicated image_id in metadata: {m.loc[dup, 'image_id'].unique()[:_FIRST].tolist()}"
        )
    for col in ("image_id", "group_id"):
        blank = m[col].str.strip().isin(["", "nan", "None"])
        if blank.any():
            raise DataError(
                f"{int(blank.sum())} rows have an empty {col} "
                f"(rows {m.index[blank][:_FIRST].tolist()})"
            )
    label = pd.to_numeric(m["label"], errors="coerce")
    bad = label.isna() | (label < 0) | (label >= len(classes)) | (label % 1 != 0)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} images have a label outside 0..{len(classes) - 1} for classes "
            f"{list(classes)} (first: {m.loc[bad, 'image_id'].head(_FIRST).tolist()})"
        )
    m["label"] = label.astype(int)
    return m.sort_values("image_id", kind="stable").reset_index(drop=True)


def partition(
    meta: pd.DataFrame,
    scheme: str,
    *,
    classes: list[str],
    num_sites: int = 4,
    alpha: float = 0.5,
    institutions: list[str] | None = None,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_site_images: int = 20,
) -> pd.DataFrame:
    """Manifest (MANIFEST_COLUMNS) assigning every image one site and one split by group.

    Schemes: ``natural`` (the recorded ``source_site``; a group recorded at several sites
    goes wholly to the one holding most of its images, ties to the alphabetically first,
    see :func:`natural_sites`), ``institutions`` (simulated ISIC hospitals, see
    institutions.py), ``dirichlet`` (label skew, Dirichlet(alpha) per class at group level)
    and ``iid`` (balanced random groups). Each site is then split by group,
    stratified by the group's label where counts allow (fractions are of groups). Any
    fallback, and any group moved to keep it at one site, is listed in
    ``manifest.attrs["notes"]`` and logged; the moved images themselves are in
    ``manifest.attrs["moved"]`` (dicts of MOVE_COLUMNS, see :func:`write_moves_report`).
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(
            "need 0 < val_frac, test_frac and val_frac + test_frac < 1; "
            f"got {val_frac}, {test_frac}"
        )
    if scheme in ("dirichlet", "iid") and num_sites < 2:
        raise DataError(
            f"num_sites must be at least 2 for scheme={scheme}, got {num_sites}; for a "
            "single site use `fedskin partition --site NAME` (partition.one_site)"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    m = _validate_meta(meta, classes)
    rng = np.random.default_rng([seed, _STREAMS[scheme]])  # not the bare seed: see institutions
    notes: list[str] = []
    moved, moves_note = pd.DataFrame(columns=MOVE_COLUMNS), ""

    if scheme == "natural":
        if "source_site" not in m.columns:
            raise DataError(NO_SITE_MSG)
        site, moved = natural_sites(m)
        m["site"] = site.to_numpy()
        if len(moved):
            moves_note = describe_moves(moved, m)
            notes.append(moves_note)
    elif scheme == "institutions":
        m["site"] = assign_institutions(m, classes, resolve_names(institutions), seed).to_numpy()
    else:
        groups = group_table(m, classes)
        if scheme == "dirichlet":
            idx = dirichlet_sites(groups, num_sites, alpha, rng, min_site_images)
        else:
            idx = iid_sites(groups, num_sites, rng)
        names = np.asarray(numbered_site_names(num_sites))
        m["site"] = pd.Series(names[idx], index=groups.index).reindex(m["group_id"]).to_numpy()

    expected = (
        resolve_names(institutions)
        if scheme == "institutions"
        else numbered_site_names(num_sites)
        if scheme in ("dirichlet", "iid")
        else sorted(m["site"].unique())
    )
    sizes = m["site"].value_counts().reindex(expected, fill_value=0)
    small = sizes[sizes < min_site_images]
    if len(small):
        hint = {
            "dirichlet": "; try a larger alpha or fewer sites",
            "institutions": "; pick fewer institutions",
            "iid": "; use fewer sites",
        }.get(scheme, "")
        counts = ", ".join(f"{s}: {n} images" for s, n in small.items())
        raise DataError(
            f"site(s) below min_site_images={min_site_images} ({counts}) out of {len(m)} "
            f"images{hint}"
        )

    groups = group_table(m[["image_id", "group_id", "label"]], classes)
    site_of_group = m.drop_duplicates("group_id").set_index("group_id")["site"]
    groups["site"] = site_of_group.reindex(groups.index).to_numpy()
    split_of_group: list[pd.Series] = []
    for site, site_groups in groups.groupby("site", sort=True):
        by_group, site_notes = split_site(str(site), site_groups, val_frac, test_frac, seed)
        split_of_group.append(by_group)
        notes += site_notes
    m["split"] = pd.concat(split_of_group).reindex(m["group_id"]).to_numpy()
    for note in notes:
        log.info(note)

    out = m[MANIFEST_COLUMNS].copy()
    out["label_name"] = out["label_name"].astype(str)
    out["site"] = out["site"].astype(str)
    out = _sorted(out)
    _check_invariants(out, "partition result")
    out.attrs["notes"] = notes
    out.attrs["scheme"] = scheme
    out.attrs["moved"] = moved[MOVE_COLUMNS].to_dict("records")
    out.attrs["moves_note"] = moves_note
    return out


# ------------------------------------------------------------------ one named site
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a site name a manifest may hold
ONE_SITE_SCHEME = "one-site"  # manifest.attrs["scheme"] of a one_site() manifest


def one_site(
    meta: pd.DataFrame,
    site: str,
    *,
    classes: list[str],
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_site_images: int = 20,
) -> pd.DataFrame:
    """Manifest of ONE named site holding every image (a hospital's own data, any format).

    The export's own split (``source_split``) is kept when every image has one and no group
    is in two of them; a held-out split it lacks (Fed-ISIC2019 has no validation) is made
    from its train groups. Without a split, the site is split by group as :func:`partition`
    splits each site. Any fallback is listed in ``manifest.attrs["notes"]``.
    """
    if not SITE_NAME.match(site):
        raise DataError(
            f"site name {site!r}: use letters, digits, '_', '.', '-' (starting with a letter "
            "or digit)"
        )
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(
            "need 0 < val_frac, test_frac and val_frac + test_frac < 1; "
            f"got {val_frac}, {test_frac}"
        )
    m = _validate_meta(meta, classes)
    m["site"] = site
    if len(m) < min_site_images:
        raise DataError(f"site {site}: {len(m)} images, below min_site_images={min_site_images}")
    groups = group_table(m[["image_id", "group_id", "label"]], classes)
    given = (
        m["source_split"].fillna("").astype(str).str.strip()
        if "source_split" in m.columns
        else pd.Series("", index=m.index)
    )
    notes: list[str] = []
    if (given == "").all():
        by_group, notes = split_site(site, groups, val_frac, test_frac, seed)
        m["split"] = by_group.reindex(m["group_id"]).to_numpy()
    else:
        ids = m["image_id"]
        if (given == "").any():
            raise DataError(
                f"{int((given == '').sum())} of {len(m)} images have no split in the export "
                f"(first: {ids[given == ''].head(_FIRST).tolist()}) while the others have "
                "one: give every image a split, or none for a group-safe split"
            )
        unknown = ~given.isin(SPLITS)
        if unknown.any():
            raise DataError(
                f"the export's split has value(s) {sorted(given[unknown].unique())[:_FIRST]} "
                f"(allowed {list(SPLITS)}); first images: {ids[unknown].head(_FIRST).tolist()}"
            )
        n_splits = given.groupby(m["group_id"]).nunique()
        straddle = n_splits.index[n_splits > 1]
        if len(straddle):
            by_group, notes = split_site(site, groups, val_frac, test_frac, seed)
            m["split"] = by_group.reindex(m["group_id"]).to_numpy()
            notes.insert(
                0,
                f"the export's split puts {len(straddle)} group(s) in more than one split "
                f"(first: {list(straddle[:_FIRST])}), so it leaks: made a group-safe split "
                "instead",
            )
        else:
            m["split"] = given.to_numpy()
            notes.append(f"site {site}: kept the export's own train/validation/test split")
            notes += _carve_missing_splits(m, groups, site, val_frac, test_frac, seed)
    for note in notes:
        log.info(note)
    out = m[MANIFEST_COLUMNS].copy()
    out["label_name"] = out["label_name"].astype(str)
    out = _sorted(out)
    _check_invariants(out, "one-site manifest")
    out.attrs["notes"] = notes
    out.attrs["scheme"] = ONE_SITE_SCHEME
    out.attrs["moved"] = []
    out.attrs["moves_note"] = ""
    return out


def _carve_missing_splits(
    m: pd.DataFrame, groups: pd.DataFrame, site: str, val_frac: float, test_frac: float, seed: int
) -> list[str]:
    """Make each held-out split the export lacks from its train groups (in place)."""
    notes = []
    for stage, (name, frac) in enumerate((("test", test_frac), ("validation", val_frac)), 2):
        if (m["split"] == name).any():
            continue
        train = m.loc[m["split"] == "train", "group_id"].unique()
        train = np.sort(train)
        if len(train) < 2:
            raise DataError(
                f"site {site}: the export has no {name} split and {len(train)} train group(s) "
                f"to make one from"
            )
        try:
            _, held, how = group_split(
                train, groups.loc[train, "label"].to_numpy(), frac, sub_seed(seed, site, stage)
            )
        except ValueError:
            raise DataError(
                f"site {site}: the export has no {name} split and too few train groups "
                f"({len(train)}) to make one"
            ) from None
        m.loc[m["group_id"].isin(held), "split"] = name
        notes.append(
            f"site {site}: the export has no {name} split; made one from {len(held)} of its "
            f"{len(train)} train groups ({how})"
        )
    return notes


def _sorted(manifest: pd.DataFrame) -> pd.DataFrame:
    order = {s: i for i, s in enumerate(SPLITS)}
    key = manifest["split"].map(order)
    return (
        manifest.assign(_k=key)
        .sort_values(["site", "_k", "image_id"], kind="stable")
        .drop(columns="_k")
        .reset_index(drop=True)
    )


def rows_named(manifest: pd.DataFrame, mask: pd.Series) -> str:
    """Offending rows as file line numbers (header is line 1, the index counts rows from 0)
    with their ids."""
    sub = manifest.loc[mask].head(_FIRST)
    return "; ".join(
        f"line {i + 2}: {r.image_id} (group {r.group_id}, site {r.site}, split {r.split})"
        for i, r in zip(sub.index, sub.itertuples(), strict=True)
    )


def _check_invariants(manifest: pd.DataFrame, where: str) -> None:
    """Raise DataError naming ``where`` and the first offending rows."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; expected {MANIFEST_COLUMNS}")
    if manifest.empty:
        raise DataError(f"{where}: no rows")
    bad_split = ~manifest["split"].isin(SPLITS)
    if bad_split.any():
        raise DataError(
            f"{where}: unknown split name(s) {sorted(manifest.loc[bad_split, 'split'].unique())} "
            f"(allowed {list(SPLITS)}): {rows_named(manifest, bad_split)}"
        )
    for col in ("image_id", "group_id", "site"):
        blank = manifest[col].astype(str).str.strip() == ""
        if blank.any():
            raise DataError(f"{where}: empty {col}: {rows_named(manifest, blank)}")
    dup = manifest["image_id"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{where}: duplicated image_id: {rows_named(manifest, dup)}")
    for col, what in (("site", "sites"), ("split", "splits")):
        n = manifest.groupby("group_id")[col].transform("nunique")
        if (n > 1).any():
            raise DataError(f"{where}: group in two {what}: {rows_named(manifest, n > 1)}")
    _check_sources(manifest, where)


def write_manifest(manifest: pd.DataFrame, path: str | Path, seal: bool = False) -> Path:
    """CSV, no index, '\\n' line ends, rows sorted: same manifest -> same bytes.

    Written atomically (common/rundir.py). ``seal`` also writes ``<stem>.check.json``
    beside it (row count, sites, SHA-256), which :func:`read_manifest` checks, so a derived
    manifest that was truncated or changed since is refused instead of silently reused.
    """
    path = Path(path)
    _check_invariants(manifest, str(path))
    text = _sorted(manifest[manifest_columns(manifest)]).to_csv(
        index=False, lineterminator="\n", float_format="%.6g"
    )
    if seal:  # first: a crash between the two leaves no manifest, so it is made again
        rows, sites = len(manifest), int(manifest["site"].nunique())
        atomic_write_json(seal_path(path), manifest_seal(text, rows, sites), indent=1)
    atomic_write_text(path, text)
    return path


def moves_report_path(manifest_path: str | Path) -> Path:
    """Where the moved-images report of a manifest lives: ``<stem>.moves.json`` beside it."""
    path = Path(manifest_path)
    return path.with_name(f"{path.stem}.moves.json")


def write_moves_report(manifest: pd.DataFrame, manifest_path: str | Path) -> Path | None:
    """JSON beside the manifest listing every image moved to keep its group at one site.

    Written only when ``scheme=natural`` moved images (a stale report at that path is
    removed otherwise), via a temporary file and an atomic rename; same manifest -> same
    bytes. Returns its path, or None when nothing was moved.
    """
    path = moves_report_path(manifest_path)
    moved = list(manifest.attrs.get("moved", []))
    if not moved:
        path.unlink(missing_ok=True)
        return None
    report = {
        "manifest": Path(manifest_path).name,
        "rule": "a group recorded at several source_site values goes wholly to the source "
        "holding most of its images; ties go to the alphabetically first source name",
        "note": str(manifest.attrs.get("moves_note", "")),
        "n_groups": len({r["group_id"] for r in moved}),
        "n_images": len(moved),
        "moved": [{k: str(r[k]) for k in MOVE_COLUMNS} for r in moved],
    }
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Load a manifest and re-check every invariant; errors name the file and rows."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest CSV ({e})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {MANIFEST_COLUMNS}")
    check_seal(path, len(df), int(df["site"].nunique()))  # a derived manifest, truncated?
    label = pd.to_numeric(df["label"], errors="coerce")
    bad = label.isna() | (label % 1 != 0) | (label < 0)
    if bad.any():
        raise DataError(f"{path}: label is not a non-negative integer: {rows_named(df, bad)}")
    _check_invariants(df, str(path))
    df = df[manifest_columns(df)].copy()
    df["label"] = label.astype(int)
    return df


def manifest_columns(manifest: pd.DataFrame) -> list[str]:
    """The columns a manifest holds: :data:`MANIFEST_COLUMNS`, and :data:`SOURCE_COLUMNS`
    when it records where each site's images are."""
    return MANIFEST_COLUMNS + [c for c in SOURCE_COLUMNS if c in manifest.columns]


def with_source(manifest: pd.DataFrame, data_format: str, data_path: str | Path) -> pd.DataFrame:
    """``manifest`` recording that every row's image is in ``data_format`` data at
    ``data_path`` (made absolute: the manifest may be read from another folder; a path
    that is no file or folder here, such as ``ham-hf``'s hub id, is kept as given)."""
    out = manifest.copy()
    local = Path(data_path).expanduser()
    out["data_format"] = str(data_format)
    out["data_path"] = str(local.resolve() if local.exists() else data_path)
    out.attrs = dict(manifest.attrs)
    return out


def _check_sources(manifest: pd.DataFrame, where: str) -> None:
    """Both source columns or neither, every row filled, one source per site."""
    present = [c for c in SOURCE_COLUMNS if c in manifest.columns]
    if not present:
        return
    if len(present) == 1:
        raise DataError(f"{where}: column {present[0]!r} needs its pair ({SOURCE_COLUMNS})")
    blank = (manifest["data_format"].astype(str).str.strip() == "") | (
        manifest["data_path"].astype(str).str.strip() == ""
    )
    if blank.any():
        raise DataError(f"{where}: empty data_format or data_path: {rows_named(manifest, blank)}")
    source = manifest["data_format"].astype(str) + "\0" + manifest["data_path"].astype(str)
    n = source.groupby(manifest["site"]).transform("nunique")
    if (n > 1).any():
        raise DataError(f"{where}: a site in two data sources: {rows_named(manifest, n > 1)}")


# ------------------------------------------------------------------ manifests joined
JOINED_SCHEME = "joined"  # manifest.attrs["scheme"] of a join_manifests() result


def join_manifests(
    manifest: pd.DataFrame, joined: Sequence[tuple[Path, pd.DataFrame]], classes: Sequence[str]
) -> pd.DataFrame:
    """``manifest`` with the sites of each joined manifest (read by :func:`read_manifest`) added.

    Every manifest must record its sources (:data:`SOURCE_COLUMNS`) with the same classes;
    site names, images and groups must be new. Each refusal is one line naming the file and
    its first offending rows."""
    out = manifest.reset_index(drop=True)
    for path, other in joined:
        other = other.reset_index(drop=True)
        if any(c not in other.columns for c in SOURCE_COLUMNS):
            raise DataError(
                f"{path}: records no data source ({', '.join(SOURCE_COLUMNS)}): write it with "
                "`fedskin partition` (it records where each site's images are)"
            )
        for fmt in sorted(other["data_format"].astype(str).unique()):
            theirs = get_format(fmt).classes
            if list(theirs) != list(classes):
                raise DataError(
                    f"{path}: its {fmt} data has classes {list(theirs)}; the federation's are "
                    f"{list(classes)}"
                )
        label = other["label"].astype(int)
        names = pd.Series(list(classes), dtype=object)
        known = label.between(0, len(classes) - 1)
        named = label.where(known, 0).map(names) == other["label_name"].astype(str)
        if not (known & named).all():
            bad = ~(known & named)
            raise DataError(
                f"{path}: class {sorted(set(other.loc[bad, 'label_name']))} is not one of the "
                f"federation's {list(classes)}: {rows_named(other, bad)}"
            )
        for col, what in (("site", "site name"), ("image_id", "image"), ("group_id", "group")):
            taken = other[col].astype(str).isin(set(out[col].astype(str)))
            if taken.any():
                first = sorted(set(other.loc[taken, col].astype(str)))[:_FIRST]
                raise DataError(
                    f"{path}: {what} {first} already in the federation (another manifest "
                    f"joined here): {rows_named(other, taken)}"
                )
        out = pd.concat([out, other[manifest_columns(other)]], ignore_index=True)
    out = _sorted(out)
    _check_invariants(out, "joined manifest")
    out.attrs = {"scheme": JOINED_SCHEME, "notes": [], "moved": [], "moves_note": ""}
    return out


# ------------------------------------------------------------------ reporting
def site_class_counts(manifest: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """site x class image counts, all classes present as columns."""
    return (
        pd.crosstab(manifest["site"], manifest["label"])
        .reindex(columns=range(len(classes)), fill_value=0)
        .sort_index()
    )
