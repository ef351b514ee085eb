"""head-calibration = lda: the classifier refitted from the sites' feature statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.headfit import classifier_keys, feature_stats, lda_head, penultimate, stats_error
from common.models import build_model


def _gaussians(rng: np.random.Generator, n: int, means: np.ndarray) -> tuple:
    """``n`` points per class around ``means`` (K x D), sharing one skewed covariance."""
    k, d = means.shape
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    x = np.concatenate([rng.normal(size=(n, d)) @ mix + means[c] for c in range(k)])
    return x, np.repeat(np.arange(k), n)


def _stats(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, np.ndarray]:
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, y, x)
    return {"counts": np.bincount(y, minlength=k).astype(float), "sums": sums, "moment": x.T @ x}


def _bacc(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def test_summed_site_statistics_give_the_pooled_head() -> None:
    """The sites' statistics add up exactly: their head is the one fitted on all points."""
    rng = np.random.default_rng(0)
    x, y = _gaussians(rng, 60, rng.normal(scale=3, size=(4, 6)))
    order = rng.permutation(len(y))
    parts = np.array_split(order[np.argsort(y[order], kind="stable")], 3)  # label-skewed
    w_sites, b_sites = lda_head([_stats(x[p], y[p], 4) for p in parts])
    w_all, b_all = lda_head([_stats(x, y, 4)])
    np.testing.assert_allclose(w_sites, w_all, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(b_sites, b_all, rtol=1e-8, atol=1e-8)


def test_lda_head_separates_classes_that_live_at_different_sites() -> None:
    """Each site holds one class only, the label skew that breaks FedAvg's head; the refit
    from their statistics classifies held-out points of every class."""
    rng = np.random.default_rng(1)
    means = rng.normal(scale=2.5, size=(3, 8))
    x, y = _gaussians(rng, 200, means)
    head = lda_head([_stats(x[y == c], y[y == c], 3) for c in range(3)])
    xt, yt = _gaussians(rng, 200, means)
    assert _bacc(yt, (xt @ head[0].T + head[1]).argmax(1)) > 0.9


def test_a_class_no_site_has_is_never_predicted() -> None:
    rng = np.random.default_rng(2)
    x, y = _gaussians(rng, 50, rng.normal(scale=3, size=(3, 5)))
    weight, bias = lda_head([_stats(x, y, 4)])  # class 3: no images anywhere
    assert np.all(weight[3] == 0) and bias[3] < bias[:3].min()
    assert 3 not in (rng.normal(size=(500, 5)) * 10 @ weight.T + bias).argmax(1)


def test_bad_statistics_are_named() -> None:
    rng = np.random.default_rng(3)
    x, y = _gaussians(rng, 10, rng.normal(size=(2, 3)))
    good = _stats(x, y, 2)
    assert stats_error(good, 2, 3, 20) == ""
    assert "shape" in stats_error({**good, "sums": good["sums"][:1]}, 2, 3, 20)
    assert "not finite" in stats_error({**good, "moment": good["moment"] * np.nan}, 2, 3, 20)
    assert "not 21 training images" in stats_error(good, 2, 3, 21)
    skew = good["moment"] + np.triu(np.ones((3, 3)), 1)
    assert "symmetric" in stats_error({**good, "moment": skew}, 2, 3, 20)
    assert "no 'counts'" in stats_error({"sums": good["sums"]}, 2, 3, 20)


def test_feature_statistics_of_a_real_model_match_its_classifier_input() -> None:
    """The statistics are sums over what the classifier sees, for timm's models."""
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 7)
    images = torch.randint(0, 255, (20, 16, 16, 3), dtype=torch.uint8)
    labels = np.arange(20) % 5
    stats = feature_stats(model, images, labels, 7)
    feats = penultimate(model, images).numpy()
    weight_key, bias_key = classifier_keys(model)
    assert model.state_dict()[weight_key].shape == (7, feats.shape[1])
    assert stats["counts"].tolist() == [4, 4, 4, 4, 4, 0, 0]
    np.testing.assert_allclose(stats["sums"][2], feats[labels == 2].sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats["moment"], feats.T @ feats, rtol=1e-6)
    assert stats_error(stats, 7, feats.shape[1], 20) == ""


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"central-dp": "server-fixed"}, "not covered by site-level DP"),
        ({"dp": True, "noise-multiplier": 1.0}, "set noise-multiplier=0"),
        ({"dp": True, "dp-head-share": 1.0}, "dp-head-share"),
        ({"personalize": "ditto"}, "personalize=ditto"),
    ],
)
def test_head_calibration_refused_where_it_cannot_apply(extra, words) -> None:
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_mapping({"head-calibration": "lda", **extra})


def test_simulation_refits_the_head_from_every_site(tmp_path: Path) -> None:
    """A real simulated federation: every site sends statistics, the server refits the best
    model's head, keeps it only if validation improves, and saves what it keeps."""
    from common.rundir import load_checkpoint
    from simulations.runner import simulate
    from tests.helpers import SITES, TINY

    cfg = {**TINY, "num-server-rounds": 2, "head-calibration": "lda"}
    simulate(None, cfg, out=tmp_path / "run")
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    cal = test["head_calibration"]
    assert cal["sites"] == SITES and not cal["failures"] and not cal["rejected"]
    assert cal["kept"] == (cal["validation_after"] > cal["validation_before"])
    seen = json.loads((tmp_path / "run" / "network.json").read_text())
    assert seen["query.feature_stats"]["stats"].startswith("ArrayRecord: feature statistics")
    # Synthetic features separate well: the refit wins on validation (0.26 -> 0.58 seen at
    # 3 rounds) and is what the best checkpoint holds, unlike the last round's plain head.
    assert cal["kept"] and cal["validation_after"] > cal["validation_before"] + 0.05
    weight_key, bias_key = classifier_keys(build_model(TINY["model"], 7))
    ck = tmp_path / "run" / "checkpoints"
    best, last = (load_checkpoint(ck / f"{n}.pt")["arrays"] for n in ("best", "last"))
    assert not torch.equal(best[weight_key], last[weight_key])
    assert best[bias_key].shape == (7,)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Head calibration (LDA from the feature statistics of rosendahl," in report


def test_degenerate_statistics_fail_with_a_reason() -> None:
    """One image per class leaves no within-class scatter: a ValueError the server logs
    (server/loop.py keeps the trained head), never a crash mid-run."""
    stats = {"counts": np.ones(2), "sums": np.eye(2), "moment": np.eye(2)}
    with pytest.raises(ValueError, match="too few images"):
        lda_head([stats])


def test_overflowing_statistics_give_no_head() -> None:
    """Statistics that pass the shape checks but overflow (a crafted or broken site) give a
    ValueError naming why, which the server and the baselines turn into "head kept"."""
    stats = {"counts": np.array([3.0, 3.0]), "sums": np.full((2, 2), 1e200), "moment": np.eye(2)}
    stats["moment"] = stats["moment"] * 1e308
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="not finite"):
        lda_head([stats])


def test_private_statistics_bound_what_one_image_changes() -> None:
    """Under DP each image's projected features are clipped to norm 1 whatever projection the
    server sends (here a hostile, huge one): removing one image moves the counts, sums and
    moment by at most sqrt(3) together, the sensitivity the noise is scaled to. Without
    noise the statistics are those of the clipped projections."""
    from common.headfit import SENSITIVITY, private_stats

    torch.manual_seed(0)
    model = build_model("test_efficientnet", 7)
    images = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    labels = np.arange(12) % 7
    dim = model.num_features
    rng = np.random.default_rng(0)
    centre, projection = rng.normal(size=dim), 1e6 * rng.normal(size=(dim, 4))

    def released(n: int) -> dict[str, np.ndarray]:
        args = (model, images[:n], labels[:n], 7, centre, projection, 0.0)
        return private_stats(*args, rng=rng)

    full, less = released(12), released(11)
    change = np.sqrt(
        sum(np.sum((full[k] - less[k]) ** 2) for k in ("counts", "sums"))
        + np.sum(np.triu(full["moment"] - less["moment"]) ** 2)
    )
    assert 0.99 < change <= SENSITIVITY + 1e-9
    z = (penultimate(model, images).numpy() - centre) @ projection
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(full["moment"], z.T @ z, rtol=1e-6, atol=1e-9)
    noised = private_stats(model, images, labels, 7, centre, projection, 2.0, rng=rng)
    assert np.abs(noised["counts"] - full["counts"]).max() > 0.1  # noise at std 2 sqrt(3)
    np.testing.assert_allclose(noised["moment"], noised["moment"].T)


def test_private_head_acts_on_the_models_own_features() -> None:
    """The head solved in the projected space is folded back into one linear layer on the
    model's features (W (x - c) P + b); a class whose noisy count is within the noise is
    treated as absent and never predicted."""
    from common.headfit import private_lda_head

    rng = np.random.default_rng(1)
    x, y = _gaussians(rng, 80, rng.normal(scale=3, size=(3, 10)))
    centre, projection = rng.normal(size=10), np.linalg.qr(rng.normal(size=(10, 6)))[0]
    z = (x - centre) @ projection
    stats = _stats(z, y, 4)  # class 3: no images
    stats["counts"][3] = 2.0  # noise that looks like two images
    weight, bias = private_lda_head([stats], centre, projection, noise_std=1.0)
    assert weight.shape == (4, 10) and bias.shape == (4,)
    small, small_bias = lda_head([_stats(z, y, 3)], shrinkage=0.5)
    np.testing.assert_allclose((x @ weight.T + bias)[:, :3], z @ small.T + small_bias, atol=1e-8)
    assert set(np.unique((x @ weight.T + bias).argmax(1))) <= {0, 1, 2}


def test_simulation_under_dp_refits_from_noised_statistics(tmp_path: Path) -> None:
    """A real simulated federation under sample-level DP: the server sends a projection, every
    site releases its noised statistics once on the budget it kept for them, and each ends
    within target-epsilon, above what its rounds alone spent (the release is accounted)."""
    from simulations.runner import simulate
    from tests.helpers import SITES, TINY

    cfg = {**TINY, "num-server-rounds": 1, "local-epochs": 1, "head-calibration": "lda"}
    out = simulate(None, {**cfg, "dp": True, "target-epsilon": 4.0}, out=tmp_path / "run")
    cal = out["test"]["head_calibration"]
    assert cal["sites"] == SITES and not cal["failures"] and not cal["rejected"]
    trained = out["rounds"][0]["epsilon"]
    assert all(trained[s] < cal["epsilon"][s] <= 4.0 for s in SITES)
    assert all(cal["epsilon"][s] > 3.9 for s in SITES)  # all planned rounds ran: budget spent
    seen = json.loads((tmp_path / "run" / "network.json").read_text())
    assert seen["query.feature_stats"]["stats"].startswith("ArrayRecord: feature statistics")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "noised (sample-level DP); each site's ε after them: rosendahl" in report
