"""Metrics against scikit-learn on hand-made cases, including degenerate site test sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from common.metrics import compute_metrics, melanoma_index, scalar_metrics

CLASSES = ["bcc", "mel", "nv"]


def _probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    p = rng.random((n, c)) + 1e-3
    return p / p.sum(1, keepdims=True)


def test_matches_sklearn_all_classes_present() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    probs = _probs(rng, len(y), 3)
    m = compute_metrics(y, probs, CLASSES)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["auroc_mel"] == pytest.approx(roc_auc_score(y == 1, probs[:, 1]))
    assert m["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    for c, name in enumerate(CLASSES):
        expected = ((pred == c) & (y == c)).sum() / (y == c).sum()
        assert m[f"recall_{name}"] == pytest.approx(expected)


def test_perfect_and_inverted_scores() -> None:
    y = np.array([0, 1, 2, 1])
    probs = np.eye(3)[y] * 0.8 + 0.1 / 1.5
    m = compute_metrics(y, probs, CLASSES)
    assert m["accuracy"] == 1.0 and m["auroc"] == 1.0 and m["auroc_mel"] == 1.0
    inverted = compute_metrics(y, 1.0 - probs, CLASSES)
    assert inverted["auroc"] == 0.0


def test_single_class_site_is_nan_not_crash() -> None:
    y = np.array([2, 2, 2, 2])
    probs = _probs(np.random.default_rng(1), 4, 3)
    m = compute_metrics(y, probs, CLASSES)
    assert math.isnan(m["auroc"]) and math.isnan(m["auroc_mel"])
    assert math.isnan(m["recall_bcc"]) and not math.isnan(m["recall_nv"])
    assert m["balanced_accuracy"] == pytest.approx(m["recall_nv"])
    assert len(m["confusion"]) == 3 and all(len(r) == 3 for r in m["confusion"])


def test_auroc_macro_over_present_classes_only() -> None:
    rng = np.random.default_rng(2)
    y = np.array([0, 0, 2, 2, 2, 0])  # "mel" absent
    probs = _probs(rng, len(y), 3)
    m = compute_metrics(y, probs, CLASSES)
    expected = np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 2, probs[:, 2])])
    assert m["auroc"] == pytest.approx(expected)
    assert math.isnan(m["auroc_mel"])


def test_binary_malignant_auroc_is_isic2020_metric() -> None:
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.2, 0.9, 0.6])
    probs = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, probs, ["benign", "malignant"])
    assert m["auroc_mel"] == pytest.approx(roc_auc_score(y, p1))
    assert melanoma_index(["MEL", "NV"]) == 0
    assert melanoma_index(["a", "b"]) is None


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.array([0, 1]), np.ones((3, 3)) / 3, CLASSES)
    with pytest.raises(ValueError, match="labels outside"):
        compute_metrics(np.array([0, 5]), np.ones((2, 3)) / 3, CLASSES)


def test_scalar_metrics_keeps_numbers_only() -> None:
    y = np.array([0, 1, 2])
    m = compute_metrics(y, np.eye(3)[y], CLASSES)
    m["n"] = 3
    s = scalar_metrics(m)
    assert "confusion" not in s
    assert s["n"] == 3.0 and all(isinstance(v, float) for v in s.values())
