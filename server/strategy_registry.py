"""The strategy registry: each strategy's spec (factory, site-count rule, declared state) and
the f its rule allows with a round's updates. The factories register themselves in
server/strategies.py (imported wherever a strategy is built), the robust ones are in
server/robust.py, site-level DP in server/central_dp.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig

log = logging.getLogger("fedskin")


@dataclass(frozen=True)
class StateField:
    """How one attribute of a strategy is saved in a checkpoint and restored from it.

    ``save`` turns the attribute's value into storable data (numpy arrays, numbers, plain
    dicts and lists: common/rundir.py stores the arrays as tensors), or None to store
    nothing (no moments yet, no accountant); ``load`` takes the attribute's current value
    and the stored data and returns the value to set (it may update the current one)."""

    save: Callable[[Any], Any]
    load: Callable[[Any, Any], Any]


def load_accountant(accountant: Any, saved: Any) -> Any:
    if accountant is None:
        raise ValueError("the checkpoint has site-level privacy spending but this run has none")
    accountant.load_state_dict(saved)
    return accountant


ARRAYS_BY_NAME = StateField(  # FedOpt's moments: {array name: ndarray}, None before round 1
    save=lambda value: {k: np.asarray(v) for k, v in value.items()} if value else None,
    load=lambda _, saved: {k: np.asarray(v) for k, v in saved.items()},
)
ARRAY_LIST = StateField(  # FedAvgM's momentum: [ndarray, ...], None before round 2
    save=lambda value: None if value is None else [np.asarray(v) for v in value],
    load=lambda _, saved: [np.asarray(v) for v in saved],
)
NUMBER = StateField(save=float, load=lambda _, saved: float(saved))
ACCOUNTANT = StateField(  # Flower's RDP accountant: its own state_dict
    save=lambda accountant: None if accountant is None else accountant.state_dict(),
    load=load_accountant,
)


Factory = Callable[[RunConfig, int], Strategy]


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its factory and what :func:`register_strategy` declared.

    ``build(run, num_sampled)`` returns the base strategy (no DP wrapper). ``state``: the
    attributes of the built strategy that a resumed server needs (:class:`StateField`).
    ``sites`` = (a, b): f malicious updates need n >= a*f + b (``rule`` says it as the log
    lines do); ``adaptive_f``: each round lowers the configured f to what its updates
    allow; ``server_optimizer``: a server optimizer moves every array, statistics too
    (:func:`statistics_averaged_plainly`)."""

    name: str
    build: Factory
    state: Mapping[str, StateField]
    sites: tuple[int, int] | None = None
    rule: str = ""
    adaptive_f: bool = False
    server_optimizer: bool = False


_REGISTRY: dict[str, StrategySpec] = {}
REGISTRY: Mapping[str, StrategySpec] = MappingProxyType(_REGISTRY)  # name -> spec, read-only
# The attribute by which a built strategy names its registry entry (set by make_strategy).
NAME_ATTR = "fedskin_strategy"


# Attributes that belong to the site-level DP wrappers (server/central_dp.py declares them).
WRAPPER_STATE_KEYS = frozenset({"clipping_norm", "accountant"})


def register_strategy(
    name: str,
    *,
    state: Mapping[str, StateField] | None = None,
    sites: tuple[int, int] | None = None,
    rule: str = "",
    adaptive_f: bool = False,
    server_optimizer: bool = False,
) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(run, num_sampled) -> Strategy`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    if (sites is None) != (rule == "") or (adaptive_f and sites is None):
        raise ValueError(f"strategy {name!r}: a site-count rule needs both sites and rule")
    clash = set(state or {}) & WRAPPER_STATE_KEYS
    if clash:
        raise ValueError(f"strategy {name!r}: state {sorted(clash)} is the DP wrapper's")

    def decorate(factory: Factory) -> Factory:
        _REGISTRY[name] = StrategySpec(
            name,
            factory,
            MappingProxyType(dict(state or {})),
            sites,
            rule,
            adaptive_f,
            server_optimizer,
        )
        return factory

    return decorate


def strategy_spec(name: str) -> StrategySpec:
    """The registry entry of ``name``; ValueError naming the choices for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {tuple(REGISTRY)}") from None


def min_sites(strategy_name: str, f: int) -> int:
    """The fewest updates per round with which ``strategy_name`` tolerates ``f`` malicious
    ones: Krum/MultiKrum 2f+3 (n > 2f+2), Bulyan 4f+3, the trimmed mean (f cut at each
    end) and the median 2f+1; 1 for the others, which tolerate none (f > 0: ValueError)."""
    if f < 0:
        raise ValueError(f"f={f}: must be >= 0")
    sites = strategy_spec(strategy_name).sites  # (a, b): n >= a*f + b, declared at registration
    if sites is None:
        if f > 0:
            raise ValueError(f"strategy={strategy_name} tolerates no malicious update (f={f})")
        return 1
    a, b = sites
    return a * f + b


def largest_f(strategy_name: str, n: int) -> int:
    """The largest f that ``strategy_name``'s rule allows with ``n`` updates (the inverse of
    :func:`min_sites`); -1 when even f = 0 is impossible, 0 for non-robust strategies."""
    spec = REGISTRY.get(strategy_name)
    if spec is None or spec.sites is None:
        return 0 if n >= 1 else -1
    a, b = spec.sites
    return (n - b) // a


def round_f(name: str, configured: int, n: int, server_round: int, why: str = "") -> int:
    """``configured`` lowered to what ``n`` updates allow; one log line when it is lower."""
    used = min(configured, largest_f(name, n))
    if used < configured:
        log.warning(
            "round %d: %s with %d updates tolerates f=%d (configured %d%s; %s)",
            server_round,
            name,
            n,
            used,
            configured,
            why,
            REGISTRY[name].rule,
        )
    return used


def too_few(name: str, n: int, server_round: int) -> bool:
    if n >= min_sites(name, 0):
        return False
    log.error(
        "round %d: %s cannot aggregate %d updates even with f=0 (%s); not aggregated",
        server_round,
        name,
        n,
        REGISTRY[name].rule,
    )
    return True
