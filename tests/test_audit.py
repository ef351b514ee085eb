"""Membership-inference audit: metric correctness on hand-made scores, and real attacks on a
real (tiny) timm model that either memorised its members or never saw them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from common.config import RunConfig
from common.data.site_data import SiteData
from common.models import build_model
from common.train import TrainConfig, train_local
from simulations.audit import attack_metrics, audit_model, plot_audit, tpr_at_fpr
from simulations.runner import default_config

CLASSES = [f"c{i}" for i in range(7)]


@pytest.fixture(autouse=True)
def one_thread():
    """The CI box has 2 shared cores; torch's default thread pool oversubscribes them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_site(name: str, n_train: int, n_heldout: int, seed: int) -> SiteData:
    """Noise images with random labels: only memorisation can make members look special."""
    rng = np.random.default_rng(seed)
    sizes = {"train": n_train, "validation": n_heldout // 2, "test": n_heldout - n_heldout // 2}
    return SiteData(
        site=name,
        classes=CLASSES,
        images={s: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for s, n in sizes.items()},
        labels={s: rng.integers(0, len(CLASSES), n) for s, n in sizes.items()},
    )


def at_chance(n_members: int, n_nonmembers: int) -> float:
    """How far from 0.5 an attack's AUC may land on data the model never saw: 3.5 standard
    deviations of the AUC under the null (Mann-Whitney), 0.14 for 100 against 100. Measured
    on site "b" across six CPU numerics: 0.423-0.588 (100/100), 0.428-0.609 (50/50)."""
    return 3.5 * ((n_members + n_nonmembers + 1) / (12 * n_members * n_nonmembers)) ** 0.5


def run_config(**kw: object) -> dict:
    cfg = dict(default_config())
    cfg.update({"model": "test_resnet", "augment": False, "loss": "ce", "amp": False})
    cfg["proximal-mu"] = 0.0  # plain local training (the default mu is FedProx's, 0.001)
    cfg.update({"batch-size": 16, "lr": 0.003}, **kw)
    return cfg


@pytest.fixture(scope="module")
def overfitted():
    """A test_resnet trained 30 epochs on site "a"'s 100 train images; site "b" never seen.

    30 epochs, not fewer: at 15 the attack's TPR at 1% FPR on "a" spanned 0.24-0.97 across
    CPU numerics (one non-member's score sets the threshold); at 30, 0.65-0.98."""
    torch.set_num_threads(1)
    a = random_site("a", 100, 150, seed=1)
    b = random_site("b", 150, 100, seed=2)
    torch.manual_seed(0)
    model = build_model("test_resnet", len(CLASSES))
    cfg = run_config(**{"local-epochs": 30})
    metrics = train_local(
        model,
        torch.from_numpy(a.images["train"]),
        torch.from_numpy(a.labels["train"]),
        TrainConfig.from_run(RunConfig.from_mapping(cfg)),
        num_classes=len(CLASSES),
        seed=0,
    )
    return model, a, b, metrics


def test_tpr_at_fpr_hand_made() -> None:
    non = np.arange(100.0)  # non-member scores 0..99
    # 30 members far above every non-member, 20 tied with the top non-member (99), 50 low.
    mem = np.r_[np.full(30, 200.0), np.full(20, 99.0), np.full(50, -5.0)]
    m = attack_metrics(mem, non)
    # At threshold 99 exactly one non-member (1%) and 50 members are flagged.
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    # Half-way along the tie, a randomised threshold reaches TPR 0.3 + 0.5 * 0.2.
    y = np.r_[np.ones(100), np.zeros(100)]
    fpr, tpr, _ = roc_curve(y, np.r_[mem, non])
    assert tpr_at_fpr(fpr, tpr, 0.005) == pytest.approx(0.4)
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.3)
    assert tpr_at_fpr(fpr, tpr, 1.0) == pytest.approx(1.0)
    # AUC by hand: 30 members beat all, 20 beat 99 and tie 1, 50 beat 0 (all non >= 0).
    assert m["auc"] == pytest.approx((30 * 100 + 20 * 99.5) / (100 * 100))
    # With fewer than 100 non-members 1% FPR is below the ROC's resolution: not reported.
    few = attack_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert few["auc"] == 1.0 and np.isnan(few["tpr_at_1pct_fpr"])


def test_memorised_members_are_detected_and_unseen_ones_are_not(overfitted, tmp_path) -> None:
    model, a, b, metrics = overfitted
    assert metrics["train_loss"] < 1.0  # it did memorise the random labels
    result = audit_model(model, [a, b], seed=0)
    assert set(result) == {"a", "b"}
    # balanced by subsampling the larger group
    assert result["a"]["n_members"] == result["a"]["n_nonmembers"] == 100
    assert result["a"]["n_nonmembers_available"] == 150
    assert result["b"]["n_members"] == result["b"]["n_nonmembers"] == 100
    for attack in ("loss", "confidence"):
        assert result["a"]["attacks"][attack]["auc"] > 0.7
        assert abs(result["b"]["attacks"][attack]["auc"] - 0.5) < at_chance(100, 100)
    assert result["a"]["tpr_at_1pct_fpr"] > 0.3
    assert result["b"]["tpr_at_1pct_fpr"] < 0.15  # chance is 0.01, but n=100 is noisy
    # the same seed gives the same subsample and scores
    again = audit_model(model, [a, b], seed=0)
    assert again["b"]["attacks"]["loss"]["auc"] == result["b"]["attacks"]["loss"]["auc"]
    plot_audit(result, tmp_path / "audit.png")
    assert (tmp_path / "audit.png").stat().st_size > 5000


def test_reference_attack(overfitted) -> None:
    model, a, b, _ = overfitted
    with pytest.raises(ValueError, match="run_config"):
        audit_model(model, [a, b], reference=True)
    result = audit_model(
        model,
        [a, b],
        reference=True,
        run_config=RunConfig.from_mapping(run_config()),
        n_reference=1,
        reference_epochs=2,
    )
    # half of each site's held-out set trains the references; the other half is audited
    assert result["a"]["n_nonmembers_available"] == 75
    assert result["b"]["n_members"] == 50
    assert result["a"]["attacks"]["reference"]["auc"] > 0.7
    assert np.isnan(result["a"]["attacks"]["reference"]["tpr_at_1pct_fpr"])  # only 75 non-members
    assert abs(result["b"]["attacks"]["reference"]["auc"] - 0.5) < at_chance(50, 50)
    assert len(result["a"]["attacks"]["reference"]["roc_tpr"]) == 61
