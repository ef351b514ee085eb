"""head-calibration = lda: the classifier refitted from the sites' feature statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.headfit import feature_stats, penultimate
from common.models import build_model
from server.lda import classifier_keys, lda_head, stats_error


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


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
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
    from client.headstats import private_stats
    from common.headfit import SENSITIVITY

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
    from server.lda import private_lda_head

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


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_simulation_under_dp_refits_from_noised_statistics(tmp_path: Path) -> None:
    """A real simulated federation under sample-level DP: the server sends a projection, every
    site releases its noised statistics once on the budget it kept for them, and each ends
    within target-epsilon, above what its rounds alone spent (the release is accounted)."""
    from simulations.runner import simulate
    from tests.helpers import SITES, TINY

    cfg = {**TINY, "num-server-rounds": 1, "local-steps": 2, "head-calibration": "lda"}
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


# ------------------------------------------- a DP release that holds for any server input
def _hostile_queries(dim: int, d: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(centre, projection) pairs a hostile server could send, several of which overflow."""
    rng = np.random.default_rng(7)
    big = np.finfo(np.float64).max
    centre, base = rng.normal(size=dim), rng.normal(size=(dim, d))
    one_column = base.copy()
    one_column[:, 0] *= 1e300
    with_inf, with_nan = base.copy(), base.copy()
    with_inf[::3, 1] = np.inf
    # The finding's attack: column j overflows exactly for the images whose feature 1 is
    # above t_j in size (NaN after the old clip), reading its maximum off the NaN pattern.
    thresholds = np.zeros((dim, d))
    thresholds[1] = big * np.geomspace(0.5, 1.0, d)  # t_j from 2 down to 1
    with_nan[::5, 2] = np.nan
    return {
        "huge": (centre, 1e300 * base),
        "float max": (centre, big * np.sign(base)),
        "one huge column": (centre, one_column),
        "inf entries": (centre, with_inf),
        "nan entries": (centre, with_nan),
        "thresholds": (np.zeros(dim), thresholds),
        "all zero": (centre, np.zeros((dim, d))),
        "rank one": (centre, np.outer(base[:, 0], np.ones(d))),
        "tiny": (centre, 1e-300 * base),
        "huge centre": (np.full(dim, big), base),
        "centre with inf and nan": (np.where(np.arange(dim) % 2, np.inf, np.nan), base),
    }


def _change(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The L2 distance of two releases over what is released independently (the counts, the
    sums and the moment's upper triangle: the mechanism's sensitivity norm)."""
    return float(
        np.sqrt(
            sum(np.sum((a[k] - b[k]) ** 2) for k in ("counts", "sums"))
            + np.sum(np.triu(a["moment"] - b["moment"]) ** 2)
        )
    )


def _assert_neighbours_within_sensitivity(model, images, labels, centre, projection) -> None:
    """Noiseless releases of the images and of each neighbour without image 0, 5 or the last
    (image 5 is the one whose feature 1 trips the "thresholds" query): all finite, and each
    neighbour within the sensitivity of the full release."""
    from client.headstats import private_stats
    from common.headfit import SENSITIVITY

    rng = np.random.default_rng(0)
    n = len(images)

    def release(keep: np.ndarray) -> dict[str, np.ndarray]:
        args = (model, images[keep], labels[keep], 7, centre, projection, 0.0)
        with np.errstate(all="raise", under="ignore"):  # no overflow or NaN escapes
            return private_stats(*args, rng=rng)

    full = release(np.arange(n))
    for drop in (0, 5, n - 1):
        less = release(np.delete(np.arange(n), drop))
        for stats in (full, less):
            for key, value in stats.items():
                assert np.isnan(value).sum() == 0 and np.isfinite(value).all(), key
        assert _change(full, less) <= SENSITIVITY * (1 + 1e-12), drop
        assert np.abs(full["counts"] - less["counts"]).sum() == 1.0  # counted, even if zeroed


def test_private_statistics_hold_their_sensitivity_for_any_projection() -> None:
    """Hostile queries (huge, float-max, inf or NaN entries that a lower layer would refuse,
    all-zero, rank-deficient, one huge column, a centre at float max): the noiseless release
    is finite everywhere and one image moves it by at most sqrt(3). (Before, a huge
    projection overflowed to inf, the clip made NaN, and which columns were NaN told the
    server per-class feature maxima, with no noise involved.)"""
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 7, dp=True)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    labels = np.arange(8) % 7
    for name, (centre, projection) in _hostile_queries(model.num_features).items():
        try:
            _assert_neighbours_within_sensitivity(model, images, labels, centre, projection)
        except AssertionError as e:
            raise AssertionError(f"query {name!r}: {e}") from e


def test_private_statistics_of_a_crafted_model_with_overflowing_features() -> None:
    """A model whose weights make some images' features inf or NaN in float32: those
    features count as 0, the release stays finite and within the sensitivity."""
    from client.headstats import clipped_projections

    torch.manual_seed(1)
    model = build_model("test_efficientnet", 7, dp=True)
    with torch.no_grad():
        model.conv_head.weight.mul_(1e37)  # the last conv before pooling
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    feats = penultimate(model, images, batch_size=1).numpy()
    assert not np.isfinite(feats).all()  # the crafting worked
    labels = np.arange(8) % 7
    rng = np.random.default_rng(2)
    centre, projection = rng.normal(size=model.num_features), rng.normal(size=(feats.shape[1], 4))
    _assert_neighbours_within_sensitivity(model, images, labels, centre, projection)
    _assert_neighbours_within_sensitivity(model, images, labels, centre, 1e300 * projection)
    z = clipped_projections(feats, centre, projection)
    assert np.isfinite(z).all() and (np.linalg.norm(z, axis=1) <= 1.0).all()


def test_clipped_projections_are_finite_unit_bounded_and_per_row() -> None:
    """The clip itself: rows of any size (overflowing, subnormal, exactly 1, 0) come out
    finite with norm <= 1, a small row is kept as it is, and a row depends on its own
    features only (the same row whatever the others are)."""
    from client.headstats import clipped_projections

    big = np.finfo(np.float64).max
    x = np.array(
        [
            [3.0, 4.0, 0.0],  # norm 5: scaled to (0.6, 0.8, 0)
            [0.3, 0.4, 0.0],  # norm 0.5: kept
            [big, big, big],  # float max: the clip must not overflow
            [np.inf, 1.0, 0.0],  # inf feature counts as 0
            [np.nan, np.nan, np.nan],
            [1e-310, 0.0, 0.0],  # subnormal
            [1.0, 0.0, 0.0],  # norm exactly 1
            [0.0, 0.0, 0.0],
            [1e200, -1e200, 1e200],  # squares overflow: the clip must not square them
        ]
    )
    z = clipped_projections(x, np.zeros(3), np.eye(3))
    assert np.isfinite(z).all() and (np.linalg.norm(z, axis=1) <= 1.0).all()
    np.testing.assert_allclose(z[0], [0.6, 0.8, 0.0], rtol=1e-9)
    np.testing.assert_array_equal(z[1], x[1])
    np.testing.assert_allclose(z[2], np.ones(3) / np.sqrt(3), rtol=1e-9)
    np.testing.assert_allclose(z[3], [0.0, 1.0, 0.0], rtol=1e-9)
    np.testing.assert_array_equal(z[4], 0.0)
    np.testing.assert_allclose(z[6], [1.0, 0.0, 0.0], rtol=1e-9)
    np.testing.assert_allclose(z[8], np.array([1, -1, 1]) / np.sqrt(3), rtol=1e-9)
    summed = clipped_projections(x, np.zeros(3), np.ones((3, 3)))  # row 2 overflows: zeroed
    np.testing.assert_array_equal(summed[2], 0.0)
    assert np.isfinite(summed).all() and (np.linalg.norm(summed, axis=1) <= 1.0).all()
    for i in range(len(x)):
        np.testing.assert_array_equal(
            clipped_projections(x[i : i + 1], np.zeros(3), np.eye(3))[0], z[i]
        )


def _query(centre: np.ndarray, projection: np.ndarray) -> SimpleNamespace:
    """What dp_query_projection reads of a query message: its content's "projection" record."""
    from flwr.app import Array, ArrayRecord, RecordDict

    record = ArrayRecord({"centre": Array(centre), "projection": Array(projection)})
    return SimpleNamespace(content=RecordDict({"projection": record}))


def test_site_refuses_a_projection_out_of_bounds() -> None:
    """The first line of defence (client/task.py): a non-finite or oversized centre or
    projection is refused with a one-line error naming it, before any budget is spent;
    what dp_projection sends (even at its 1e-12 scale floor) passes."""
    from client.headstats import MAX_PROJECTION_ENTRY
    from client.task import dp_query_projection

    dim, rng = 6, np.random.default_rng(3)
    centre, base = rng.normal(size=dim), np.linalg.qr(rng.normal(size=(dim, 3)))[0]
    dp_query_projection(_query(centre, base), dim)
    dp_query_projection(_query(centre, base / 1e-12), dim)  # dp_projection's largest
    dp_query_projection(_query(centre, np.zeros((dim, 3))), dim)  # harmless: releases zeros
    bad = {
        "'projection' has entries above 1e+12": [1e300 * base, 2 * MAX_PROJECTION_ENTRY * base],
        "'projection' is not finite": [np.where(base > 0, np.inf, base), base * np.nan],
        "'centre' has entries above": [np.full(dim, 1e300)],
        "'centre' is not finite": [np.full(dim, np.nan)],
    }
    for words, values in bad.items():
        for value in values:
            query = (value, base) if "centre" in words else (centre, value)
            with pytest.raises(ValueError, match=re.escape(words)):
                dp_query_projection(_query(*query), dim)
