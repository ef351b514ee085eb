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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.multikrum import select_multikrum

from common.config import ConfigError, RunConfig, as_run_config

log = logging.getLogger("fedskin")

FEDAVGM_SERVER_LR = 1.0  # FedAvgM's server learning rate: fixed (server-lr is FedAdam's 0.01)
# Site-level DP bounds each site's influence on the *mean* of clipped updates by C/m; a
# mean weighted by example counts would give a large site more and break that bound.
UNIFORM_WEIGHT_KEY = "site-weight"


# ----------------------------------------------------------------------------- state fields
@dataclass(frozen=True)
class StateField:
    """How one attribute of a strategy is saved in a checkpoint and restored from it.

    ``save`` turns the attribute's value into storable data (numpy arrays, numbers, plain
    dicts and lists: common/rundir.py stores the arrays as tensors), or None to store
    nothing (no moments yet, no accountant); ``load`` takes the attribute's current value
    and the stored data and returns the value to set (it may update the current one)."""

    save: Callable[[Any], Any]
    load: Callable[[Any, Any], Any]


def _load_accountant(accountant: Any, saved: Any) -> Any:
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
    load=_load_accountant,
)
FEDOPT_STATE = MappingProxyType({"m_t": ARRAYS_BY_NAME, "v_t": ARRAYS_BY_NAME})
FEDAVGM_STATE = MappingProxyType({"momentum_vector": ARRAY_LIST})

# Site-level DP (``central-dp``): Flower's wrapper for each kind and the attributes of the
# wrapper that are its state: adaptive clipping moves its norm; fixed clipping may hold the
# accountant of the privacy spent so far.
CENTRAL_DP_WRAPPERS: Mapping[str, tuple[type[Strategy], Mapping[str, StateField]]] = (
    MappingProxyType(
        {
            "server-fixed": (
                DifferentialPrivacyServerSideFixedClipping,
                MappingProxyType({"clipping_norm": NUMBER, "accountant": ACCOUNTANT}),
            ),
            "server-adaptive": (
                DifferentialPrivacyServerSideAdaptiveClipping,
                MappingProxyType({"clipping_norm": NUMBER}),
            ),
            "client-fixed": (
                DifferentialPrivacyClientSideFixedClipping,
                MappingProxyType({"clipping_norm": NUMBER, "accountant": ACCOUNTANT}),
            ),
            "client-adaptive": (
                DifferentialPrivacyClientSideAdaptiveClipping,
                MappingProxyType({"clipping_norm": NUMBER}),
            ),
        }
    )
)
CENTRAL_DP = ("", *CENTRAL_DP_WRAPPERS)
_WRAPPER_STATE_KEYS = frozenset(k for _, fields in CENTRAL_DP_WRAPPERS.values() for k in fields)


# ----------------------------------------------------------------------------- the registry
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
    clash = set(state or {}) & _WRAPPER_STATE_KEYS
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
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}") from None


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


def make_strategy(
    cfg: RunConfig | Mapping[str, Any], num_sampled: int, num_sites: int | None = None
) -> Strategy:
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
    run = as_run_config(cfg)
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


def statistics_averaged_plainly(cfg: RunConfig | Mapping[str, Any]) -> bool:
    """Whether the loop replaces the aggregate's normalisation statistics by their mean.

    FedAdam, FedYogi and FedAvgM move every array of the model with a server optimizer,
    BatchNorm's running variances included: momentum or an adaptive step overshoots a
    variance that falls between rounds below zero, and the global model's scores turn NaN
    (seen on real images with FedAvgM, momentum 0.5). Statistics are not parameters, so
    they take FedAvg's weighted mean. Not under site-level DP, where the noised aggregate
    of everything is what the guarantee covers.
    """
    run = as_run_config(cfg)
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


def updates_needed(cfg: RunConfig | Mapping[str, Any]) -> int:
    """The fewest updates the strategy can aggregate: f = 0's minimum (:func:`min_sites`;
    3 for Krum, MultiKrum and Bulyan, 1 otherwise), since the robust rules lower f to what
    a round's updates allow; with fewer the loop keeps the global model instead of letting
    the strategy fail."""
    run = as_run_config(cfg)
    return min_sites(run.strategy, 0) if strategy_spec(run.strategy).adaptive_f else 1


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


def _too_few(name: str, n: int, server_round: int) -> bool:
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


def select_on_weights(
    contents: list[RecordDict], num_malicious: int, num_select: int
) -> list[RecordDict]:
    """Flower's (Multi-)Krum selection, with distances over the floating-point arrays only.

    The int64 BatchNorm counters (``num_batches_tracked``) count each site's local steps; in
    the squared distances they would outweigh the weights themselves, so Krum would pick
    the sites with a typical amount of data rather than typical weights.
    """
    key = next(iter(contents[0].array_records))
    proxies = []
    for content in contents:
        arrays = content.array_records[key]
        floats = {k: a for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)}
        proxies.append(RecordDict({key: ArrayRecord(floats) if floats else arrays}))
    index = {id(p): i for i, p in enumerate(proxies)}
    return [contents[index[id(p)]] for p in select_multikrum(proxies, num_malicious, num_select)]


class WeightKrum(MultiKrum):
    """Flower's MultiKrum (Krum when ``num_nodes_to_select`` is 1) for fedskin's loop.

    Distances are over the weights only (:func:`select_on_weights`). Each round scores with
    the f its updates allow (:func:`round_f`: n > 2f+2). ``num_nodes_to_select`` = 0 means
    all but the *configured* ``num_malicious_nodes`` of this round's replies: a site that
    drops out does not let a poisoned update into the average, and a round too small for
    that f (scored with a lower one) still leaves its most outlying updates out. A set
    ``num_nodes_to_select`` is capped at n - f_used. The selected updates are averaged as
    FedAvg does (weighted by ``weighted_by_key``).
    """

    def __init__(self, *args: Any, name: str = "multikrum", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies or _too_few(self.name, len(replies), server_round):
            return None, None
        n, configured = len(replies), self.num_malicious_nodes
        f = round_f(self.name, configured, n, server_round)
        if self.num_nodes_to_select:
            select = min(self.num_nodes_to_select, n - f)
        else:
            select = max(1, n - configured)
        contents = select_on_weights([r.content for r in replies], f, select)
        chosen = {id(c) for c in contents}
        return FedAvg.aggregate_train(
            self, server_round, [r for r in replies if id(r.content) in chosen]
        )


class AdaptiveBulyan(Bulyan):
    """Flower's Bulyan with each round's f lowered to what its updates allow (n >= 4f+3);
    at f = 0 it averages all updates (no protection: the round's log line says so)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies or _too_few("bulyan", len(replies), server_round):
            return None, None
        configured = self.num_malicious_nodes
        self.num_malicious_nodes = round_f("bulyan", configured, len(replies), server_round)
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.num_malicious_nodes = configured


class AdaptiveTrimmedAvg(FedTrimmedAvg):
    """Flower's trimmed mean, cutting f = max(1, int(beta * n)) updates at each end of each
    coordinate (``beta`` > 0; none at 0), lowered to (n - 1) // 2 so one is left.

    Flower cuts int(beta * n), none at all when a round has fewer than 1 / beta updates
    (beta 0.2 and 4 sites: a plain mean); a positive ``trim-beta`` here always cuts."""

    def configured_f(self, n: int) -> int:
        return max(1, int(self.beta * n)) if self.beta > 0 else 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        n = len(valid)
        why = f", from trim-beta={self.beta:g}"
        cut = round_f("fedtrimmedavg", self.configured_f(n), n, server_round, why)
        key = next(iter(valid[0].content.array_records))
        arrays = ArrayRecord()
        for name in list(valid[0].content[key].keys()):
            stacked = np.stack([msg.content[key].pop(name).numpy() for msg in valid])
            arrays[name] = Array(np.asarray(trimmed_mean(stacked, cut)))
        metrics = self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        return arrays, metrics


def trimmed_mean(stacked: np.ndarray, cut: int) -> np.ndarray:
    """The mean along axis 0 after dropping the ``cut`` lowest and highest values."""
    n = stacked.shape[0]
    if cut < 0 or 2 * cut >= n:
        raise ValueError(f"cannot cut {cut} at each end of {n} values")
    if cut == 0:
        return stacked.mean(axis=0)
    return np.partition(stacked, (cut, n - cut - 1), axis=0)[cut : n - cut].mean(axis=0)


class SyncedFedAvgM(FedAvgM):
    """Flower's FedAvgM, its momentum applied to the global model the loop actually holds.

    Flower's keeps its own copy from round 1 on; the loop may keep the previous model
    instead of an aggregate (a non-finite one) and resumes from checkpoints, so, as FedAdam
    does, the strategy takes the model it is given each round.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


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
        _load_accountant(None, state["accountant"])  # refused: the run has no accountant
    unused = sorted(set(state) - declared)
    if unused:
        name = getattr(_base(strategy), NAME_ATTR)
        log.warning("strategy state %s not used by strategy %s: left out", unused, name)
