"""Each site's groups split into train/validation/test, stratified by label where the counts
allow (common/data/partition.py and its one-site manifests use it)."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from common.data.schema import DataError
from common.names import SPLITS


def sub_seed(seed: int, site: str, stage: int) -> int:
    """Stable per-site seed (zlib.crc32, not hash(), which is salted per process)."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(site.encode()), stage]).generate_state(1)[0]
    )


def group_split(
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


def split_site(
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
        rest, test, how_t = group_split(ids, labels, test_frac, sub_seed(seed, site, 0))
        rest_labels = groups.loc[rest, "label"].to_numpy()
        train, val, how_v = group_split(
            rest, rest_labels, val_frac / (1.0 - test_frac), sub_seed(seed, site, 1)
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
