"""Strategy choice from the run config: Flower's own strategies, DP added as a wrapper.

The robust rules tolerate f malicious updates only when a round has enough of them; the
f they use adapts to each round's updates (``f_used = min(configured f, largest_f)``, one
log line when it is smaller), so a round with a site missing still aggregates. The f of
``krum``/``multikrum``/``bulyan`` is ``robust-malicious``; that of ``fedtrimmedavg`` the
updates cut at each end (from ``trim-beta``); ``fedmedian`` has no f setting (its
breakdown point is one half). Minimum updates per round (:func:`min_sites`):

===============  =========  =====  =====  =====
strategy         rule       f = 0  f = 1  f = 2
===============  =========  =====  =====  =====
krum, multikrum  n > 2f+2   3      5      7
bulyan           n >= 4f+3  3      7      11
fedtrimmedavg    n >= 2f+1  1      3      5
fedmedian        n >= 2f+1  1      3      5
===============  =========  =====  =====  =====

Below f = 0's minimum a round keeps the global model (:func:`updates_needed`).

Each strategy is a short factory in :data:`REGISTRY`, registered by name with
:func:`register_strategy` (its site-count rule and the attributes that are its state
declared there); :func:`make_strategy` looks the name up and adds the site-level DP
wrapper (:data:`CENTRAL_DP_WRAPPERS`, which declares the wrappers' state the same way).
:func:`strategy_state` and :func:`load_strategy_state` save and restore exactly the
declared attributes (:class:`StateField`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedYogi,
    Strategy,
)

from common.config import ConfigError, RunConfig
from server.central_dp import CENTRAL_DP_WRAPPERS, wrap_central_dp
from server.robust import (
    AdaptiveBulyan,
    AdaptiveTrimmedAvg,
    SyncedFedAvgM,
    WeightKrum,
    select_on_weights,
)
from server.strategy_registry import (
    ARRAY_LIST,
    ARRAYS_BY_NAME,
    NAME_ATTR,
    REGISTRY,
    StateField,
    largest_f,
    load_accountant,
    min_sites,
    register_strategy,
    strategy_spec,
)

log = logging.getLogger("fedskin")

FEDAVGM_SERVER_LR = 1.0  # FedAvgM's server learning rate: fixed (server-lr is FedAdam's 0.01)
# Site-level DP bounds each site's influence on the *mean* of clipped updates by C/m; a
# mean weighted by example counts would give a large site more and break that bound.
UNIFORM_WEIGHT_KEY = "site-weight"

FEDOPT_STATE = MappingProxyType({"m_t": ARRAYS_BY_NAME, "v_t": ARRAYS_BY_NAME})
FEDAVGM_STATE = MappingProxyType({"momentum_vector": ARRAY_LIST})


def flower_options(run: RunConfig) -> dict[str, Any]:
    """The options every Flower strategy gets: it sees exactly the sampled nodes."""
    return dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,  # unused: the loop evaluates every site itself
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        weighted_by_key=UNIFORM_WEIGHT_KEY if run.central_dp else "num-examples",
    )


def make_strategy(run: RunConfig, num_sampled: int, num_sites: int | None = None) -> Strategy:
    """Build the aggregation strategy; client sampling is done by the loop (seeded).

    The strategy always sees exactly the sampled nodes (fraction 1.0, no minimum), so its own
    unseeded ``random.sample`` cannot change who trains. Under site-level DP every site's
    update weighs the same (the loop sets ``site-weight`` = 1 on each accepted reply).
    Its parameters come from the checked config (missing keys: the packaged defaults), so
    FedProx always gets a ``proximal-mu`` > 0 (common/config.py refuses 0).

    The robust strategies aggregate the packed weights (common/wire.py) as they are: the
    median and trimmed mean are element-wise, and Krum's squared distances do not depend on
    the order of the coordinates. Their f adapts to each round's updates (module
    docstring), so ``num_sampled`` (the sites per round) is refused only when even f = 0
    is impossible, or when ``multikrum-select`` cannot be met with every site present.
    """
    spec = strategy_spec(run.strategy)  # RunConfig allows only STRATEGIES
    n = num_sampled
    if spec.adaptive_f and n < min_sites(spec.name, 0):
        raise ConfigError(
            f"strategy={spec.name} needs at least {min_sites(spec.name, 0)} sampled "
            f"sites even with f=0 ({spec.rule}); {n} are sampled per round"
        )
    strategy = spec.build(run, num_sampled)
    setattr(strategy, NAME_ATTR, spec.name)
    return wrap_central_dp(strategy, run, num_sampled, num_sites or num_sampled)


def statistics_averaged_plainly(run: RunConfig) -> bool:
    """Whether the loop replaces the aggregate's normalisation statistics by their mean.

    FedAdam, FedYogi and FedAvgM move every array of the model with a server optimizer,
    BatchNorm's running variances included: momentum or an adaptive step overshoots a
    variance that falls between rounds below zero, and the global model's scores turn NaN
    (seen on real images with FedAvgM, momentum 0.5). Statistics are not parameters, so
    they take FedAvg's weighted mean. Not under site-level DP, where the noised aggregate
    of everything is what the guarantee covers.
    """
    return strategy_spec(run.strategy).server_optimizer and not run.central_dp


def with_mean_statistics(
    state: Mapping[str, np.ndarray],
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    statistics: Iterable[str],
) -> dict[str, np.ndarray]:
    """``state`` with each named statistic replaced by the sites' weighted mean of it.

    ``updates`` are the sites' unpacked states with their weights (example counts); the
    mean is cast back to the statistic's dtype (BatchNorm's int64 step counter)."""
    updates = list(updates)
    weights = np.array([w for _, w in updates], np.float64)
    out = dict(state)
    for name in statistics:
        if name not in out:
            continue
        stacked = np.stack([np.asarray(u[name], np.float64) for u, _ in updates])
        mean = np.tensordot(weights / weights.sum(), stacked, axes=1)
        out[name] = mean.astype(np.asarray(state[name]).dtype)
    return out


def updates_needed(run: RunConfig) -> int:
    """The fewest updates the strategy can aggregate: f = 0's minimum (:func:`min_sites`;
    3 for Krum, MultiKrum and Bulyan, 1 otherwise), since the robust rules lower f to what
    a round's updates allow; with fewer the loop keeps the global model instead of letting
    the strategy fail."""
    return min_sites(run.strategy, 0) if strategy_spec(run.strategy).adaptive_f else 1


# ----------------------------------------------------------------------------- the strategies
# Registered in common.config.STRATEGIES's order (tests/test_config.py checks the two equal).
@register_strategy("fedavg")
def _fedavg(run: RunConfig, num_sampled: int) -> Strategy:
    return FedAvg(**flower_options(run))


@register_strategy("fedprox")
def _fedprox(run: RunConfig, num_sampled: int) -> Strategy:
    return FedProx(**flower_options(run), proximal_mu=run.proximal_mu)


@register_strategy("fedadam", state=FEDOPT_STATE, server_optimizer=True)
def _fedadam(run: RunConfig, num_sampled: int) -> Strategy:
    return FedAdam(**flower_options(run), eta=run.server_lr, eta_l=run.lr)


@register_strategy("fedyogi", state=FEDOPT_STATE, server_optimizer=True)
def _fedyogi(run: RunConfig, num_sampled: int) -> Strategy:
    return FedYogi(**flower_options(run), eta=run.server_lr, eta_l=run.lr)


@register_strategy("fedavgm", state=FEDAVGM_STATE, server_optimizer=True)
def _fedavgm(run: RunConfig, num_sampled: int) -> Strategy:
    return SyncedFedAvgM(
        **flower_options(run),
        server_learning_rate=FEDAVGM_SERVER_LR,
        server_momentum=run.server_momentum,
    )


# A majority of honest values per coordinate; no f setting (its breakdown point is 1/2).
@register_strategy("fedmedian", sites=(2, 1), rule="n >= 2f+1")
def _fedmedian(run: RunConfig, num_sampled: int) -> Strategy:
    return FedMedian(**flower_options(run))


# f (from trim-beta) cut at each end of each coordinate, one left.
@register_strategy("fedtrimmedavg", sites=(2, 1), rule="n >= 2f+1", adaptive_f=True)
def _fedtrimmedavg(run: RunConfig, num_sampled: int) -> Strategy:
    return AdaptiveTrimmedAvg(**flower_options(run), beta=run.trim_beta)


def _weight_krum(run: RunConfig, num_sampled: int, select: int) -> Strategy:
    """Krum (``select`` 1) or MultiKrum; ``select`` must leave out the f of a full round."""
    name, n, f = run.strategy, num_sampled, run.robust_malicious
    full = min(f, largest_f(name, n))  # the f of a round with every site
    if select > n - full:
        less = f"robust-malicious={f}" if full == f else f"the f={full} that {n} sites allow"
        raise ConfigError(
            f"multikrum-select={select} is more than the {n} sampled sites less {less}: "
            f"use multikrum-select <= {n - full} (or 0)"
        )
    return WeightKrum(
        **flower_options(run), num_malicious_nodes=f, num_nodes_to_select=select, name=name
    )


@register_strategy("krum", sites=(2, 3), rule="n > 2f+2", adaptive_f=True)
def _krum(run: RunConfig, num_sampled: int) -> Strategy:
    return _weight_krum(run, num_sampled, select=1)


@register_strategy("multikrum", sites=(2, 3), rule="n > 2f+2", adaptive_f=True)
def _multikrum(run: RunConfig, num_sampled: int) -> Strategy:
    return _weight_krum(run, num_sampled, select=run.multikrum_select)


@register_strategy("bulyan", sites=(4, 3), rule="n >= 4f+3", adaptive_f=True)
def _bulyan(run: RunConfig, num_sampled: int) -> Strategy:
    return AdaptiveBulyan(
        **flower_options(run),
        num_malicious_nodes=run.robust_malicious,
        selection_rule=select_on_weights,
    )


STRATEGIES = tuple(REGISTRY)  # the code's own set: common/config.py copies it
SERVER_OPTIMIZERS = tuple(name for name, spec in REGISTRY.items() if spec.server_optimizer)


def _base(strategy: Strategy) -> Strategy:
    return getattr(strategy, "strategy", strategy)


def declared_state(strategy: Strategy) -> list[tuple[Any, Mapping[str, StateField]]]:
    """The objects that hold ``strategy``'s state and the fields each declares: the base
    strategy (its registry entry's ``state``) and, under site-level DP, the wrapper
    (:data:`CENTRAL_DP_WRAPPERS`). Only strategies built by :func:`make_strategy`."""
    base = _base(strategy)
    name = getattr(base, NAME_ATTR, None)
    if name not in REGISTRY:
        raise TypeError(f"{type(base).__name__} was not built by make_strategy: no declared state")
    held = [(base, REGISTRY[name].state)]
    if base is not strategy:
        fields = [f for cls, f in CENTRAL_DP_WRAPPERS.values() if isinstance(strategy, cls)]
        if not fields:
            raise TypeError(f"{type(strategy).__name__} is no site-level DP wrapper of fedskin")
        held.append((strategy, fields[0]))
    return held


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a resumed server needs to continue the strategy exactly: the declared fields
    (FedOpt moments, FedAvgM momentum, the DP wrapper's clipping norm and accountant), by
    attribute name; a field with nothing to keep yet (None, no moments) is left out."""
    state: dict[str, Any] = {}
    for holder, fields in declared_state(strategy):
        for attr, field in fields.items():
            value = field.save(getattr(holder, attr))
            if value is not None:
                state[attr] = value
    return state


def load_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Restore what :func:`strategy_state` saved (also from a checkpoint, arrays as tensors).

    Site-level privacy spending that this run cannot account is refused; other saved
    fields that this strategy does not declare (a forced resume under another strategy)
    are left out, with a log line."""
    declared: set[str] = set()
    for holder, fields in declared_state(strategy):
        for attr, field in fields.items():
            declared.add(attr)
            if attr in state:
                setattr(holder, attr, field.load(getattr(holder, attr), state[attr]))
    if "accountant" in state and "accountant" not in declared:
        load_accountant(None, state["accountant"])  # refused: the run has no accountant
    unused = sorted(set(state) - declared)
    if unused:
        name = getattr(_base(strategy), NAME_ATTR)
        log.warning("strategy state %s not used by strategy %s: left out", unused, name)
