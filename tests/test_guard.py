"""Round guards (server/guard.py) on the default config's model (test_efficientnet).

Updates are whole model states as the loop unpacks them: the previous global model plus a
small per-site change; the attacks are the ones seen in the findings (one crafted
BatchNorm running variance; a fixed-direction or sign-flipped update scaled up).
"""

import re

import numpy as np
import pytest

from common.config import RunConfig
from common.models import get_weights, set_weights
from server.guard import (
    leave_one_out,
    model_output_error,
    noise_images,
    statistics_error,
    weighted_mean,
)
from server.server_app import initial_model, statistics_of

IMAGE_SIZE = 32  # the packaged default's image-size
SEED = 7
SITES = ("a", "b", "c", "d")
WEIGHTS = {"a": 100.0, "b": 300.0, "c": 200.0, "d": 100.0}


@pytest.fixture(scope="module")
def initial():
    """The randomly initialised model's state: PyTorch's initial statistics (var 1, mean 0)."""
    model = initial_model(RunConfig.from_mapping({"model": "test_efficientnet"}), 7)
    return {k: v.numpy().copy() for k, v in get_weights(model).items()}


@pytest.fixture(scope="module")
def previous(initial):
    """The previous round's global model: statistics estimated (not the initial 1 and 0)."""
    rng = np.random.default_rng(1)
    state = dict(initial)
    for k, v in initial.items():
        if k.endswith("running_var"):
            state[k] = (v * rng.uniform(0.5, 2.0, v.shape)).astype(v.dtype)
        elif k.endswith("running_mean"):
            state[k] = (v + 0.1 * rng.normal(size=v.shape)).astype(v.dtype)
    return state


@pytest.fixture(scope="module")
def model(previous):
    model = initial_model(RunConfig.from_mapping({"model": "test_efficientnet"}), 7)
    set_weights(model, previous)
    return model


@pytest.fixture(scope="module")
def statistics(model):
    return statistics_of(model)


def honest_updates(previous: dict, model) -> dict[str, dict[str, np.ndarray]]:
    """Four sites: weights moved by small noise, running variances by a few percent,
    running means by a little, step counters advanced."""
    params = {n for n, _ in model.named_parameters()}
    rng = np.random.default_rng(0)
    out = {}
    for site in SITES:
        state = {}
        for k, v in previous.items():
            if k in params:
                state[k] = (v + 1e-3 * rng.normal(size=v.shape)).astype(v.dtype)
            elif k.endswith("running_var"):
                state[k] = (v * rng.uniform(0.9, 1.1, v.shape)).astype(v.dtype)
            elif k.endswith("running_mean"):
                state[k] = (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype)
            else:  # num_batches_tracked
                state[k] = v + 20
        out[site] = state
    return out


def output_check(model, previous, statistics):
    """What the loop does: statistics, then outputs against the previous model's scale."""
    fresh = initial_model(RunConfig.from_mapping({"model": "test_efficientnet"}), 7)
    _, scale = model_output_error(model, IMAGE_SIZE, SEED)

    def check(state: dict) -> str | None:
        if why := statistics_error(state, previous, statistics):
            return why
        set_weights(fresh, state)
        return model_output_error(fresh, IMAGE_SIZE, SEED, previous_scale=scale)[0]

    return check


def test_honest_updates_pass_both_checks(model, previous, statistics):
    updates = honest_updates(previous, model)
    mean = weighted_mean(updates, WEIGHTS)
    assert mean["bn1.num_batches_tracked"].dtype == previous["bn1.num_batches_tracked"].dtype
    assert statistics_error(mean, previous, statistics) is None
    for state in updates.values():  # each site's own statistics too
        assert statistics_error(state, previous, statistics) is None
    why, before = model_output_error(model, IMAGE_SIZE, SEED)
    assert why is None and 0 < before < 1  # a fresh head: small logits
    check = output_check(model, previous, statistics)
    assert check(mean) is None
    assert leave_one_out(updates, WEIGHTS, check) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1e3, r"^running variance (\S+)\[5\] = -\S+ \(previous \S+\) is negative$"),
        (1e30, r"^running variance (\S+)\[5\] = \S+e\+29 \(previous \S+\) changed by a factor "),
        (np.inf, r"^statistic (\S+)\[5\] = inf \(previous \S+\) is not finite$"),
    ],
)
def test_one_crafted_running_variance_is_caught_and_its_site_named(
    model, previous, statistics, value, message
):
    updates = honest_updates(previous, model)
    key = sorted(k for k in statistics if k.endswith("running_var"))[3]
    updates["c"][key][5] = value
    mean = weighted_mean(updates, WEIGHTS)
    why = statistics_error(mean, previous, statistics)
    assert why is not None
    match = re.match(message, why)
    assert match and match.group(1) == key, why
    check = output_check(model, previous, statistics)
    assert leave_one_out(updates, WEIGHTS, check) == "c"


def test_running_mean_moved_far_is_caught(model, previous, statistics):
    updates = honest_updates(previous, model)
    key = sorted(k for k in statistics if k.endswith("running_mean"))[0]
    mean = weighted_mean(updates, WEIGHTS)
    var = max(previous[key.replace("mean", "var")][2], mean[key.replace("mean", "var")][2])
    mean[key][2] = previous[key][2] + 200 * np.sqrt(var)  # 200 standard deviations
    why = statistics_error(mean, previous, statistics)
    assert re.match(
        rf"^running mean {re.escape(key)}\[2\] = \S+ \(previous \S+\) moved 200 standard "
        r"deviations \(> 100\)$",
        why,
    ), why
    assert statistics_error(mean, previous, statistics, ratio=300) is None


def test_initial_statistics_get_only_the_absolute_checks(initial, statistics):
    """From random init the first round replaces PyTorch's initial statistics (1 and 0)
    by real ones, by any factor; negative or non-finite ones are still refused."""
    key = sorted(k for k in statistics if k.endswith("running_var"))[0]
    new = dict(initial, **{key: np.full_like(initial[key], 300.0)})
    mean_key = key.replace("running_var", "running_mean")
    new[mean_key] = np.full_like(initial[mean_key], 50.0)
    assert statistics_error(new, initial, statistics) is None
    new[key] = np.full_like(initial[key], -1.0)
    assert statistics_error(new, initial, statistics).endswith(" is negative")


def test_only_normalisation_statistics_named_are_checked(previous, statistics):
    state = dict(previous)
    counter = next(k for k in statistics if k.endswith("num_batches_tracked"))
    state[counter] = np.array(-5, np.int64)  # not a running statistic
    assert statistics_error(state, previous, statistics) is None
    key = next(k for k in statistics if k.endswith("running_var"))
    state[key] = np.full_like(previous[key], -1.0)
    assert statistics_error(state, previous, statistics - {key}) is None
    assert statistics_error(state, previous, statistics).endswith(" is negative")
    # two failing statistics: the worst named, the others counted
    other = next(k for k in sorted(statistics) if k.endswith("running_var") and k != key)
    state[other] = np.full_like(previous[other], np.nan)
    why = statistics_error(state, previous, statistics)
    assert why.startswith(f"statistic {other}[0] = nan") and why.endswith(
        "(and 1 other statistic(s) out of bounds)"
    )


def test_a_tiny_honest_variance_is_not_refused(previous, statistics):
    key = next(k for k in statistics if k.endswith("running_var"))
    old = dict(previous, **{key: np.full_like(previous[key], 1e-9)})
    new = dict(previous, **{key: np.zeros_like(previous[key])})  # both under the floor
    assert statistics_error(new, old, statistics) is None


@pytest.mark.parametrize(("direction", "scale"), [("fixed", 30.0), ("sign-flip", 100.0)])
def test_an_update_scaled_up_makes_outputs_non_finite_and_its_site_is_named(
    model, previous, statistics, direction, scale
):
    """A fixed direction (+1 on every weight) or every weight pushed against its sign, at
    a scale that makes the weighted mean's outputs overflow (float32)."""
    updates = honest_updates(previous, model)
    for name, _ in model.named_parameters():
        v = previous[name]
        step = np.ones_like(v) if direction == "fixed" else -np.sign(v)
        updates["b"][name] = (v + scale * step).astype(v.dtype)
    mean = weighted_mean(updates, WEIGHTS)
    assert statistics_error(mean, previous, statistics) is None  # weights only
    fresh = initial_model(RunConfig.from_mapping({"model": "test_efficientnet"}), 7)
    set_weights(fresh, mean)
    why, out_scale = model_output_error(fresh, IMAGE_SIZE, SEED)
    assert why == "outputs on 8 of 8 noise images are not finite" and out_scale == np.inf
    check = output_check(model, previous, statistics)
    assert leave_one_out(updates, WEIGHTS, check) == "b"


def test_outputs_far_larger_than_the_previous_models_are_refused(model, previous):
    _, before = model_output_error(model, IMAGE_SIZE, SEED)
    state = dict(previous)
    for name, _ in model.named_parameters():
        state[name] = (previous[name] + 1.0).astype(previous[name].dtype)
    fresh = initial_model(RunConfig.from_mapping({"model": "test_efficientnet"}), 7)
    set_weights(fresh, state)
    why, after = model_output_error(fresh, IMAGE_SIZE, SEED, previous_scale=before)
    assert np.isfinite(after) and after > 1e3
    assert why.startswith(f"output scale {after:.4g} on noise images is more than 1000 x")
    assert model_output_error(fresh, IMAGE_SIZE, SEED)[0] is None  # no previous: finite only
    # a fresh head's tiny scale is floored at 1: logits of up to 1000 pass
    assert model_output_error(model, IMAGE_SIZE, SEED, previous_scale=1e-6)[0] is None
    assert fresh.training  # mode restored (initial_model returns a model in training mode)


def test_noise_images_are_seeded_uint8():
    a, b = noise_images(16, 3), noise_images(16, 3)
    assert a.dtype.is_floating_point is False and tuple(a.shape) == (8, 16, 16, 3)
    assert bool((a == b).all()) and not bool((a == noise_images(16, 4)).all())


def test_leave_one_out_picks_the_update_farthest_from_the_others_when_several_help():
    updates = {
        n: {"w": np.array([v], np.float32)} for n, v in zip("abcd", (0, 0, 3, 2), strict=True)
    }
    weights = dict.fromkeys("abcd", 1.0)

    def check(state: dict) -> str | None:
        return None if state["w"][0] <= 1.0 else f"w = {state['w'][0]}"

    # mean 1.25 fails; without c (0.67) or without d (1.0) it passes; c is farther
    assert leave_one_out(updates, weights, check) == "c"
    updates["b"]["w"][0] = 3  # two bad sites (0, 3, 3, 2): no single exclusion helps
    assert leave_one_out(updates, weights, check) is None
    assert leave_one_out({"a": {"w": np.array([5.0])}}, {"a": 1.0}, check) is None
