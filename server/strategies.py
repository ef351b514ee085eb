"""Strategy choice from the run config: Flower's own strategies, DP added as a wrapper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
)

from common.config import RunConfig, as_run_config

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
CENTRAL_DP = ("", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
# Site-level DP bounds each site's influence on the *mean* of clipped updates by C/m; a
# mean weighted by example counts would give a large site more and break that bound.
UNIFORM_WEIGHT_KEY = "site-weight"


def make_strategy(
    cfg: RunConfig | Mapping[str, Any], num_sampled: int, num_sites: int | None = None
) -> Strategy:
    """Build the aggregation strategy; client sampling is done by the loop (seeded).

    The strategy always sees exactly the sampled nodes (fraction 1.0, no minimum), so its own
    unseeded ``random.sample`` cannot change who trains. Under site-level DP every site's
    update weighs the same (the loop sets ``site-weight`` = 1 on each accepted reply).
    Its parameters come from the checked config (missing keys: the packaged defaults), so
    FedProx always gets a ``proximal-mu`` > 0 (common/config.py refuses 0).
    """
    run = as_run_config(cfg)
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,  # unused: the loop evaluates every site itself
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        weighted_by_key=UNIFORM_WEIGHT_KEY if run.central_dp else "num-examples",
    )
    if run.strategy == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif run.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=run.proximal_mu)
    elif run.strategy in ("fedadam", "fedyogi"):
        cls = FedAdam if run.strategy == "fedadam" else FedYogi
        strategy = cls(**common, eta=run.server_lr, eta_l=run.lr)
    else:  # RunConfig allows only STRATEGIES
        raise ValueError(f"unknown strategy {run.strategy!r}; choose one of {STRATEGIES}")
    return wrap_central_dp(strategy, run, num_sampled, num_sites or num_sampled)


def central_accountant(cfg: RunConfig | Mapping[str, Any], num_sites: int) -> Any:
    """Flower's RDP accountant for site-level DP: add/remove one site, no sampling credit.

    No amplification is claimed for sampling sites (Flower's fixed-clipping accounting only
    supports that), so the figure is valid however the loop picks sites.
    """
    from flwr.serverapp import RdpAccountant

    run = as_run_config(cfg)
    target = run.central_epsilon
    config = PrivacyConfig(
        target_delta=run.central_delta,
        population_size=num_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=target if target > 0 else None,
    )
    return RdpAccountant(config)


def central_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Site-level epsilon after ``rounds`` Gaussian releases with multiplier ``noise``."""
    from flwr.serverapp import GaussianPrivacyEvent, RdpAccountant

    acc = RdpAccountant(
        PrivacyConfig(
            delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
        )
    )
    acc.compose(GaussianPrivacyEvent(noise, 1, 1), count=rounds)
    return acc.get_epsilon(delta)


def calibrate_central_noise(target: float, rounds: int, delta: float) -> float:
    """Smallest noise multiplier (to 0.1%) whose ``rounds`` releases stay within ``target``."""
    lo, hi = 0.05, 1.0
    while central_epsilon(hi, rounds, delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"central-epsilon={target} is unreachable in {rounds} rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central_epsilon(mid, rounds, delta) > target else (lo, mid)
    return hi


def central_noise(cfg: RunConfig | Mapping[str, Any]) -> float:
    """``central-noise``, or calibrated to spend ``central-epsilon`` over all planned rounds."""
    run = as_run_config(cfg)
    if run.central_epsilon > 0:
        return calibrate_central_noise(
            run.central_epsilon, run.num_server_rounds, run.central_delta
        )
    return run.central_noise


def wrap_central_dp(
    strategy: Strategy, cfg: RunConfig | Mapping[str, Any], num_sampled: int, num_sites: int
) -> Strategy:
    """Site-level DP: Flower's clipping + noise wrappers around the base strategy.

    Fixed clipping with FedAvg/FedProx gets Flower's accountant (its conditions: uniform
    FedAvg aggregation, which ``make_strategy`` sets up); the adaptive wrappers and FedOpt
    servers run without one, and the run says so instead of printing an epsilon.
    """
    run = as_run_config(cfg)
    kind = run.central_dp
    if kind == "":
        return strategy
    noise, clip = central_noise(run), run.central_clip
    if kind in ("server-fixed", "client-fixed"):
        cls = (
            DifferentialPrivacyServerSideFixedClipping
            if kind == "server-fixed"
            else DifferentialPrivacyClientSideFixedClipping
        )
        accountant = None
        if type(strategy).aggregate_train is FedAvg.aggregate_train and noise > 0:
            accountant = central_accountant(run, num_sites)
        elif run.central_epsilon > 0:
            raise ValueError(
                f"central-epsilon needs Flower's accountant, which requires fixed clipping and "
                f"FedAvg/FedProx aggregation; strategy {run.strategy!r} aggregates "
                "differently. Set central-noise instead (no epsilon will be reported)."
            )
        return cls(strategy, noise, clip, num_sampled, accountant=accountant)
    if run.central_epsilon > 0:
        raise ValueError(
            f"central-epsilon needs Flower's accountant, which adaptive clipping ({kind}) "
            "does not support; use server-fixed or client-fixed, or set central-noise"
        )
    cls = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if kind == "server-adaptive"
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return cls(strategy, noise, num_sampled, initial_clipping_norm=clip)


def central_spent(strategy: Strategy) -> dict[str, float]:
    """Site-level epsilon spent so far (cumulative over rounds), if the strategy accounts it."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return {}
    return {
        "epsilon": float(spent.epsilon),
        "delta": float(spent.delta),
        "noise_multiplier": float(strategy.noise_multiplier),
    }


def _base(strategy: Strategy) -> Strategy:
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a resumed server needs to continue the strategy exactly (FedOpt moments)."""
    base = _base(strategy)
    state: dict[str, Any] = {}
    for attr in ("m_t", "v_t"):
        value = getattr(base, attr, None)
        if value:
            state[attr] = {k: np.asarray(v) for k, v in value.items()}
    for attr in ("clipping_norm",):  # adaptive clipping moves its norm
        if hasattr(strategy, attr):
            state[attr] = float(getattr(strategy, attr))
    if getattr(strategy, "accountant", None) is not None:  # site-level privacy spent so far
        state["accountant"] = strategy.accountant.state_dict()
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    base = _base(strategy)
    for attr in ("m_t", "v_t"):
        if attr in state:
            setattr(base, attr, {k: np.asarray(v) for k, v in state[attr].items()})
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = state["clipping_norm"]
    if "accountant" in state:
        if getattr(strategy, "accountant", None) is None:
            raise ValueError("the checkpoint has site-level privacy spending but this run has none")
        strategy.accountant.load_state_dict(state["accountant"])
