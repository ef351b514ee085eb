"""Site-level ("central") DP: Flower's wrappers and clipping mod, Flower's accountant.

The reported site-level epsilon is checked against Google's dp-accounting called directly,
the client-side clipping against the norm of what a site sends, and the budget against a
resumed run that would overspend it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client.client_app import central_dp_mod
from server.central_dp import calibrate_central_noise, central_epsilon
from simulations.runner import simulate
from tests.helpers import SITES, TINY, assign_message_id
from tests.ray_harness import on_ray


def reference_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Gaussian mechanism composed ``rounds`` times, add/remove one site, no sampling."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(noise), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("target,rounds", [(1.0, 20), (8.0, 5), (3.0, 2)])
def test_calibrated_noise_spends_the_target(target, rounds):
    noise = calibrate_central_noise(target, rounds, 1e-3)
    eps = reference_epsilon(noise, rounds, 1e-3)
    assert eps <= target * 1.0001 and eps >= target * 0.99, (noise, eps)
    assert math.isclose(central_epsilon(noise, rounds, 1e-3), eps, rel_tol=0.01)


def _train_message(weights: list[np.ndarray], clip: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({f"w{i}": Array(w) for i, w in enumerate(weights)}),
            "config": ConfigRecord({"clipping_norm": clip, "server-round": 1}),
        }
    )
    return assign_message_id(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), "m1")


def _context(central: str) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"central-dp": central}
    )


def _site_update(start: list[np.ndarray], step: float):
    def train(msg: Message, ctxt: Context) -> Message:
        new = {f"w{i}": Array(w + step) for i, w in enumerate(start)}
        return Message(
            RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"n": 1})}),
            reply_to=msg,
        )

    return train


def _update_norm(reply: Message, start: list[np.ndarray]) -> float:
    got = reply.content.array_records["arrays"].to_numpy_ndarrays()
    return float(np.sqrt(sum(np.sum((g - s) ** 2) for g, s in zip(got, start, strict=True))))


@pytest.fixture
def task_identity():
    """Messages take their run from the process' task identity, set by Flower in a run."""
    from simulations.flower_adapter import task_identity as identity

    with identity(run_id=1, node_id=1):
        yield


@pytest.mark.usefixtures("task_identity")
def test_client_side_clipping_mod_bounds_what_leaves_the_site():
    start = [np.zeros((4, 4), np.float32), np.ones(3, np.float32)]
    train = _site_update(start, step=1.0)  # update norm sqrt(19) = 4.36
    for central, expected in (("client-fixed", 0.5), ("", math.sqrt(19))):
        reply = central_dp_mod(_train_message(start, 0.5), _context(central), train)
        assert _update_norm(reply, start) == pytest.approx(expected, rel=1e-5), central
    # Adaptive clipping also tells the server whether the update needed clipping.
    reply = central_dp_mod(_train_message(start, 0.5), _context("client-adaptive"), train)
    assert _update_norm(reply, start) == pytest.approx(0.5, rel=1e-5)
    assert reply.content.metric_records["metrics"]["norm_bit"] == 1  # Flower: 1 = was clipped


@pytest.fixture(scope="module")
def site_level_run(tmp_path_factory, ray_head):
    """Client-side clipping, noise calibrated to spend central-epsilon over 2 rounds."""
    out = tmp_path_factory.mktemp("cdp") / "run"
    cfg = dict(
        TINY,
        **{
            "num-server-rounds": 2,
            "central-dp": "client-fixed",
            "central-epsilon": 50.0,
            "central-delta": 1e-3,
            "central-clip": 1.0,
            "min-train-nodes": 4,
        },
    )
    with on_ray(ray_head):  # the session's Ray head node (conftest.py)
        return out, cfg, simulate(None, cfg, out=out)


def test_site_level_epsilon_is_reported_and_exact(site_level_run):
    _, cfg, metrics = site_level_run
    noise = calibrate_central_noise(50.0, 2, 1e-3)
    for r, record in enumerate(metrics["rounds"], start=1):
        assert record["aggregated"] and sorted(record["train"]) == SITES
        got = record["central"]["epsilon"]
        assert math.isclose(got, reference_epsilon(noise, r, 1e-3), rel_tol=0.01), (r, got)
        assert record["central"]["delta"] == 1e-3
    assert metrics["rounds"][-1]["central"]["epsilon"] <= 50.0


def test_site_level_model_stays_finite(site_level_run):
    out, _, _ = site_level_run
    weights = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["arrays"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # GroupNorm, no BatchNorm statistics: noised running variances would go negative.
    assert not any("running_var" in k for k in weights), sorted(weights)[:5]


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_site_level_budget_survives_resume_and_stops_training(site_level_run):
    """Resuming with more rounds than budgeted: the restored accountant refuses round 3."""
    out, cfg, _ = site_level_run
    metrics = simulate(None, dict(cfg, **{"num-server-rounds": 3}), out=out, resume=True)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]  # round 3 would overspend
    assert "privacy budget" in metrics["test"]["stopped"]
    assert sorted(metrics["test"]["sites"]) == SITES  # the model trained so far is scored
