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
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.institutions import assign_institutions, group_table, resolve_names
from common.data.schema import DataError
from common.fileio import (
    atomic_savefig,
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
MOVE_COLUMNS: list[str] = ["image_id", "group_id", "from_site", "to_site"]
NO_SITE_MSG = "this source records no site; use scheme=institutions, dirichlet or iid"
_MAX_DIRICHLET_DRAWS = 200
_STREAMS = {"natural": 0, "institutions": 1, "dirichlet": 2, "iid": 3}
_FIRST = 5  # offending ids/rows quoted in error messages


# ------------------------------------------------------------------ site assignment schemes
def _site_names(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"site{i:0{width}d}" for i in range(n)]


def _natural_sites(meta: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """The hospital the data itself records, with each group kept whole at one of its sites.

    A group (lesion/patient) recorded at more than one ``source_site`` (HAM10000 has 9
    lesions with images in two ``dataset`` values) cannot be split across sites without
    leaking it, so all its images go to ONE site: the source holding most of that group's
    images, ties broken by taking the alphabetically first source name. The rule depends
    only on the metadata (not on row order or seed). Returns the site per row and the moved
    images (``image_id, group_id, from_site, to_site``, sorted by group then image).
    """
    site = meta["source_site"].fillna("").astype(str).str.strip()
    empty = site == ""
    if empty.all():
        raise DataError(NO_SITE_MSG)
    if empty.any():
        ids = meta.loc[empty, "image_id"].head(_FIRST).tolist()
        raise DataError(
            f"{int(empty.sum())} of {len(meta)} images have no source_site (first: {ids}); "
            "scheme=natural needs a site for every image — use scheme=institutions, "
            "dirichlet or iid, or drop those rows"
        )
    rows = pd.DataFrame({"image_id": meta["image_id"], "group_id": meta["group_id"], "site": site})
    n_sites = rows.groupby("group_id")["site"].nunique()
    spanning = rows[rows["group_id"].isin(n_sites.index[n_sites > 1])]
    tally = spanning.groupby(["group_id", "site"]).size().rename("n").reset_index()
    chosen = (
        tally.sort_values(["group_id", "n", "site"], ascending=[True, False, True], kind="stable")
        .drop_duplicates("group_id")
        .set_index("group_id")["site"]
    )
    to_site = rows["site"].copy()
    spans = rows["group_id"].isin(chosen.index)
    to_site[spans] = rows.loc[spans, "group_id"].map(chosen)
    moved = (
        rows.loc[to_site != rows["site"], ["image_id", "group_id", "site"]]
        .rename(columns={"site": "from_site"})
        .assign(to_site=to_site[to_site != rows["site"]])
        .sort_values(["group_id", "image_id"], kind="stable")
        .reset_index(drop=True)
    )
    return to_site.rename("site"), moved


def _moves_note(moved: pd.DataFrame, meta: pd.DataFrame, listed: int = 10) -> str:
    """One line: how many groups and images were moved, and the first ``listed`` groups."""
    size = meta["group_id"].value_counts()
    recorded = meta["source_site"].astype(str).str.strip()
    n_sources = recorded.groupby(meta["group_id"]).nunique()
    groups = moved.groupby("group_id", sort=True)
    spans = {int(n_sources[g]) for g in groups.groups}
    at = "two sources" if spans == {2} else "more than one source"
    parts = [
        f"{g}: {', '.join(sorted(d['from_site'].unique()))} -> {d['to_site'].iloc[0]} "
        f"({len(d)} of {int(size[g])} images)"
        for g, d in groups
    ]
    more = f", ... and {len(parts) - listed} more" if len(parts) > listed else ""
    n_img = len(moved)
    return (
        f"{len(parts)} groups (lesion or patient) recorded at {at} were each kept whole at "
        f"the source holding most of their images (ties: alphabetically first source): "
        f"{n_img} image{'s' if n_img != 1 else ''} moved ({'; '.join(parts[:listed])}{more})"
    )


def _dirichlet_sites(
    groups: pd.DataFrame, num_sites: int, alpha: float, rng: np.random.Generator, min_images: int
) -> np.ndarray:
    """Label skew: per class, Dirichlet(alpha) shares of its groups go to each site.

    Like the usual FL benchmark recipe (Hsu et al. 2019; FedML/FedLab), a draw leaving a
    site with fewer than ``min_images`` images or 3 groups is redrawn, up to a limit; the
    site-size check later reports what is left.
    """
    labels = groups["label"].to_numpy()
    sizes = groups["n_images"].to_numpy()
    best: np.ndarray | None = None
    for _ in range(_MAX_DIRICHLET_DRAWS):
        site = np.empty(len(groups), dtype=int)
        for k in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == k))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for s, chunk in enumerate(np.split(members, cuts)):
                site[chunk] = s
        n_img = np.bincount(site, weights=sizes, minlength=num_sites)
        n_grp = np.bincount(site, minlength=num_sites)
        best = site
        if n_img.min() >= min_images and n_grp.min() >= len(SPLITS):
            break
    assert best is not None
    return best


def _iid_sites(groups: pd.DataFrame, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled groups dealt to whichever site has the fewest images so far (balanced)."""
    sizes = groups["n_images"].to_numpy()
    site = np.empty(len(groups), dtype=int)
    load = np.zeros(num_sites)
    for g in rng.permutation(len(groups)):
        s = int(load.argmin())
        site[g] = s
        load[s] += sizes[g]
    return site


# ------------------------------------------------------------------ per-site splits
def _sub_seed(seed: int, site: str, stage: int) -> int:
    """Stable per-site seed (zlib.crc32, not hash(), which is salted per process)."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(site.encode()), stage]).generate_state(1)[0]
    )


def _group_split(
    ids: np.ndarray, strata: np.ndarray, frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Split group ids, stratified by label if counts allow; returns (rest, held, how)."""
    if frac <= 0:
        return ids, ids[:0], "none"
    # Here, not at the top: sklearn is heavy (~2 CPU-s), and every Flower process that
    # imports the data pipeline (each message's ClientApp at a default SuperNode) would pay it.
    from sklearn.model_selection import train_test_split

    # Stratify on every class if sklearn can; else keep the k commonest classes as strata and
    # pool the rarer ones (a class with one group, or more classes than held-out slots, makes
    # full stratification impossible); a plain group split is the last resort.
    counts = (
        pd.Series(strata).value_counts().sort_index().sort_values(ascending=False, kind="stable")
    )
    for keep in range(len(counts), 0, -1):
        y = np.where(np.isin(strata, counts.index[:keep]), strata, -1)
        try:
            rest, held = train_test_split(ids, test_size=frac, stratify=y, random_state=seed)
        except ValueError:
            continue
        how = "stratified" if keep == len(counts) else f"stratified on its {keep} commonest classes"
        return np.asarray(rest), np.asarray(held), how
    rest, held = train_test_split(ids, test_size=frac, random_state=seed)
    return np.asarray(rest), np.asarray(held), "group (not stratified)"


def _split_site(
    site: str, groups: pd.DataFrame, val_frac: float, test_frac: float, seed: int
) -> tuple[pd.Series, list[str]]:
    """train/validation/test per group of one site, with notes on any fallback."""
    ids = groups.index.to_numpy()
    labels = groups["label"].to_numpy()
    too_few = DataError(
        f"site {site!r} has {int(groups['n_images'].sum())} images in {len(ids)} groups; "
        f"too few for non-empty train/validation/test splits (val_frac={val_frac}, "
        f"test_frac={test_frac}, at least 3 groups needed)"
    )
    if len(ids) < len(SPLITS):
        raise too_few
    try:
        rest, test, how_t = _group_split(ids, labels, test_frac, _sub_seed(seed, site, 0))
        rest_labels = groups.loc[rest, "label"].to_numpy()
        train, val, how_v = _group_split(
            rest, rest_labels, val_frac / (1.0 - test_frac), _sub_seed(seed, site, 1)
        )
    except ValueError:  # sklearn: a split would be empty
        raise too_few from None
    if min(len(train), len(val), len(test)) == 0:
        raise too_few
    split = pd.Series("train", index=groups.index, dtype=object)
    split[val] = "validation"
    split[test] = "test"
    fallbacks = {how for how in (how_t, how_v) if how not in ("stratified", "none")}
    notes = [f"site {site}: held-out splits {' / '.join(sorted(fallbacks))}"] if fallbacks else []
    return split, notes


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
    see :func:`_natural_sites`), ``institutions`` (simulated ISIC hospitals, see
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
        site, moved = _natural_sites(m)
        m["site"] = site.to_numpy()
        if len(moved):
            moves_note = _moves_note(moved, m)
            notes.append(moves_note)
    elif scheme == "institutions":
        m["site"] = assign_institutions(m, classes, resolve_names(institutions), seed).to_numpy()
    else:
        groups = group_table(m, classes)
        if scheme == "dirichlet":
            idx = _dirichlet_sites(groups, num_sites, alpha, rng, min_site_images)
        else:
            idx = _iid_sites(groups, num_sites, rng)
        names = np.asarray(_site_names(num_sites))
        m["site"] = pd.Series(names[idx], index=groups.index).reindex(m["group_id"]).to_numpy()

    expected = (
        resolve_names(institutions)
        if scheme == "institutions"
        else _site_names(num_sites)
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
        by_group, site_notes = _split_site(str(site), site_groups, val_frac, test_frac, seed)
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
        by_group, notes = _split_site(site, groups, val_frac, test_frac, seed)
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
            by_group, notes = _split_site(site, groups, val_frac, test_frac, seed)
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
            _, held, how = _group_split(
                train, groups.loc[train, "label"].to_numpy(), frac, _sub_seed(seed, site, stage)
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


def _rows(manifest: pd.DataFrame, mask: pd.Series) -> str:
    """Offending rows as file line numbers (header is line 1) with their ids."""
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
            f"(allowed {list(SPLITS)}): {_rows(manifest, bad_split)}"
        )
    for col in ("image_id", "group_id", "site"):
        blank = manifest[col].astype(str).str.strip() == ""
        if blank.any():
            raise DataError(f"{where}: empty {col}: {_rows(manifest, blank)}")
    dup = manifest["image_id"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{where}: duplicated image_id: {_rows(manifest, dup)}")
    for col, what in (("site", "sites"), ("split", "splits")):
        n = manifest.groupby("group_id")[col].transform("nunique")
        if (n > 1).any():
            raise DataError(f"{where}: group in two {what}: {_rows(manifest, n > 1)}")


def write_manifest(manifest: pd.DataFrame, path: str | Path, seal: bool = False) -> Path:
    """CSV, no index, '\\n' line ends, rows sorted: same manifest -> same bytes.

    Written atomically (common/rundir.py). ``seal`` also writes ``<stem>.check.json``
    beside it (row count, sites, SHA-256), which :func:`read_manifest` checks, so a derived
    manifest that was truncated or changed since is refused instead of silently reused.
    """
    path = Path(path)
    _check_invariants(manifest, str(path))
    text = _sorted(manifest[MANIFEST_COLUMNS]).to_csv(
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
        raise DataError(f"{path}: label is not a non-negative integer: {_rows(df, bad)}")
    _check_invariants(df, str(path))
    df = df[MANIFEST_COLUMNS].copy()
    df["label"] = label.astype(int)
    return df


# ------------------------------------------------------------------ reporting
def site_class_counts(manifest: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """site x class image counts, all classes present as columns."""
    return (
        pd.crosstab(manifest["site"], manifest["label"])
        .reindex(columns=range(len(classes)), fill_value=0)
        .sort_index()
    )


def plot_sites(manifest: pd.DataFrame, classes: Sequence[str], path: str | Path) -> Path:
    """PNG: per site, a stacked bar of class proportions with its image count."""
    import matplotlib  # lazily: heavy, plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    counts = site_class_counts(manifest, classes)
    props = counts.div(counts.sum(axis=1), axis=0)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(props)))
    y = np.arange(len(props))[::-1]
    left = np.zeros(len(props))
    for k, name in enumerate(classes):
        w = props[k].to_numpy()
        ax.barh(y, w, left=left, color=cmap(k % cmap.N), label=str(name), edgecolor="white")
        for yi, li, wi in zip(y, left, w, strict=True):
            if wi >= 0.07:
                ax.text(li + wi / 2, yi, f"{wi:.0%}", ha="center", va="center", fontsize=8)
        left += w
    for yi, n in zip(y, counts.sum(axis=1), strict=True):
        ax.text(1.01, yi, f"n={n}", va="center", fontsize=9)
    ax.set_yticks(y, [str(s) for s in props.index])
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of site's images")
    scheme = manifest.attrs.get("scheme", "")
    ax.set_title(f"Class mix per site{f' ({scheme})' if scheme else ''}")
    ax.legend(
        ncol=min(len(classes), 8),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35 if len(props) < 4 else -0.15),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
