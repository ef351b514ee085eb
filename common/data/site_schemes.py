"""How a source's groups are assigned to sites (common/data/partition.py runs them): the
hospital the data records (``natural``, each group kept whole at one site), Dirichlet label
skew (``dirichlet``) or balanced shuffling (``iid``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.data.schema import DataError
from common.names import SPLITS

NO_SITE_MSG = "this source records no site; use scheme=institutions, dirichlet or iid"
_MAX_DIRICHLET_DRAWS = 200
_FIRST = 5  # offending ids quoted in error messages


def numbered_site_names(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"site{i:0{width}d}" for i in range(n)]


def natural_sites(meta: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
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


def describe_moves(moved: pd.DataFrame, meta: pd.DataFrame, listed: int = 10) -> str:
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


def dirichlet_sites(
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


def iid_sites(groups: pd.DataFrame, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled groups dealt to whichever site has the fewest images so far (balanced)."""
    sizes = groups["n_images"].to_numpy()
    site = np.empty(len(groups), dtype=int)
    load = np.zeros(num_sites)
    for g in rng.permutation(len(groups)):
        s = int(load.argmin())
        site[g] = s
        load[s] += sizes[g]
    return site
