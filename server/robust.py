"""Flower's robust strategies adapted to fedskin's loop: each round's f lowered to what its
updates allow (server/strategy_registry.py: round_f), Krum's distances over the weights
only, a trimmed mean that always cuts, and FedAvgM on the model the loop holds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedAvgM, FedTrimmedAvg, MultiKrum
from flwr.serverapp.strategy.multikrum import select_multikrum

from server.strategy_registry import round_f, too_few


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
        if not replies or too_few(self.name, len(replies), server_round):
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
        if not replies or too_few("bulyan", len(replies), server_round):
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
