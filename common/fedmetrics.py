"""Metrics that cross the network: aggregates only, poolable across sites.

A site never sends per-image predictions. It sends its confusion matrix and, per class,
binned score histograms for positives and negatives (:func:`site_summary`). Summing those
over sites (server/pooling.py) gives the pooled confusion matrix exactly (so pooled
balanced accuracy/accuracy are exact) and the pooled one-vs-rest AUROC up to the bin width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def nanmax(values: Iterable[float]) -> float:
    """The largest value that is not NaN; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def format_metric(value: Any, missing: str = "nan") -> str:
    """A metric with 3 decimals for tables ("nan" for NaN); ``missing`` where it is None."""
    return missing if value is None else f"{value:.3f}"
