"""server/headcheck.py: the sites' feature statistics screened before the head refit.

Honest statistics come from Gaussian class clusters spread over sites of uneven size with
HAM10000's class mix, one class almost only at one site (as akiec is on the real sources);
under DP they get the Gaussian noise of :func:`client.headstats.private_stats` (the moment's
upper triangle, mirrored), or go through ``private_stats`` itself. The attacks are the
crafted statistics the current loop kept: shifted class sums, a non-PSD moment, counts of
-1e9 with a declared std of 1e-300, and a std below what the run's budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import nn

from client.headstats import private_stats
from common.config import RunConfig
from common.headfit import SENSITIVITY
from common.privacy import DPConfig, DPSession
from server.headcheck import (
    MIN_INFLUENCE,
    counts_error,
    dp_moment_bound,
    head_change,
    head_fitter,
    influence,
    influence_drops,
    min_head_noise_std,
    moment_error,
    noise_error,
    screen_statistics,
)
from server.lda import lda_head, private_lda_head

K = 7
MEL = 1
HUB = 4  # akiec: almost only at one site
PROPS = np.array([0.67, 0.11, 0.11, 0.05, 0.03, 0.014, 0.011])
SIZES = (400, 3300, 2200, 3900)  # uneven, as the HAM10000 sources
STD = 1.8  # the head's noise std at target-epsilon 8, dp-head-share 0.5


class Clusters:
    """Gaussian class clusters shared by the sites, each site with its own offset."""

    def __init__(self, rng: np.random.Generator, dim: int, dp: bool) -> None:
        self.rng, self.dim, self.dp = rng, dim, dp
        scale, spread = (0.12, 0.3) if dp else (0.45, 1.0)  # overlapping classes
        self.means = rng.normal(scale=scale, size=(K, dim)) + (0.0 if dp else 3.0)
        self.mix = spread * (rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim))

    def draw(self, y: np.ndarray, offset: np.ndarray | float = 0.0) -> np.ndarray:
        x = self.rng.normal(size=(len(y), self.dim)) @ self.mix + self.means[y] + offset
        if self.dp:  # features clipped to norm 1, as private_stats does
            return x * np.minimum(1.0, 1.0 / np.linalg.norm(x, axis=1, keepdims=True))
        return np.maximum(x, 0.0)  # ReLU-like features, far from 0

    def test_set(self, per_class: int = 300) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(K), per_class)
        return self.draw(y), y


def _stats(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    sums = np.zeros((K, x.shape[1]))
    np.add.at(sums, y, x)
    return {"counts": np.bincount(y, minlength=K).astype(float), "sums": sums, "moment": x.T @ x}


def _noised(stats: Mapping[str, np.ndarray], rng: np.random.Generator, std: float) -> dict:
    """The Gaussian mechanism of private_stats: every released number gets N(0, std^2)."""
    upper = np.triu(rng.normal(0.0, std, stats["moment"].shape))
    return {
        "counts": stats["counts"] + rng.normal(0.0, std, K),
        "sums": stats["sums"] + rng.normal(0.0, std, stats["sums"].shape),
        "moment": stats["moment"] + upper + np.triu(upper, 1).T,
    }


def honest_sites(
    seed: int, dim: int = 32, dp: bool = False, hub_site: int = 0
) -> tuple[dict[str, dict[str, np.ndarray]], Clusters]:
    """Four sites of SIZES, HAM10000's class mix, 90 % of akiec at ``hub_site``."""
    rng = np.random.default_rng(seed)
    clusters = Clusters(rng, dim, dp)
    hub_total = int(sum(SIZES) * PROPS[HUB] / PROPS.sum())
    others = np.where(np.arange(K) == HUB, 0.0, PROPS)
    out = {}
    for s, n in enumerate(SIZES):
        n_hub = int(hub_total * (0.9 if s == hub_site else 0.1 / (len(SIZES) - 1)))
        y = np.concatenate([rng.choice(K, n - n_hub, p=others / others.sum()), np.full(n_hub, HUB)])
        offset = rng.normal(scale=0.1 if dp else 0.3, size=dim)  # each site's own scanner
        stats = _stats(clusters.draw(y, offset), y)
        out[f"site{s}"] = _noised(stats, rng, STD) if dp else stats
    return out, clusters


def _n_train(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, int]:
    return {name: int(round(s["counts"].sum())) for name, s in stats.items()}


def shifted_sums(stats: Mapping[str, np.ndarray], scale: float, consistent: bool = True) -> dict:
    """Melanoma's sums moved far along one direction, so that its LDA bias falls by
    thousands; ``consistent``: the moment moved along, so that every per-site check holds
    (the class scatter is the honest one)."""
    out = {k: np.array(v, dtype=np.float64) for k, v in stats.items()}
    count, old = out["counts"][MEL], out["sums"][MEL].copy()
    new = old + scale * count * np.ones_like(old) / np.sqrt(len(old))
    out["sums"][MEL] = new
    if consistent:
        out["moment"] += (np.outer(new, new) - np.outer(old, old)) / count
    return out


def _bacc(head: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    pred = (x @ head[0].T + head[1]).argmax(axis=1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(K)]))


def _private_head(stats: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    dim = next(iter(stats.values()))["moment"].shape[0]
    total = float(np.sqrt(len(stats))) * STD
    return private_lda_head([stats[n] for n in sorted(stats)], np.zeros(dim), np.eye(dim), total)


# ---------------------------------------------------------------------- the run's minimum std
def test_min_head_noise_std_is_what_a_site_calibrates() -> None:
    """The bound equals the std a site's DPSession releases its statistics at; a site whose
    own budget is stricter (smaller epsilon, larger n_train with delta = 1/(10 n)) has a
    larger std; target-delta = 0 needs the site's n_train."""
    run = RunConfig.from_flat(
        {"dp": True, "head-calibration": "lda", "target-epsilon": 8.0, "dp-head-share": 0.5}
    )
    session = DPSession(DPConfig.from_run(run), 2000, 32, 10)
    assert min_head_noise_std(run, 2000) == pytest.approx(session.head_noise * SENSITIVITY)
    assert min_head_noise_std(run, 20000) > min_head_noise_std(run, 2000)
    stricter = RunConfig.from_flat(
        {"dp": True, "head-calibration": "lda", "target-epsilon": 4.0, "dp-head-share": 0.5}
    )
    assert min_head_noise_std(stricter, 2000) > min_head_noise_std(run, 2000)
    assert min_head_noise_std(run, 2000, head_share=1.0) < min_head_noise_std(run, 2000)
    with pytest.raises(ValueError, match="n_train"):
        min_head_noise_std(run)
    pinned = RunConfig.from_flat({"dp": True, "head-calibration": "lda", "target-delta": 1e-5})
    assert min_head_noise_std(pinned) == min_head_noise_std(pinned, 7)


# ---------------------------------------------------------------------- check 1: counts
def test_counts_error_without_dp() -> None:
    assert counts_error(np.array([3.0, 0.0, 5.0]), 8, None) == ""
    assert counts_error(np.array([3.0, 0.0, 5.0]), None, None) == ""
    assert "not whole non-negative" in counts_error(np.array([9.0, -1.0, 0.0]), 8, None)
    assert "not whole non-negative" in counts_error(np.array([3.5, 0.0, 4.5]), 8, None)
    assert "not the 9 training images" in counts_error(np.array([3.0, 0.0, 5.0]), 9, None)


def test_counts_error_under_dp_allows_the_noise_only() -> None:
    """Honest noised counts (a class with no image included) pass in 2000 draws; a count
    below -5 stds, or a sum far from the pinned size, does not."""
    rng = np.random.default_rng(0)
    true = np.array([0.0, 3.0, 40.0, 900.0, 0.0, 12.0, 45.0])
    for _ in range(2000):
        assert counts_error(true + rng.normal(0, STD, K), 1000, STD) == ""
    assert "below" in counts_error(true - np.eye(K)[0] * 6 * STD, None, STD)
    assert "not within" in counts_error(true + np.eye(K)[3] * 500, 1000, STD)
    assert "below" in counts_error(np.full(K, -1e9), None, 1e-300)


# ---------------------------------------------------------------------- check 2: the moment
def test_moment_error_without_dp() -> None:
    stats, _ = honest_sites(1)
    for site in stats.values():
        assert moment_error(site, None) == ""
        rounded = {k: v.astype(np.float32).astype(np.float64) for k, v in site.items()}
        assert moment_error(rounded, None) == ""  # a site that sends float32
    site = dict(stats["site1"])
    u = np.ones(32) / np.sqrt(32)
    site["moment"] = site["moment"] - 2 * np.trace(site["moment"]) * np.outer(u, u)
    assert "not positive semi-definite" in moment_error(site, None)
    site["moment"] = stats["site1"]["moment"] + np.triu(np.ones((32, 32)), 1)
    assert "not symmetric" in moment_error(site, None)
    naive = shifted_sums(stats["site1"], 30.0, consistent=False)  # sums that the moment denies
    assert "class sums do not fit the moment" in moment_error(naive, None)


@pytest.mark.parametrize("dim", [16, 64])
def test_moment_error_under_dp_allows_the_noise_spectral_norm(dim: int) -> None:
    """A zero moment (the worst case: every honest eigenvalue at 0) plus the DP noise
    passes in 300 draws; the bound is (2 sqrt(D) + 5 sqrt(2)) std, and the largest noise
    eigenvalue stays close to the semicircle edge 2 sqrt(D) std."""
    rng = np.random.default_rng(dim)
    zero = {"counts": np.zeros(K), "sums": np.zeros((K, dim)), "moment": np.zeros((dim, dim))}
    lows = []
    for _ in range(300):
        noised = _noised(zero, rng, STD)
        assert moment_error(noised, STD) == ""
        lows.append(np.linalg.eigvalsh(noised["moment"])[0])
    assert -min(lows) < dp_moment_bound(dim, STD)
    assert -np.mean(lows) == pytest.approx(2 * np.sqrt(dim) * STD, rel=0.15)
    crafted = dict(noised)
    crafted["moment"] = noised["moment"] - 2 * dp_moment_bound(dim, STD) * np.eye(dim)
    assert "below the noise's" in moment_error(crafted, STD)


# ---------------------------------------------------------------------- check 3: the noise std
def test_noise_error() -> None:
    assert noise_error(1.8, 1.8) == ""
    assert noise_error(1.8 * 0.99, 1.8) == ""  # the calibration's own bisection error
    assert noise_error(5.0, 1.8) == ""  # a stricter site: more noise
    assert "below the run's minimum" in noise_error(1.0, 1.8)
    assert "below the run's minimum" in noise_error(1e-300, 1.8)
    assert "not a positive number" in noise_error(None, 1.8)
    assert "not a positive number" in noise_error(float("nan"), 1.8)
    assert "not a positive number" in noise_error(0.0, 0.0)
    assert "above the maximum 20" in noise_error(1e6, 1.8, 20.0)
    assert noise_error(1e6, 1.8) == ""


# ---------------------------------------------------------------------- honest: nothing dropped
@pytest.mark.parametrize("seed", range(8))
def test_honest_heterogeneous_sites_are_kept(seed: int) -> None:
    """Uneven sites, HAM10000's class mix, akiec 90 % at one site: nothing dropped, and
    no leave-one-out change comes near the bound (the worst seen in 200 simulated runs of
    this kind was 0.40, for MIN_INFLUENCE = 2)."""
    stats, _ = honest_sites(seed, dim=(16, 64)[seed % 2], hub_site=seed % 4)
    kept, dropped = screen_statistics(stats, n_train=_n_train(stats))
    assert dropped == {}
    assert set(kept) == set(stats)
    assert max(influence(stats, head_fitter()).values()) < MIN_INFLUENCE / 2


@pytest.mark.parametrize("seed", range(6))
def test_honest_noised_sites_are_kept(seed: int) -> None:
    stats, _ = honest_sites(seed, dim=16, dp=True, hub_site=seed % 4)
    stds = dict.fromkeys(stats, STD)
    pinned = {f"site{s}": n for s, n in enumerate(SIZES)}
    kept, dropped = screen_statistics(stats, noise_std=stds, min_noise_std=1.7, n_train=pinned)
    assert dropped == {}
    assert set(kept) == set(stats)
    assert max(influence(stats, head_fitter(stds)).values()) < MIN_INFLUENCE * 0.8


class _Features(nn.Module):
    """A stand-in backbone for private_stats: mean colour -> 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.num_features = 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return torch.relu(self.proj(x))


def test_statistics_from_the_real_private_stats_are_kept() -> None:
    """Four sites' statistics released through client/headstats.py's private_stats at the
    noise the run's budget calibrates, declared as the client does (noise x SENSITIVITY):
    nothing dropped, and a site declaring half that std is."""
    torch.manual_seed(0)
    model = _Features()
    run = RunConfig.from_flat({"dp": True, "head-calibration": "lda", "target-delta": 1e-5})
    floor = min_head_noise_std(run)
    noise = floor / SENSITIVITY
    rng = np.random.default_rng(3)
    centre, projection = np.zeros(8), np.linalg.qr(rng.normal(size=(8, 4)))[0]
    stats, stds = {}, {}
    for s, n in enumerate((150, 300, 200, 250)):
        labels = rng.integers(0, K, n)
        colours = rng.integers(0, 256, (K, 3))[labels][:, None, None, :]
        images = np.clip(colours + rng.normal(0, 20, (n, 8, 8, 3)), 0, 255).astype(np.uint8)
        got = private_stats(
            model, torch.from_numpy(images), labels, K, centre, projection, noise, rng
        )
        stats[f"site{s}"], stds[f"site{s}"] = got, noise * SENSITIVITY
    kept, dropped = screen_statistics(stats, noise_std=stds, min_noise_std=floor)
    assert dropped == {} and len(kept) == 4
    stds["site2"] = floor / 2
    _, dropped = screen_statistics(stats, noise_std=stds, min_noise_std=floor)
    assert list(dropped) == ["site2"] and "below the run's minimum" in dropped["site2"]


# ---------------------------------------------------------------------- the findings' attacks
def _mel_predicted(head: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> float:
    return float(np.mean((x @ head[0].T + head[1]).argmax(axis=1) == MEL))


@pytest.mark.parametrize("seed", range(3))
def test_shifted_sums_fail_the_scatter_check(seed: int) -> None:
    """The finding: melanoma's sums shifted at one site (the moment left alone) wreck the
    refit. Without DP the site's class scatter is then not PSD: dropped, and the refit from
    the three kept sites scores within 0.05 balanced accuracy of the honest four-site one
    (what losing an honest site costs; a leave-one-out change, < 0.5 in these runs)."""
    honest, clusters = honest_sites(seed, dim=32, hub_site=seed % 4)
    attacker = f"site{(seed + 1) % 4}"
    stats = dict(honest) | {attacker: shifted_sums(honest[attacker], 300.0, consistent=False)}
    x, y = clusters.test_set()
    attacked, clean = lda_head(list(stats.values())), lda_head(list(honest.values()))
    assert _bacc(attacked, x, y) < _bacc(clean, x, y) - 0.3
    kept, dropped = screen_statistics(stats, n_train=_n_train(honest))
    assert list(dropped) == [attacker]
    assert dropped[attacker].startswith(f"site {attacker}: class sums do not fit the moment")
    refit = lda_head([kept[n] for n in sorted(kept)])
    assert _bacc(refit, x, y) > _bacc(clean, x, y) - 0.05


@pytest.mark.parametrize("seed", range(4))
def test_consistently_shifted_sums_are_dropped_by_leave_one_out(seed: int) -> None:
    """Melanoma's sums shifted with the moment moved along, so that every per-site check
    holds (the site's class scatter is its honest one): the head is inflated many times
    over (melanoma's mean pulled far off). Removing that site changes the head by far more
    than removing any other: dropped, and no other site; the refit is the honest one's
    within 0.05."""
    honest, clusters = honest_sites(seed, dim=32, hub_site=seed % 4)
    attacker = f"site{(seed + 1) % 4}"
    stats = dict(honest) | {attacker: shifted_sums(honest[attacker], 300.0)}
    x, y = clusters.test_set()
    attacked, clean = lda_head(list(stats.values())), lda_head(list(honest.values()))
    assert head_change(attacked, clean) > 3 * MIN_INFLUENCE
    kept, dropped = screen_statistics(stats, n_train=_n_train(honest))
    assert list(dropped) == [attacker]
    assert dropped[attacker].startswith(f"site {attacker}: removing it changes the head")
    refit = lda_head([kept[n] for n in sorted(kept)])
    assert _bacc(refit, x, y) > _bacc(clean, x, y) - 0.05
    assert _mel_predicted(refit, x) > 0.5 * _mel_predicted(clean, x)


@pytest.mark.parametrize("consistent", [False, True])
def test_shifted_sums_under_dp_break_the_clipping_bound(consistent: bool) -> None:
    """Under DP (no class-scatter check: it would divide noise by noisy counts) shifted
    sums are longer than clipped features can make them, or the moment's trace too large:
    dropped; the refit is the honest one's within 0.1 (DP noise)."""
    honest, clusters = honest_sites(4, dim=16, dp=True, hub_site=2)
    stds = dict.fromkeys(honest, STD)
    stats = dict(honest) | {"site1": shifted_sums(honest["site1"], 3.0, consistent)}
    x, y = clusters.test_set()
    assert _bacc(_private_head(stats), x, y) < _bacc(_private_head(honest), x, y) - 0.05
    kept, dropped = screen_statistics(stats, noise_std=stds, min_noise_std=1.7)
    assert list(dropped) == ["site1"] and "clipped features" in dropped["site1"]
    assert _bacc(_private_head(kept), x, y) > _bacc(_private_head(honest), x, y) - 0.1


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_drops_shifted_sums_under_dp_too(seed: int) -> None:
    """Leave-one-out alone (the per-site checks skipped) singles out the shifted site
    under DP as well: the second line behind the clipping bound."""
    honest, _ = honest_sites(seed, dim=16, dp=True, hub_site=seed % 4)
    stats = dict(honest) | {"site1": shifted_sums(honest["site1"], 30.0)}
    fit = head_fitter(dict.fromkeys(stats, STD))
    dropped = influence_drops(stats, fit)
    assert list(dropped) == ["site1"] and "removing it changes the head" in dropped["site1"]
    assert influence_drops(honest, fit) == {}


def test_a_non_psd_moment_is_dropped() -> None:
    """The finding: a moment with a large negative eigenvalue wrecks the pooled covariance
    (honest test 0.021). Dropped without and with DP, by the PSD check."""
    honest, clusters = honest_sites(5)
    u = np.ones(32) / np.sqrt(32)
    bad = dict(honest["site3"])
    bad["moment"] = bad["moment"] - 3 * np.trace(bad["moment"]) * np.outer(u, u)
    kept, dropped = screen_statistics(dict(honest) | {"site3": bad}, n_train=_n_train(honest))
    assert list(dropped) == ["site3"] and "not positive semi-definite" in dropped["site3"]
    x, y = clusters.test_set()
    assert (
        _bacc(lda_head(list(kept.values())), x, y)
        > _bacc(lda_head(list(honest.values())), x, y) - 0.03
    )

    noised, _ = honest_sites(5, dim=16, dp=True)
    bad = dict(noised["site3"])
    bad["moment"] = bad["moment"] - 1e4 * np.eye(16)
    stds = dict.fromkeys(noised, STD)
    _, dropped = screen_statistics(dict(noised) | {"site3": bad}, noise_std=stds, min_noise_std=1.7)
    assert list(dropped) == ["site3"] and "below the noise's" in dropped["site3"]


@pytest.mark.parametrize("floor", [0.0, 1.7])
def test_huge_negative_counts_with_a_tiny_std_are_dropped(floor: float) -> None:
    """The finding: counts of -1e9 declared with std 1e-300. Dropped by the std floor when
    the run gives one, and by the counts check even without it."""
    noised, _ = honest_sites(6, dim=16, dp=True)
    bad = dict(noised["site0"]) | {"counts": np.full(K, -1e9)}
    stds = dict.fromkeys(noised, STD) | {"site0": 1e-300}
    kept, dropped = screen_statistics(
        dict(noised) | {"site0": bad}, noise_std=stds, min_noise_std=floor
    )
    assert list(dropped) == ["site0"] and dropped["site0"].startswith("site site0: ")
    assert ("below the run's minimum" if floor else "count -1e+09 is below") in dropped["site0"]
    assert set(kept) == {"site1", "site2", "site3"}


def test_a_std_below_the_minimum_is_dropped_and_a_missing_one_too() -> None:
    noised, _ = honest_sites(7, dim=16, dp=True)
    stds = dict.fromkeys(noised, STD) | {"site2": 0.5}
    del stds["site3"]
    floors = dict.fromkeys(noised, 1.7)
    _, dropped = screen_statistics(noised, noise_std=stds, min_noise_std=floors)
    assert "site site2: declared noise std 0.5 is below the run's minimum 1.7" == dropped["site2"]
    assert "not a positive number" in dropped["site3"]
    assert set(dropped) == {"site2", "site3"}
    del floors["site1"]
    _, dropped = screen_statistics(
        noised, noise_std=dict.fromkeys(noised, STD), min_noise_std=floors
    )
    assert dropped == {"site1": "site site1: no minimum noise std is known for it"}


def test_wrong_shapes_are_dropped_against_the_majority() -> None:
    honest, _ = honest_sites(8)
    bad = dict(honest["site0"]) | {"counts": np.ones(K + 1)}
    _, dropped = screen_statistics(dict(honest) | {"site0": bad})
    assert list(dropped) == ["site0"] and "shape" in dropped["site0"]


def test_two_sites_are_not_judged_by_leave_one_out() -> None:
    """With two sites there is no majority to judge by: only the per-site checks run."""
    honest, _ = honest_sites(9)
    two = {"site0": honest["site0"], "site1": shifted_sums(honest["site1"], 300.0)}
    kept, dropped = screen_statistics(two)
    assert dropped == {} and set(kept) == set(two)


def test_three_sites_are_too_few_for_leave_one_out() -> None:
    """Why leave-one-out waits for four sites: with three under DP, removing the large
    honest site1 leaves the shifted site3 dominating melanoma, so site1's removal changes
    the head most and site1 would be blamed. By default nothing is dropped by it."""
    honest, _ = honest_sites(12, dim=16, dp=True, hub_site=1)
    three = {name: honest[name] for name in ("site0", "site1", "site3")}
    fit = head_fitter(dict.fromkeys(three, STD))
    attacked = three | {"site3": shifted_sums(three["site3"], 30.0)}
    assert list(influence_drops(attacked, fit, min_sites=3)) == ["site1"]  # the wrong one
    assert influence_drops(attacked, fit) == {}
    assert influence_drops(three, fit, min_sites=3) == {}


def test_a_site_without_which_the_head_is_solvable_is_dropped() -> None:
    """When the head of all sites cannot be solved and removing exactly one site makes it
    solvable, that site goes; when no single removal helps, nothing is dropped."""
    honest, _ = honest_sites(13, dim=16)

    def fit(stats: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if "site2" in stats:
            raise ValueError("the solved head is not finite")
        return lda_head(list(stats.values()))

    dropped = influence_drops(honest, fit)
    assert dropped == {"site2": "site site2: the head is unsolvable only with it"}

    def never(stats: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("too few images")

    assert influence_drops(honest, never) == {}
