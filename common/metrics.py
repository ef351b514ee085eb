"""Evaluation metrics for (imbalanced, multi-site) skin-lesion classification.

A site's test split often lacks some classes (or has only one), so every metric is defined
over the classes *present* in ``y_true`` and degrades to NaN instead of raising.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np

# sklearn is imported inside the functions: it costs ~1.7 s of CPU, and Flower starts a fresh
# ClientApp process for every message, most of which (query, train) compute no metrics.

# Names of the "melanoma vs rest" class in each label set (HAM "mel", ISIC 2019 "MEL",
# ISIC 2020 "malignant"): its AUROC is the ISIC 2020 challenge metric.
MELANOMA_NAMES = ("mel", "malignant")


def melanoma_index(classes: list[str]) -> int | None:
    """Index of the melanoma/malignant class, or None when the label set has none."""
    lowered = [c.lower() for c in classes]
    for name in MELANOMA_NAMES:
        if name in lowered:
            return lowered.index(name)
    return None


def _binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one class vs rest; NaN when only one of the two outcomes occurs."""
    if positive.all() or not positive.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro OvR AUROC, per-class recall/AUROC, confusion matrix.

    ``auroc`` averages one-vs-rest AUROC over the classes present in ``y_true`` (NaN with
    fewer than two); ``auroc_mel`` is the melanoma-vs-rest AUROC (NaN if undefined).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        recall_score,
    )

    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), n_classes):
        raise ValueError(
            f"probs must have shape (n={len(y_true)}, classes={n_classes}), got {probs.shape}"
        )
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"labels outside 0..{n_classes - 1}: {np.unique(y_true)}")
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1) if len(y_true) else y_true
    out: dict[str, Any] = {}
    if len(y_true) == 0:
        out.update(accuracy=math.nan, balanced_accuracy=math.nan, auroc=math.nan)
    else:
        with warnings.catch_warnings():
            # sklearn warns when y_pred has classes absent from y_true: expected per site.
            warnings.simplefilter("ignore", UserWarning)
            out["accuracy"] = float(accuracy_score(y_true, y_pred))
            out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
    recalls = (
        recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        if len(y_true)
        else np.full(n_classes, np.nan)
    )
    per_class_auc = [_binary_auroc(y_true == c, probs[:, c]) for c in labels]
    present = [c for c in labels if (y_true == c).any()]
    if len(y_true) and len(present) >= 2:
        out["auroc"] = float(np.mean([per_class_auc[c] for c in present]))
    else:
        out["auroc"] = math.nan
    mel = melanoma_index(classes)
    out["auroc_mel"] = per_class_auc[mel] if mel is not None else math.nan
    for c, name in enumerate(classes):
        out[f"recall_{name}"] = float(recalls[c])
        out[f"auroc_{name}"] = per_class_auc[c]
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def scalar_metrics(d: dict[str, Any]) -> dict[str, float]:
    """Only the real-number entries, as floats (Flower MetricRecords hold no lists)."""
    return {
        k: float(v) for k, v in d.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
