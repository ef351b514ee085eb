"""Pooled metrics from site aggregates must match metrics computed on the pooled predictions."""

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from common.fedmetrics import site_summary
from server.pooling import pooled_metrics, weighted_balanced_accuracy

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _site(rng, n):
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += 1.5  # informative but imperfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_pooled_matches_sklearn_on_union():
    rng = np.random.default_rng(0)
    sites = [_site(rng, n) for n in (120, 45, 300)]
    summaries = [site_summary(y, p, len(CLASSES)) for y, p in sites]
    pooled = pooled_metrics(summaries, CLASSES)
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1] for s in sites])
    assert pooled["n"] == len(y)
    assert abs(pooled["balanced_accuracy"] - balanced_accuracy_score(y, p.argmax(1))) < 1e-12
    assert abs(pooled["accuracy"] - accuracy_score(y, p.argmax(1))) < 1e-12
    # AUROC from 50-bin histograms: close to the exact value, not equal.
    exact = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(pooled["auroc"] - exact) < 0.01
    mel = CLASSES.index("mel")
    assert abs(pooled["auroc_mel"] - roc_auc_score(y == mel, p[:, mel])) < 0.01


def test_summary_is_aggregate_only():
    rng = np.random.default_rng(1)
    y, p = _site(rng, 40)
    s = site_summary(y, p, len(CLASSES))
    assert set(s) == {"confusion", "score-hist"}
    assert len(s["confusion"]) == len(CLASSES) ** 2  # fixed size, whatever the site size
    assert sum(s["confusion"]) == 40


def test_missing_class_gives_nan_recall_not_crash():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    out = pooled_metrics([site_summary(y, p, 2)], ["benign", "malignant"])
    assert out["balanced_accuracy"] == 0.75
    assert 0.0 <= out["auroc_mel"] <= 1.0
    out = pooled_metrics([site_summary(np.zeros(3, int), p[:3], 2)], ["benign", "malignant"])
    assert np.isnan(out["recall_malignant"]) and np.isnan(out["auroc"])


def test_weighted_balanced_accuracy_is_sklearns_with_each_site_weighted_by_its_factor():
    """The loop's decision score: each site's confusion counts scaled by its factor equals
    sklearn's balanced accuracy with that factor as every one of the site's sample weights;
    factors of 1 give the pooled figure."""
    rng = np.random.default_rng(2)
    sites = {"a": _site(rng, 200), "b": _site(rng, 30)}
    c = len(CLASSES)
    confusions = {k: site_summary(y, p, c)["confusion"] for k, (y, p) in sites.items()}
    factors = {"a": 0.25, "b": 1.0}
    y = np.concatenate([y for y, _ in sites.values()])
    pred = np.concatenate([p.argmax(1) for _, p in sites.values()])
    weight = np.concatenate([np.full(len(y), factors[k]) for k, (y, _) in sites.items()])
    expected = balanced_accuracy_score(y, pred, sample_weight=weight)
    assert abs(weighted_balanced_accuracy(confusions, factors, c) - expected) < 1e-12
    pooled = pooled_metrics(
        [{"confusion": f, "score-hist": [0] * (c * 2 * 50)} for f in confusions.values()], CLASSES
    )
    assert weighted_balanced_accuracy(confusions, {}, c) == pooled["balanced_accuracy"]
