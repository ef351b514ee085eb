"""Sample-level DP: cumulative accounting across rounds, budget, persistence, every backbone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.config import RunConfig
from common.models import SUPPORTED_MODELS, build_model, get_weights, set_weights
from common.privacy import DPConfig, DPSession, rdp_epsilon, resolve_mode
from common.train import TrainConfig, train_local

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # opacus' default alphas


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(n: int = 16, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % 3


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def test_from_run() -> None:
    run = {"target-epsilon": 3, "dp-physical-batch": 8, "num-server-rounds": 5, "lr": 1.0}
    cfg = DPConfig.from_run(RunConfig.from_mapping(run))
    assert cfg.target_epsilon == 3.0 and cfg.physical_batch == 8 and cfg.total_rounds == 5
    with pytest.raises(ValueError, match="grad-sample-mode"):
        DPConfig(grad_sample_mode="magic")


def test_epsilon_of_a_history_is_opacus_accountants_to_the_bit() -> None:
    """rdp_epsilon computes one step's RDP once per (noise, rate) and scales it by the steps:
    the same floats as Opacus' RDPAccountant over the same entries (mixed noise levels,
    rates, step counts, deltas; a repeated entry, as a site's rounds give)."""
    from opacus.accountants import RDPAccountant

    histories = [
        ([(1.08, 0.5, 12)] * 3, 2e-3),
        ([(0.6, 0.05, 40), (2.5, 1.0, 1), (0.6, 0.05, 7)], 1e-5),
        ([(2.5, 0.5, 3), (1.08, 1.0, 1)], 2e-3),
    ]
    for history, delta in histories:
        accountant = RDPAccountant()
        accountant.history = list(history)
        assert rdp_epsilon(history, delta) == accountant.get_epsilon(delta=delta), history


def test_a_calibration_is_computed_once_per_machine_and_a_weakened_file_is_refused(
    tmp_path, monkeypatch
) -> None:
    """The noise multiplier for the same (epsilon, delta, rate, steps) is kept under
    FEDSKIN_HOME and read back by the next process as the same float; a kept value whose
    epsilon exceeds the target (a tampered file: less noise) is ignored and replaced."""
    import json

    from opacus.accountants.utils import get_noise_multiplier

    from common import privacy

    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path))
    args = (3.0, 1e-3, 0.25, 20)
    calibrate = privacy.calibrate_noise_multiplier
    calibrate.cache_clear()
    sigma = calibrate(*args)
    (kept,) = (tmp_path / "dp-calibration").glob("*.json")
    assert json.loads(kept.read_text()) == {"args": list(args), "sigma": sigma}
    fresh = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-3, sample_rate=0.25, steps=20, accountant="rdp"
    )
    assert sigma == fresh  # the bisection's own value, not an approximation

    calls = []
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: calls.append(kw) or 0.0)
    calibrate.cache_clear()  # as a new process: only the file remains
    assert calibrate(*args) == sigma and not calls

    kept.write_text(json.dumps({"args": list(args), "sigma": sigma / 2}))  # less noise
    calibrate.cache_clear()
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: fresh)
    assert calibrate(*args) == sigma
    assert privacy.rdp_epsilon([(sigma, 0.25, 20)], 1e-3) <= 3.0
    assert json.loads(kept.read_text())["sigma"] == sigma  # replaced
    calibrate.cache_clear()


def test_cumulative_epsilon_matches_independent_rdp_after_three_rounds() -> None:
    x, y = tiny(32)
    model = build_model("test_resnet", 3, dp=True)
    session = DPSession(DPConfig(target_epsilon=1.0, total_rounds=3), 32, 4, 2)
    assert session.delta == pytest.approx(1 / 320)
    cfg = TrainConfig(batch_size=4, augment=False)
    eps = []
    for _ in range(3):
        out = train_local(model, x, y, cfg, num_classes=3, dp=session)
        eps.append(session.epsilon())
        assert out["epsilon"] == pytest.approx(eps[-1]) and out["steps"] == 2
    assert eps[0] < eps[1] < eps[2] <= 1.0
    expected = independent_epsilon(session.noise_multiplier, 4 / 32, 3 * 2, session.delta)
    assert eps[2] == pytest.approx(expected, rel=0.01)
    # noise was calibrated for the whole planned run: it ends just under the target
    assert eps[2] > 0.97
    # the returned model is the plain module again, with the keys of a fresh DP build
    assert list(get_weights(model)) == list(get_weights(build_model("test_resnet", 3, dp=True)))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_budget_stops_rounds_exactly_when_next_would_exceed() -> None:
    x, y = tiny(32)
    model = build_model("test_resnet", 3, dp=True)
    session = DPSession(DPConfig(target_epsilon=2.0, total_rounds=2), 32, 2, 1)
    rounds = 0
    for _ in range(5):  # more rounds attempted than planned
        if not session.can_train_round():
            break
        train_local(
            model, x, y, TrainConfig(batch_size=2, augment=False), num_classes=3, dp=session
        )
        rounds += 1
        assert session.epsilon() <= 2.0
    steps_taken = sum(steps for *_, steps in session.accountant.history)  # Opacus' record
    assert rounds == 2 and steps_taken == 2 * session.steps_per_round
    assert session.epsilon_after_next_round() > 2.0
    # accounting-only check of the boundary over a longer run
    s = DPSession(DPConfig(target_epsilon=2.0, total_rounds=7), 1000, 50, 10)
    n = 0
    while s.can_train_round():
        s.record_steps(s.steps_per_round)
        n += 1
        assert s.epsilon() <= 2.0
    assert n == 7 and s.epsilon_after_next_round() > 2.0


def test_json_roundtrip_preserves_epsilon_and_noise() -> None:
    s = DPSession(DPConfig(target_epsilon=5.0, total_rounds=4), 500, 25, 20)
    s.record_steps(20)
    s.record_steps(20)
    restored = DPSession.from_json(s.to_json())
    assert restored.noise_multiplier == s.noise_multiplier
    assert restored.epsilon() == pytest.approx(s.epsilon())
    assert restored.can_train_round() == s.can_train_round()
    with pytest.raises(ValueError, match="sample rate"):
        DPSession(s.cfg, 400, 25, 20, state=s.to_json())
    explicit = DPSession(DPConfig(noise_multiplier=1.3, target_epsilon=0.0), 500, 25, 20)
    explicit.record_steps(10_000)
    assert explicit.noise_multiplier == 1.3 and explicit.can_train_round()


def test_physical_batches_and_grad_sample_modes_give_the_same_step() -> None:
    """Splitting a logical batch (as BatchMemoryManager does) and the per-sample gradient
    engine must not change the update: same seed -> same noise, same clipped sum."""
    x, y = tiny(16)
    init = get_weights(build_model("test_resnet", 3, dp=True))

    def run(physical: int, mode: str) -> dict[str, torch.Tensor]:
        model = build_model("test_resnet", 3, dp=True)
        set_weights(model, init)
        cfg = DPConfig(noise_multiplier=0.5, physical_batch=physical, grad_sample_mode=mode)
        session = DPSession(cfg, 16, 12, 1)
        train_local(
            model,
            x,
            y,
            TrainConfig(batch_size=12, augment=False, optimizer="sgd"),
            num_classes=3,
            dp=session,
            seed=3,
        )
        return get_weights(model)

    ref = run(16, "hooks")
    for physical, mode in [(3, "hooks"), (16, "functorch"), (5, "ghost")]:
        got = run(physical, mode)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{mode} {k}")
    assert any(not torch.equal(ref[k], init[k]) for k in ref)


def test_empty_poisson_batches_and_fedprox_under_dp() -> None:
    x, y = tiny(32)
    model = build_model("test_efficientnet", 3, dp=True)
    # q = 1/32: about a third of the logical batches are empty; each is still a noisy step
    session = DPSession(DPConfig(noise_multiplier=1.0, target_epsilon=0.0), 32, 1, 6)
    cfg = TrainConfig(batch_size=1, augment=True, proximal_mu=0.5)
    out = train_local(model, x, y, cfg, num_classes=3, dp=session)
    assert out["steps"] == 6 and sum(h[2] for h in session.accountant.history) == 6
    assert all(torch.isfinite(v).all() for v in get_weights(model).values())


@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_dp_step_works_for_every_model(name: str) -> None:
    x, y = tiny(2, size=32)
    model = build_model(name, 3, dp=True)
    before = get_weights(model)
    session = DPSession(DPConfig(noise_multiplier=1.0, target_epsilon=0.0), 2, 2, 1)
    t0 = time.perf_counter()
    out = train_local(
        model, x, y, TrainConfig(batch_size=2, augment=False), num_classes=3, dp=session
    )
    print(f"{name}: 1 DP step at 32 px in {time.perf_counter() - t0:.2f}s")
    after = get_weights(model)
    assert list(after) == list(before)
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len([k for k, _ in model.named_parameters()])
    assert out["epsilon"] > 0 and np.isfinite(out["epsilon"])


def test_auto_mode_picks_measured_fastest_engine_per_family() -> None:
    assert resolve_mode("auto", build_model("test_efficientnet", 3, dp=True)) == "functorch"
    assert resolve_mode("auto", build_model("test_resnet", 3, dp=True)) == "hooks"
    assert resolve_mode("ghost", build_model("test_resnet", 3, dp=True)) == "ghost"


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_crash_before_the_server_checkpoint_never_overspends(tmp_path) -> None:
    """The sites trained round 2 (their accountant files say so) but the server died before
    checkpointing it. The resumed server re-runs round 2: the sites count the lost round's
    spending, refuse to train beyond their budget, and the run still ends with test results.
    """
    import shutil

    from simulations.runner import simulate
    from tests.helpers import SITES, TINY

    state, out = tmp_path / "site-state", tmp_path / "run"
    # Two local steps: only the accounting matters here, not how well the model learns.
    cfg = dict(
        TINY,
        **{
            "num-server-rounds": 2,
            "local-steps": 2,
            "dp": True,
            "target-epsilon": 4.0,
            "state-dir": str(state),
        },
    )
    simulate(None, dict(cfg, **{"num-server-rounds": 1}), out=out)
    round1 = tmp_path / "round1.pt"
    shutil.copy(out / "checkpoints" / "last.pt", round1)
    full = simulate(None, cfg, out=out, resume=True)
    eps2 = full["rounds"][1]["epsilon"]
    assert sorted(eps2) == SITES and all(e <= 4.0 for e in eps2.values())

    shutil.copy(round1, out / "checkpoints" / "last.pt")  # the server lost round 2
    again = simulate(None, cfg, out=out, resume=True)
    redo = again["rounds"][1]
    assert redo["round"] == 2
    # Every site has already spent round 2: a third round's worth would exceed 4.0.
    assert redo["rejected"] == {site: "privacy budget spent" for site in SITES}
    assert redo["epsilon"] == pytest.approx(eps2)  # counted once, never reset, never above
    assert not redo["aggregated"] and sorted(again["test"]["sites"]) == SITES


def test_budget_kept_for_the_feature_statistics() -> None:
    """head-calibration = lda under DP: dp-head-share of the budget is set aside for the one
    release of the statistics. DP-SGD's noise is calibrated so that all planned rounds plus
    that release end just under target-epsilon; the rounds can never spend its part; the
    release is made once, and survives a restart."""
    share = DPSession(DPConfig(target_epsilon=4.0, total_rounds=5, head_share=0.5), 1000, 50, 10)
    plain = DPSession(DPConfig(target_epsilon=4.0, total_rounds=5), 1000, 50, 10)
    assert share.noise_multiplier > plain.noise_multiplier  # DP-SGD has less of the budget
    alone = independent_epsilon(share.head_noise, 1.0, 1, share.delta)
    assert alone == pytest.approx(2.0, rel=0.01)  # the release alone costs its share
    rounds = 0
    while share.can_train_round():
        share.record_steps(share.steps_per_round)
        rounds += 1
    assert rounds == 5
    before = share.epsilon()
    assert before < 3.9  # the statistics' part is still unspent
    restored = DPSession.from_json(share.to_json())
    assert restored.release_head() == share.head_noise
    assert 3.95 < restored.epsilon() <= 4.0  # all of it, and no more
    assert DPSession.from_json(restored.to_json()).head_released
    with pytest.raises(ValueError, match="released once"):
        restored.release_head()
    with pytest.raises(ValueError, match="no part of the privacy budget"):
        plain.release_head()
    over = DPSession(DPConfig(target_epsilon=4.0, total_rounds=5, head_share=0.5), 1000, 50, 10)
    over.record_steps(10 * over.steps_per_round)  # twice the planned rounds (a tampered file)
    with pytest.raises(ValueError, match="would spend epsilon"):
        over.release_head()


def _crafted(weight_scale: float = 1e38) -> torch.nn.Module:
    """A linear model whose class-0 score reads ten pixels at ``weight_scale``: an image
    bright there overflows to inf (its loss and gradient are NaN), a mid-grey one does not."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    with torch.no_grad():
        model[1].weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
        model[1].bias.zero_()
        model[1].weight[0] = 0.0
        model[1].weight[0, :10] = weight_scale  # channel 0, first ten pixels of row 0
    return model


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_a_crafted_model_cannot_make_one_image_leak_outside_the_noise(mode, monkeypatch) -> None:
    """The server crafts weights that make one image's gradient NaN. Opacus alone would clip
    it to 0 x inf = NaN and the whole update would be NaN: whether the image was in the
    batch, read off the reply with no noise. Its per-sample gradient is zeroed before the
    clip instead: the step is finite and equals the step without that image (noise 0,
    every image in the batch: q = 1; the mean is over the expected batch size)."""
    import common.train_dp

    x, y = tiny(4)
    x[:, 0, :10, 0] = 124  # mid-grey (about the ImageNet mean) in the pixels read at 1e38
    x[2, 0, :10, 0] = 255  # image 2: bright there, class-0 score inf

    def step(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        model = _crafted()
        n = len(images)
        cfg = DPConfig(noise_multiplier=1.0, target_epsilon=0.0, grad_sample_mode=mode)
        session = DPSession(cfg, n, n, 1)  # sample rate 1: every image in the one batch
        session.noise_multiplier = 0.0  # no noise: the comparison is exact
        train_cfg = TrainConfig(batch_size=n, augment=False, optimizer="sgd", lr=0.5, loss="ce")
        train_local(model, images, labels, train_cfg, num_classes=3, dp=session, seed=1)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    start = {k: v.detach().clone() for k, v in _crafted().state_dict().items()}
    keep = torch.tensor([0, 1, 3])
    with_it, without = step(x, y), step(x[keep], y[keep])
    assert all(torch.isfinite(v).all() for v in with_it.values())
    for k in start:  # SGD's first step: (w - w0) x expected batch = -lr x clipped sum
        torch.testing.assert_close(
            (with_it[k] - start[k]) * 4, (without[k] - start[k]) * 3, rtol=1e-5, atol=1e-6
        )
    assert not torch.equal(with_it["1.bias"], start["1.bias"])  # the others did train
    monkeypatch.setattr(common.train_dp, "zero_nonfinite_grad_samples", lambda opt: None)
    assert not torch.isfinite(step(x, y)["1.bias"]).all()  # the leak this closes


def test_nonfinite_per_sample_gradients_are_zeroed_whole() -> None:
    """A sample with a non-finite entry in any parameter's gradient loses its whole
    gradient (every parameter), the others are untouched; per-backward-pass lists too."""
    from types import SimpleNamespace

    from common.train_dp import zero_nonfinite_grad_samples

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3, 2))
    a.grad_sample = torch.ones(4, 2)
    b.grad_sample = torch.ones(4, 3, 2)
    a.grad_sample[1, 0] = float("nan")
    b.grad_sample[3, 2, 1] = float("inf")
    b.grad_sample[0, 0, 0] = 3e38  # finite: kept (Opacus' clip handles its size)
    zero_nonfinite_grad_samples(SimpleNamespace(params=[a, b]))
    assert a.grad_sample[[1, 3]].eq(0).all() and b.grad_sample[[1, 3]].eq(0).all()
    assert a.grad_sample[[0, 2]].eq(1).all() and b.grad_sample[0, 0, 0] == 3e38
    a.grad_sample = [torch.ones(2, 2), torch.full((1, 2), float("-inf"))]
    b.grad_sample = [torch.ones(2, 3, 2), torch.ones(1, 3, 2)]
    zero_nonfinite_grad_samples(SimpleNamespace(params=[a, b]))
    assert a.grad_sample[0].eq(1).all() and b.grad_sample[0].eq(1).all()
    assert a.grad_sample[1].eq(0).all() and b.grad_sample[1].eq(0).all()
