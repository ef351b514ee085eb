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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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

from common.config import STRATEGIES, ConfigError, RunConfig, as_run_config

log = logging.getLogger("fedskin")

FEDAVGM_SERVER_LR = 1.0  # FedAvgM's server learning rate: fixed (server-lr is FedAdam's 0.01)
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

    The robust strategies aggregate the packed weights (common/wire.py) as they are: the
    median and trimmed mean are element-wise, and Krum's squared distances do not depend on
    the order of the coordinates. Their f adapts to each round's updates (module
    docstring), so ``num_sampled`` (the sites per round) is refused only when even f = 0
    is impossible, or when ``multikrum-select`` cannot be met with every site present.
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
    n, f = num_sampled, run.robust_malicious
    if run.strategy in ADAPTIVE_F and n < min_sites(run.strategy, 0):
        raise ConfigError(
            f"strategy={run.strategy} needs at least {min_sites(run.strategy, 0)} sampled "
            f"sites even with f=0 ({RULES[run.strategy]}); {n} are sampled per round"
        )
    if run.strategy == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif run.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=run.proximal_mu)
    elif run.strategy in ("fedadam", "fedyogi"):
        cls = FedAdam if run.strategy == "fedadam" else FedYogi
        strategy = cls(**common, eta=run.server_lr, eta_l=run.lr)
    elif run.strategy == "fedavgm":
        strategy = SyncedFedAvgM(
            **common, server_learning_rate=FEDAVGM_SERVER_LR, server_momentum=run.server_momentum
        )
    elif run.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif run.strategy == "fedtrimmedavg":
        strategy = AdaptiveTrimmedAvg(**common, beta=run.trim_beta)
    elif run.strategy in ("krum", "multikrum"):
        select = 1 if run.strategy == "krum" else run.multikrum_select
        full = min(f, largest_f(run.strategy, n))  # the f of a round with every site
        if select > n - full:
            less = f"robust-malicious={f}" if full == f else f"the f={full} that {n} sites allow"
            raise ConfigError(
                f"multikrum-select={select} is more than the {n} sampled sites less {less}: "
                f"use multikrum-select <= {n - full} (or 0)"
            )
        strategy = WeightKrum(
            **common, num_malicious_nodes=f, num_nodes_to_select=select, name=run.strategy
        )
    elif run.strategy == "bulyan":
        strategy = AdaptiveBulyan(**common, num_malicious_nodes=f, selection_rule=select_on_weights)
    else:  # RunConfig allows only STRATEGIES
        raise ValueError(f"unknown strategy {run.strategy!r}; choose one of {STRATEGIES}")
    return wrap_central_dp(strategy, run, num_sampled, num_sites or num_sampled)


SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedavgm")


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
    return run.strategy in SERVER_OPTIMIZERS and not run.central_dp


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
    return min_sites(run.strategy, 0) if run.strategy in ADAPTIVE_F else 1


# The conditions on n updates for f malicious ones: the rules need n >= a*f + b.
_MIN_SITES = {
    "krum": (2, 3),  # n > 2f+2
    "multikrum": (2, 3),
    "bulyan": (4, 3),  # n >= 4f+3
    "fedtrimmedavg": (2, 1),  # f cut at each end, one left
    "fedmedian": (2, 1),  # a majority of honest values per coordinate
}
RULES = {
    "krum": "n > 2f+2",
    "multikrum": "n > 2f+2",
    "bulyan": "n >= 4f+3",
    "fedtrimmedavg": "n >= 2f+1",
    "fedmedian": "n >= 2f+1",
}
# The strategies whose f adapts to each round's updates (fedmedian has no f to adapt).
ADAPTIVE_F = ("krum", "multikrum", "bulyan", "fedtrimmedavg")


def min_sites(strategy_name: str, f: int) -> int:
    """The fewest updates per round with which ``strategy_name`` tolerates ``f`` malicious
    ones: Krum/MultiKrum 2f+3 (n > 2f+2), Bulyan 4f+3, the trimmed mean (f cut at each
    end) and the median 2f+1; 1 for the others, which tolerate none (f > 0: ValueError)."""
    if f < 0:
        raise ValueError(f"f={f}: must be >= 0")
    if strategy_name not in _MIN_SITES:
        if strategy_name not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy_name!r}; choose one of {STRATEGIES}")
        if f > 0:
            raise ValueError(f"strategy={strategy_name} tolerates no malicious update (f={f})")
        return 1
    a, b = _MIN_SITES[strategy_name]
    return a * f + b


def largest_f(strategy_name: str, n: int) -> int:
    """The largest f that ``strategy_name``'s rule allows with ``n`` updates (the inverse of
    :func:`min_sites`); -1 when even f = 0 is impossible, 0 for non-robust strategies."""
    if strategy_name not in _MIN_SITES:
        return 0 if n >= 1 else -1
    a, b = _MIN_SITES[strategy_name]
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
            RULES[name],
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
        RULES[name],
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
    if getattr(base, "momentum_vector", None) is not None:  # FedAvgM's server momentum
        state["momentum_vector"] = [np.asarray(v) for v in base.momentum_vector]
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
    if "momentum_vector" in state and hasattr(base, "momentum_vector"):
        base.momentum_vector = [np.asarray(v) for v in state["momentum_vector"]]
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = state["clipping_norm"]
    if "accountant" in state:
        if getattr(strategy, "accountant", None) is None:
            raise ValueError("the checkpoint has site-level privacy spending but this run has none")
        strategy.accountant.load_state_dict(state["accountant"])
