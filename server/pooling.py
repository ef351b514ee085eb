"""The server's half of the poolable metrics: the sites' aggregates (common/fedmetrics.py:
``site_summary``) summed into the federation's metrics: the pooled confusion matrix exactly
(so pooled balanced accuracy/accuracy are exact) and the pooled one-vs-rest AUROC up to the
bin width; balanced accuracy and its size-weighted form, the one owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from common.fedmetrics import BINS


def _auroc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def pooled_metrics(
    summaries: Iterable[Mapping[str, Sequence[int]]], classes: Sequence[str]
) -> dict[str, float]:
    """Pooled metrics over sites from their :func:`site_summary` records."""
    c = len(classes)
    conf = np.zeros((c, c), dtype=np.int64)
    hist = np.zeros((c, 2, BINS), dtype=np.int64)
    for s in summaries:
        conf += np.asarray(s["confusion"], dtype=np.int64).reshape(c, c)
        hist += np.asarray(s["score-hist"], dtype=np.int64).reshape(c, 2, BINS)
    support = conf.sum(axis=1)
    present = support > 0
    recall = np.divide(np.diag(conf), support, out=np.zeros(c), where=present)
    out: dict[str, float] = {
        "n": float(conf.sum()),
        "accuracy": float(np.trace(conf) / max(conf.sum(), 1)),
        "balanced_accuracy": balanced_accuracy(conf),
    }
    aucs = [_auroc_from_hist(hist[k, 0], hist[k, 1]) for k in range(c)]
    valid = [a for a in aucs if not np.isnan(a)]
    out["auroc"] = float(np.mean(valid)) if len(valid) >= 2 or c == 2 and valid else float("nan")
    for k, name in enumerate(classes):
        out[f"recall_{name}"] = float(recall[k]) if present[k] else float("nan")
        if name.lower() in ("mel", "malignant"):
            out["auroc_mel"] = aucs[k]
    return out


def balanced_accuracy(conf: np.ndarray) -> float:
    """Mean recall over the classes present (rows with support) of a confusion matrix
    (true x predicted); NaN when no class is present."""
    support = conf.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(conf)[present] / support[present]).mean())


def weighted_balanced_accuracy(
    confusions: Mapping[str, Sequence[int]], factors: Mapping[str, float], num_classes: int
) -> float:
    """Pooled balanced accuracy with each site's confusion counts scaled by its factor
    (server/sizes.py ``scale_factors`` of the pinned split sizes): the score the loop's
    decisions use."""
    conf = np.zeros((num_classes, num_classes))
    for name, flat in confusions.items():
        conf += factors.get(name, 1.0) * np.asarray(flat, float).reshape(num_classes, -1)
    return balanced_accuracy(conf)


def pooled_confusion(summaries: Iterable[Mapping[str, Sequence[int]]], c: int) -> np.ndarray:
    conf = np.zeros((c, c), dtype=np.int64)
    for s in summaries:
        conf += np.asarray(s["confusion"], dtype=np.int64).reshape(c, c)
    return conf
