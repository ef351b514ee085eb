"""Strategy choice from the run config: Flower's own strategies, DP added as a wrapper."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
)

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
CENTRAL_DP = ("", "server-fixed", "server-adaptive")


def make_strategy(cfg: dict[str, Any], num_sampled: int) -> Strategy:
    """Build the aggregation strategy; client sampling is done by the loop (seeded).

    The strategy always sees exactly the sampled nodes (fraction 1.0, no minimum), so its own
    unseeded ``random.sample`` cannot change who trains.
    """
    name = str(cfg.get("strategy", "fedavg")).lower()
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,  # unused: the loop evaluates every site itself
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
    )
    if name == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=float(cfg.get("proximal-mu", 0.01)))
    elif name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        strategy = cls(**common, eta=float(cfg.get("server-lr", 0.01)), eta_l=float(cfg["lr"]))
    else:
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
    return wrap_central_dp(strategy, cfg, num_sampled)


def wrap_central_dp(strategy: Strategy, cfg: dict[str, Any], num_sampled: int) -> Strategy:
    """Site-level DP: Flower's clipping + noise wrappers around the base strategy."""
    kind = str(cfg.get("central-dp", "") or "")
    if kind == "":
        return strategy
    noise = float(cfg.get("central-noise", 0.5))
    clip = float(cfg.get("central-clip", 1.0))
    if kind == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, noise, clip, num_sampled)
    if kind == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise, num_sampled, initial_clipping_norm=clip
        )
    if kind in ("client-fixed", "client-adaptive"):
        # Flower's client-side wrappers expect every site to clip with its clipping mod;
        # without it the noised aggregate is meaningless (seen: a NaN global model).
        raise ValueError(
            f"central-dp={kind!r} needs Flower's clipping mod at every site, which the "
            "fedskin ClientApp does not install yet; use 'server-fixed' or 'server-adaptive'"
        )
    raise ValueError(f"unknown central-dp {kind!r}; choose one of {CENTRAL_DP}")


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
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    base = _base(strategy)
    for attr in ("m_t", "v_t"):
        if attr in state:
            setattr(base, attr, {k: np.asarray(v) for k, v in state[attr].items()})
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = state["clipping_norm"]
