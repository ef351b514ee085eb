"""Site-level DP (``central-dp``): Flower's clipping + noise wrappers around the base
strategy, their declared state, and the RDP accounting of the noise."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from common.config import RunConfig
from server.strategy_registry import ACCOUNTANT, NUMBER, StateField

# Site-level DP (``central-dp``): Flower's wrapper for each kind and the attributes of the
# wrapper that are its state: adaptive clipping moves its norm; fixed clipping may hold the
# accountant of the privacy spent so far.
_FIXED_STATE = MappingProxyType({"clipping_norm": NUMBER, "accountant": ACCOUNTANT})
_ADAPTIVE_STATE = MappingProxyType({"clipping_norm": NUMBER})
CENTRAL_DP_WRAPPERS: Mapping[str, tuple[type[Strategy], Mapping[str, StateField]]] = (
    MappingProxyType(
        {
            "server-fixed": (DifferentialPrivacyServerSideFixedClipping, _FIXED_STATE),
            "server-adaptive": (DifferentialPrivacyServerSideAdaptiveClipping, _ADAPTIVE_STATE),
            "client-fixed": (DifferentialPrivacyClientSideFixedClipping, _FIXED_STATE),
            "client-adaptive": (DifferentialPrivacyClientSideAdaptiveClipping, _ADAPTIVE_STATE),
        }
    )
)


def central_accountant(run: RunConfig, num_sites: int) -> Any:
    """Flower's RDP accountant for site-level DP: add/remove one site, no sampling credit.

    No amplification is claimed for sampling sites (Flower's fixed-clipping accounting only
    supports that), so the figure is valid however the loop picks sites.
    """
    from flwr.serverapp import RdpAccountant

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


def central_noise(run: RunConfig) -> float:
    """``central-noise``, or calibrated to spend ``central-epsilon`` over all planned rounds."""
    if run.central_epsilon > 0:
        return calibrate_central_noise(
            run.central_epsilon, run.num_server_rounds, run.central_delta
        )
    return run.central_noise


def wrap_central_dp(
    strategy: Strategy, run: RunConfig, num_sampled: int, num_sites: int
) -> Strategy:
    """Site-level DP: Flower's clipping + noise wrappers around the base strategy.

    Fixed clipping with FedAvg/FedProx gets Flower's accountant (its conditions: uniform
    FedAvg aggregation, which ``make_strategy`` sets up); the adaptive wrappers and FedOpt
    servers run without one, and the run says so instead of printing an epsilon.
    """
    kind = run.central_dp
    if kind == "":
        return strategy
    noise, clip = central_noise(run), run.central_clip
    cls, _ = CENTRAL_DP_WRAPPERS[kind]
    if kind in ("server-fixed", "client-fixed"):
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
