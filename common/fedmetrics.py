"""Metrics that cross the network: aggregates only, poolable across sites.

A site never sends per-image predictions. It sends its confusion matrix and, per class,
binned score histograms for positives and negatives. Summing those over sites gives the
pooled confusion matrix exactly (so pooled balanced accuracy/accuracy are exact) and the
pooled one-vs-rest AUROC up to the bin width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

BINS = 50
AGGREGATE_KEYS = ("confusion", "score-hist")  # fixed-size lists, never per image


def site_summary(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """Confusion matrix and per-class score histograms, flattened for a MetricRecord."""
    y_true = np.asarray(y_true, dtype=np.int64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (y_true, pred), 1)
    edges = np.linspace(0.0, 1.0, BINS + 1)
    hist = np.zeros((num_classes, 2, BINS), dtype=np.int64)
    for c in range(num_classes):
        pos = y_true == c
        hist[c, 0] = np.histogram(probs[pos, c], bins=edges)[0]
        hist[c, 1] = np.histogram(probs[~pos, c], bins=edges)[0]
    return {"confusion": conf.ravel().tolist(), "score-hist": hist.ravel().tolist()}


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


def nanmax(values: Iterable[float]) -> float:
    """The largest value that is not NaN; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def format_metric(value: Any, missing: str = "nan") -> str:
    """A metric with 3 decimals for tables ("nan" for NaN); ``missing`` where it is None."""
    return missing if value is None else f"{value:.3f}"


def pooled_confusion(summaries: Iterable[Mapping[str, Sequence[int]]], c: int) -> np.ndarray:
    conf = np.zeros((c, c), dtype=np.int64)
    for s in summaries:
        conf += np.asarray(s["confusion"], dtype=np.int64).reshape(c, c)
    return conf
