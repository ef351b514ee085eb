"""A training round's updates: checked, bounded, weighted and aggregated by the strategy.

Every reply is checked (server/replies.py) before anything of it is kept; updates whose
norm is out of bounds against the others' are rejected; each usable update weighs its
examples, at most its pinned n-train, capped at ``max-site-weight`` (server/sizes.py).
The strategy then aggregates only the checked records, in a fixed order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.secagg import float_keys
from common.wire import unpack
from server.arrays import array_record, numpy_state
from server.central_dp import central_spent
from server.replies import norm_bound_errors, skipped_reason, train_reply_error, update_norm
from server.sizes import SiteInfo, capped
from server.strategies import (
    UNIFORM_WEIGHT_KEY,
    statistics_averaged_plainly,
    updates_needed,
    with_mean_statistics,
)
from server.transport import Problems, Wording

log = logging.getLogger("fedskin")
Update = tuple[Message, ArrayRecord, MetricRecord]


@dataclass
class Updates:
    """What one training round keeps of its replies, by site name in arrival order: the
    usable updates, their norms against the global model and the sites' epsilons."""

    server_round: int
    reference: dict[str, np.ndarray]  # the round's global model, packed
    problems: Problems
    good: dict[str, Update] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def checked(
        cls,
        server_round: int,
        wire: ArrayRecord,
        replies: Mapping[int, Message],
        by_node: Mapping[int, SiteInfo],
        timeout: float,
    ) -> Updates:
        """Check every reply (in arrival order) and keep the usable updates."""
        wording = Wording(
            server_round,
            failed="round %d: site %s failed: %s",
            rejected="round %d: update from site %s rejected: %s",
            silent="round %d: site %s did not reply in time",
        )
        updates = cls(server_round, numpy_state(wire), Problems(wording, timeout))
        updates.problems.collect(replies.items(), by_node, updates.take)
        return updates

    def take(self, site: SiteInfo, reply: Message) -> str | None:
        """One reply, checked (server/replies.py) before anything of it is kept."""
        if why := train_reply_error(reply.content, self.reference, site.n_train):
            return why
        metrics = reply.content.metric_records["metrics"]
        eps = float(metrics["epsilon"]) if "epsilon" in metrics else None
        if skipped := skipped_reason(reply.content):
            self.problems.rejected[site.site] = skipped
            log.warning(
                "round %d: site %s did not train (%s)", self.server_round, site.site, skipped
            )
        else:
            update = reply.content.array_records["arrays"]
            norm = update_norm(update, self.reference)
            self.good[site.site], self.norms[site.site] = (reply, update, metrics), norm
        if eps is not None:
            self.epsilon[site.site] = eps
        return None

    def bound_norms(self, chosen: Sequence[SiteInfo], run: RunConfig) -> None:
        """Reject updates whose norm is out of bounds against the others' (server/replies.py)."""
        # a site's allowance grows with its steps: from its size capped against the others'
        sizes = capped({s.site: s.n_train for s in chosen}, run.max_site_weight)
        steps = {n: run.steps_per_round(int(sizes[n])) for n in self.norms}
        factor, cap = run.update_norm_factor, run.update_norm_cap
        for name, why in sorted(norm_bound_errors(self.norms, factor, cap, steps).items()):
            del self.good[name]
            self.problems.reject(name, why)

    @property
    def usable(self) -> int:
        """How many sites' updates the round can aggregate."""
        return len(self.good)

    def train_metrics(self) -> dict[str, dict[str, float]]:
        return {
            name: {k: float(v) for k, v in self.good[name][2].items()} for name in sorted(self.good)
        }

    def states(self, layout: Any) -> dict[str, dict[str, np.ndarray]]:
        """The usable updates unpacked to the model's tensors, by site."""
        return {
            name: {k: np.asarray(v) for k, v in unpack(update, layout).items()}
            for name, (_, update, _) in self.good.items()
        }


def enough_updates(run: RunConfig, server_round: int, usable: int) -> bool:
    """Whether ``usable`` updates meet min-train-nodes and the strategy's own minimum."""
    minimum = max(run.min_train_nodes, updates_needed(run))
    if usable >= minimum:
        return True
    log.error(
        "round %d: only %d usable updates (< %d: min-train-nodes=%d, strategy %s); "
        "global model kept",
        server_round,
        usable,
        minimum,
        run.min_train_nodes,
        run.strategy,
    )
    return False


class Aggregation:
    """How one round's updates become a model: the run's strategy on the packed updates,
    back to the model's ``layout``, with normalisation ``statistics`` averaged plainly
    where the strategy needs it (server/strategies.py)."""

    def __init__(
        self,
        run: RunConfig,
        strategy: Any,
        statistics: frozenset[str],
        sites: Sequence[SiteInfo],
        layout: Any,
    ) -> None:
        self.run, self.strategy, self.statistics, self.layout = run, strategy, statistics, layout
        self.n_train = {s.site: s.n_train for s in sites}

    def weights(self, updates: Updates) -> dict[str, float]:
        """Each usable update's aggregation weight: its examples (at most its pinned
        n-train), capped at ``max-site-weight`` of the round (server/sizes.py)."""
        sizes = {
            name: min(float(metrics["num-examples"]), float(self.n_train[name]))
            for name, (_, _, metrics) in updates.good.items()
        }
        return capped(sizes, self.run.max_site_weight)

    def __call__(
        self, server_round: int, updates: Updates, record: dict[str, Any]
    ) -> ArrayRecord | None:
        """The strategy's aggregate of the usable updates, unpacked, with normalisation
        statistics averaged plainly where the strategy needs it; None if there is none."""
        weights = self.weights(updates)
        new_arrays = self._aggregate(server_round, updates.good, weights, record)
        if new_arrays is None:
            return None
        unpacked = self._finite_unpacked(server_round, new_arrays)
        if unpacked is None:
            return None
        if self.statistics and statistics_averaged_plainly(self.run):
            sites = [
                (unpack(updates.good[name][1], self.layout), weights[name])
                for name in sorted(updates.good)
            ]
            mean = with_mean_statistics(numpy_state(unpacked), sites, self.statistics)
            return array_record(mean)
        return unpacked

    def _aggregate(
        self,
        server_round: int,
        good: Mapping[str, Update],
        weights: Mapping[str, float],
        record: dict[str, Any],
    ) -> ArrayRecord | None:
        """The strategy's aggregate of the usable updates (packed), or None when it did not
        aggregate; records whether it did and any site-level DP spending."""
        # The strategy sees only checked records: the update and the metric keys every
        # usable reply has (Flower refuses replies whose key sets differ), in a fixed order
        # (float sums are reproducible), plus the weight used under site-level DP. Each is
        # a new message with a copy of the reply's metadata (Message() resets its
        # delivered_at): the replies themselves stay as received.
        shared = set.intersection(*(set(metrics.keys()) for _, _, metrics in good.values()))
        checked = []
        for name in sorted(good):
            reply, update, metrics = good[name]
            kept = MetricRecord({k: metrics[k] for k in sorted(shared)})
            kept["num-examples"] = weights[name]  # pinned and capped (server/sizes.py)
            kept[UNIFORM_WEIGHT_KEY] = 1
            content = RecordDict({"arrays": update, "metrics": kept})
            checked.append(Message(content, metadata=copy.copy(reply.metadata)))
        new_arrays, _ = self.strategy.aggregate_train(server_round, checked)
        record["aggregated"] = new_arrays is not None
        if spent := central_spent(self.strategy):
            record["central"] = spent
        if new_arrays is None:
            log.error(
                "round %d: the strategy did not aggregate (site-level DP with accounting needs "
                "an update from every sampled site); global model kept",
                server_round,
            )
        return new_arrays

    def _finite_unpacked(self, server_round: int, new_arrays: ArrayRecord) -> ArrayRecord | None:
        """The aggregate unpacked to the model's tensors, or None when it is not finite."""
        aggregate = numpy_state(new_arrays)
        if any(
            np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()
            for a in aggregate.values()
        ):
            log.error("round %d: aggregate is not finite; global model kept", server_round)
            return None
        # Back to tensors; integer buffers (BatchNorm counters) integer after averaging.
        return array_record(unpack(new_arrays, self.layout), self.layout)


SECURE_SUM = "secagg+ sum"  # the one update of a SecAgg+ round: the survivors' mean


class SecureUpdates(Updates):
    """A SecAgg+ round's updates (server/secagg.py): no site's own, only the survivors'
    unmasked weighted mean update, their plaintext train metrics, and the quantisation
    bound of each element of the mean."""

    def __init__(self, server_round: int, reference: dict[str, np.ndarray], problems: Problems):
        super().__init__(server_round, reference, problems)
        self.site_metrics: dict[str, MetricRecord] = {}
        self.mean: np.ndarray | None = None  # the mean update of the floating-point arrays
        self.weight = 0.0
        self.bound = 0.0

    @property
    def usable(self) -> int:
        return len(self.site_metrics) if self.mean is not None else 0

    def unmasked(
        self, metrics: Mapping[str, MetricRecord], mean: np.ndarray, weight: float, bound: float
    ) -> None:
        """Keep the unmasked mean: the global model plus it is the round's one update."""
        self.site_metrics, self.mean, self.weight, self.bound = dict(metrics), mean, weight, bound
        for name, m in metrics.items():
            if "epsilon" in m:
                self.epsilon[name] = float(m["epsilon"])
        keys = float_keys(self.reference)
        out, start = dict(self.reference), 0
        for k in keys:
            ref = self.reference[k]
            part = mean[start : start + ref.size].reshape(ref.shape)
            out[k] = (ref.astype(np.float64) + part).astype(ref.dtype)
            start += ref.size
        record = array_record(out)
        summary = MetricRecord({"num-examples": weight})
        content = RecordDict({"arrays": record, "metrics": summary})
        self.good = {
            SECURE_SUM: (Message(content, dst_node_id=0, message_type="train"), record, summary)
        }

    def train_metrics(self) -> dict[str, dict[str, float]]:
        return {
            n: {k: float(v) for k, v in m.items()} for n, m in sorted(self.site_metrics.items())
        }

    def sum_error(self, cap: float) -> str | None:
        """Why the unmasked mean cannot stand: not finite, or longer than the sites' cap
        allows (each site clipped its update to at most ``cap`` before masking)."""
        if self.mean is None:
            return "nothing unmasked"
        if not np.isfinite(self.mean).all():
            return "the unmasked sum is not finite"
        norm, slack = float(np.linalg.norm(self.mean)), self.bound * np.sqrt(self.mean.size)
        if cap > 0 and norm > cap + slack:
            return f"the unmasked mean update's norm {norm:.4g} exceeds update-norm-cap={cap:g}"
        return None


class SecureAggregation(Aggregation):
    """The strategy on a SecAgg+ round's one update (the survivors' mean, weighing their
    summed pinned weight): FedAvg's mean is that update; FedAdam, FedYogi and FedAvgM
    step from it; statistics averaged plainly are its own."""

    def weights(self, updates: Updates) -> dict[str, float]:
        assert isinstance(updates, SecureUpdates)
        return {name: updates.weight for name in updates.good}

    def __call__(
        self, server_round: int, updates: Updates, record: dict[str, Any]
    ) -> ArrayRecord | None:
        assert isinstance(updates, SecureUpdates)
        if why := updates.sum_error(self.run.update_norm_cap):
            log.error(
                "round %d: %s; round dropped, global model kept (the culprit cannot be named "
                "under SecAgg+)",
                server_round,
                why,
            )
            return None
        return super().__call__(server_round, updates, record)
