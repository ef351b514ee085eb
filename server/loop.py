"""The server's round loop: seeded sampling, robust aggregation, checkpoints and resume.

Flower's ``Strategy.start`` runs rounds but cannot resume, reject bad updates, or sample
reproducibly; this loop keeps Flower's strategies for configuring and aggregating a round
and adds those, so the same loop serves simulation and a real deployment.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common.config import RunConfig, run_config_of
from common.models import set_weights
from common.rundir import (
    atomic_write_json,
)
from common.wire import layout_of, pack, unpack
from server.arrays import array_record
from server.checkpoints import Checkpoints, LoopState
from server.discovery import Roster, class_counts, ordered
from server.evaluation import evaluate
from server.guard import leave_one_out, model_output_error, statistics_error
from server.refit import HeadRefit
from server.replies import (
    norm_bound_errors,
    skipped_reason,
    train_reply_error,
    update_norm,
)
from server.report import write_outputs
from server.sizes import (
    SiteInfo,
    capped,
)
from server.strategies import (
    UNIFORM_WEIGHT_KEY,
    central_spent,
    load_strategy_state,
    make_strategy,
    statistics_averaged_plainly,
    updates_needed,
    with_mean_statistics,
)
from server.transport import (
    Problems,
    SelectedGrid,
    Wording,
    reported_exchange,
)

__all__ = ["Federation", "LoopState", "SiteInfo"]
log = logging.getLogger("fedskin")


_Update = tuple[Message, ArrayRecord, MetricRecord]


@dataclass
class _Updates:
    """What one training round keeps of its replies, by site name in arrival order: the
    usable updates, their norms against the global model and the sites' epsilons."""

    server_round: int
    reference: dict[str, np.ndarray]  # the round's global model, packed
    problems: Problems
    good: dict[str, _Update] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)

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

    def train_metrics(self) -> dict[str, dict[str, float]]:
        return {
            name: {k: float(v) for k, v in self.good[name][2].items()} for name in sorted(self.good)
        }


def _snapshot(strategy: Any) -> tuple[dict[str, Any], Any]:
    """A copy of the strategy's state to restore after a rolled-back round: its attributes
    (FedAdam's moments, a clipping norm, ...) and a site-level DP accountant's state (the
    accountant itself holds modules, which do not copy)."""
    attrs = {k: v for k, v in vars(strategy).items() if k != "accountant"}
    accountant = getattr(strategy, "accountant", None)
    saved = None if accountant is None else copy.deepcopy(accountant.state_dict())
    return copy.deepcopy(attrs), saved


def _restore(strategy: Any, snapshot: tuple[dict[str, Any], Any]) -> None:
    attrs, accountant = snapshot
    vars(strategy).update(copy.deepcopy(attrs))
    if accountant is not None:
        strategy.accountant.load_state_dict(copy.deepcopy(accountant))


def _farthest(updates: _Updates) -> str | None:
    """The usable update farthest (L2) from the coordinate-wise median of the round's
    updates; None with fewer than 3."""
    if len(updates.good) < 3:
        return None
    flat = {
        name: np.concatenate([np.asarray(a.numpy(), np.float64).ravel() for a in u.values()])
        for name, (_, u, _) in updates.good.items()
    }
    median = np.median(np.stack(list(flat.values())), axis=0)
    return max(sorted(flat), key=lambda name: float(np.linalg.norm(flat[name] - median)))


class Federation:
    """Runs the rounds of one experiment against a grid of site nodes."""

    def __init__(
        self, grid: Grid, cfg: RunConfig | Mapping[str, Any], run_dir: Path, classes: list[str]
    ) -> None:
        self.run_config = run_config_of(cfg)  # typed: what the loop reads
        self.cfg = self.run_config.to_flat()  # flat: what the run directory stores
        self.grid, self.run_dir, self.classes = grid, run_dir, classes
        self.timeout = self.run_config.round_timeout
        self.seed = self.run_config.seed
        self.statistics: frozenset[str] = frozenset()  # set by run()
        self.sites: dict[int, SiteInfo] = {}
        self.discovery_rejected: dict[str, str] = {}  # node (and claimed site) -> why
        # What the sites sent, by message type and record: names and keys, never values.
        self.received: dict[str, dict[str, Any]] = {}
        self.checkpoints = Checkpoints(run_dir, self.cfg, self.run_config.force_resume)
        self.paths = self.checkpoints.paths  # every file of the run directory
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        self._resumed: dict[str, Any] | None = None  # the checkpoint a resumed run started from
        self._roster = Roster(self.run_config, classes, self.sites, self.discovery_rejected)
        # the last round's model before it, strategy state, updates and layout (rollback)
        self._undo: tuple[ArrayRecord, tuple[dict[str, Any], Any], _Updates, Any] | None = None
        self._new_model: Callable[[], torch.nn.Module] | None = None  # set by run()

    def _exchange(
        self, messages: list[Message], what: str = ""
    ) -> tuple[dict[int, Message], list[int]]:
        """Send and collect (server/transport.py), one log line per reply when ``what``
        names the exchange, the record names and keys received noted for network.json."""
        names = {nid: s.site for nid, s in self.sites.items()}
        return reported_exchange(self.grid, messages, self.timeout, what, names, self.received)

    def _write_network(self) -> None:
        """network.json: every record name and key that crossed the network to the server."""
        atomic_write_json(self.paths.network, self.received, indent=1, sort_keys=True)

    # ------------------------------------------------------------------ discovery
    def discover(self, expected: int, wait: float = 120.0) -> list[SiteInfo]:
        """Wait for ``expected`` (min-nodes) usable sites, at most ``wait`` seconds, and ask
        each which site it is and what it holds (server/discovery.py; RuntimeError when
        too few are usable, rejected nodes in ``discovery_rejected``)."""
        self._roster.discover(self.grid, self._exchange, expected, wait)
        return self.ordered_sites()

    def class_counts(self) -> list[int] | None:
        """The federation's training class counts for ``class-prior = "federation"``, or
        None (server/discovery.py)."""
        return class_counts(self.run_config, self.sites)

    def ordered_sites(self) -> list[SiteInfo]:
        return ordered(self.sites)

    # ------------------------------------------------------------------ sampling
    def sample(
        self, server_round: int, excluded: Mapping[str, int] | None = None
    ) -> list[SiteInfo]:
        """Seeded choice over site names, so node ids (random per run) don't matter;
        ``excluded``: sites that sit out until the round given (a rolled-back update)."""
        out = excluded or {}
        sites = [s for s in self.ordered_sites() if out.get(s.site, 0) <= server_round]
        k = max(
            self.run_config.min_train_nodes,
            math.ceil(self.run_config.fraction_train * len(sites)),
        )
        k = min(k, len(sites))
        rng = np.random.default_rng([self.seed, server_round])
        idx = sorted(rng.choice(len(sites), size=k, replace=False).tolist())
        return [sites[i] for i in idx]

    # ------------------------------------------------------------------ rounds
    def run(
        self,
        initial: dict[str, torch.Tensor],
        num_rounds: int,
        resume: bool,
        statistics: frozenset[str] = frozenset(),
        head: tuple[str, str] = ("", ""),
        model: Callable[[], torch.nn.Module] | None = None,
    ) -> dict:
        """The rounds, then the test of the best round's model. ``statistics`` names the
        model's normalisation statistics (BatchNorm buffers), which a server optimizer
        must not move (server/strategies.py: statistics_averaged_plainly); ``head`` the
        classifier's weight and bias, which ``head-calibration`` refits before the test;
        ``model`` builds the run's model, on which each aggregate is tried before it stands
        (outputs on noise images; without it only the statistics are checked)."""
        self.statistics, self._new_model = statistics, model
        state, arrays = self._start(initial, resume)
        self._roster.pin_to_checkpoint(state.pinned)
        strategy = make_strategy(self.run_config, len(self.sample(1)), len(self.sites))
        if self._resumed is not None:
            load_strategy_state(strategy, self._resumed["strategy"])
        for server_round in range(state.round + 1, num_rounds + 1):
            t0 = time.time()
            record: dict[str, Any] = {"round": server_round}
            try:
                arrays = self._train_round(strategy, server_round, arrays, state, record)
            except PrivacyBudgetExhausted as err:  # site-level budget: stop, keep what we have
                log.warning(
                    "round %d not run: site-level privacy budget spent (%s)", server_round, err
                )
                state.stopped = f"site-level privacy budget spent before round {server_round}"
                break
            record["validation"] = self._evaluate(arrays, "validation", server_round)
            if why := self._collapsed(record["validation"], state):
                arrays = self._roll_back(strategy, server_round, why, state, record)
                record["validation"] = self._evaluate(arrays, "validation", server_round)
            record["seconds"] = time.time() - t0
            state.round = server_round
            state.rounds.append(record)
            score = record["validation"]["decision_balanced_accuracy"]
            if not math.isnan(score) and score > state.best_score:
                state.best_score, state.best_round = score, server_round
                self._save("best", arrays, state, strategy)
            self._save("last", arrays, state, strategy)
            write_outputs(  # PNGs only at the end: redrawing costs ~0.3 s per round
                self.run_dir,
                self.cfg,
                self.classes,
                state.rounds,
                None,
                state.best_round,
                plots=False,
            )
            self._write_network()
            self._print_round(record)
        best = self.checkpoints.load_arrays("best") if state.best_round else arrays
        calibration = None
        if self.run_config.head_calibration == "lda" and state.rounds:
            refit = HeadRefit(
                self.run_config, self.classes, self.ordered_sites(), self._exchange, self._evaluate
            )
            best, calibration = refit.calibrate(best, head, state)
            if calibration["kept"]:
                self._save("best", best, state, strategy)
        test = self._evaluate(best, "test", state.round + 1, state.best_round or state.round)
        test["best_round"] = state.best_round
        if calibration is not None:
            test["head_calibration"] = calibration
        if self.discovery_rejected:
            test["rejected-at-discovery"] = dict(self.discovery_rejected)
        if state.stopped:
            test["stopped"] = state.stopped
        write_outputs(self.run_dir, self.cfg, self.classes, state.rounds, test, state.best_round)
        self._write_network()
        return {"rounds": state.rounds, "test": test, "best_round": state.best_round}

    def _start(
        self, initial: dict[str, torch.Tensor], resume: bool
    ) -> tuple[LoopState, ArrayRecord]:
        """The state and weights to start from (server/checkpoints.py)."""
        state, arrays, self._resumed = self.checkpoints.start(initial, resume)
        return state, arrays

    def _train_round(
        self,
        strategy: Any,
        server_round: int,
        arrays: ArrayRecord,
        state: LoopState,
        record: dict[str, Any],
    ) -> ArrayRecord:
        """One training round; the new global model, or ``arrays`` when none is usable."""
        chosen = self.sample(server_round, state.excluded)
        by_node = {s.node_id: s for s in chosen}
        # The strategy configures, clips and aggregates the packed form (common/wire.py).
        layout, wire = layout_of(arrays), pack(arrays)
        replies, missing = self._send_train(strategy, server_round, wire, state, list(by_node))
        updates = self._check_updates(server_round, wire, replies, by_node)
        self._bound_norms(updates, chosen)
        updates.problems.missing(missing, by_node)
        record.update(
            sampled=[s.site for s in chosen],
            train=updates.train_metrics(),
            failures=updates.problems.failures,
            rejected=updates.problems.rejected,
            epsilon=updates.epsilon,
        )
        if not self._enough_updates(server_round, len(updates.good)):
            record["aggregated"] = False
            return arrays
        backup = _snapshot(strategy)  # a rolled-back round leaves no trace
        self._undo = (arrays, backup, updates, layout)
        new = self._aggregated(strategy, server_round, updates, layout, record)
        if new is None:
            record["aggregated"] = False
            return arrays
        why = self._broken(arrays, new, server_round)
        if why is None:
            return new
        # The round broke the model: roll it back, name the site whose update did it.
        _restore(strategy, backup)
        culprit = self._culprit(arrays, updates, layout)
        record["rolled_back"] = {"why": why, "site": culprit or ""}
        log.error(
            "round %d rolled back: %s; %s",
            server_round,
            why,
            f"site {culprit} caused it and sits out {self.run_config.exclude_rounds} round(s)"
            if culprit
            else "no single site's update explains it",
        )
        if culprit is None:
            record["aggregated"] = False
            return arrays
        state.excluded[culprit] = server_round + 1 + self.run_config.exclude_rounds
        updates.problems.reject(culprit, f"its update broke the global model ({why})")
        del updates.good[culprit]
        if not self._enough_updates(server_round, len(updates.good)):
            record["aggregated"] = False
            return arrays
        new = self._aggregated(strategy, server_round, updates, layout, record)
        if new is None or self._broken(arrays, new, server_round) is not None:
            _restore(strategy, backup)
            record["aggregated"] = False
            return arrays
        return new

    def _collapsed(self, validation: Mapping[str, Any], state: LoopState) -> str | None:
        """Why the round's model must not stand after its validation, or None: most sites'
        evaluation failed on non-finite outputs, or the pooled score fell below half of
        chance after an earlier round had reached chance."""
        if self._undo is None:
            return None
        failures = validation.get("failures", {})
        broken = [s for s, why in failures.items() if "non-finite" in why]
        if broken and 2 * len(broken) >= len(self.sites):
            return f"{len(broken)} of {len(self.sites)} sites got non-finite outputs"
        chance = 1.0 / len(self.classes)
        score = validation["decision_balanced_accuracy"]
        if state.best_score >= chance and (math.isnan(score) or score < chance / 2):
            return f"pooled validation balanced accuracy {score:.3f} is below half of chance"
        return None

    def _roll_back(
        self, strategy: Any, server_round: int, why: str, state: LoopState, record: dict
    ) -> ArrayRecord:
        """The model before the round, the strategy as it was, and the site whose update
        explains it (the checks on the round's mean without it, else the update farthest
        from the others) sitting out ``exclude-rounds``."""
        assert self._undo is not None
        previous, backup, updates, layout = self._undo
        _restore(strategy, backup)
        culprit = self._culprit(previous, updates, layout) or _farthest(updates)
        record["aggregated"] = False
        record["rolled_back"] = {"why": why, "site": culprit or ""}
        if culprit:
            state.excluded[culprit] = server_round + 1 + self.run_config.exclude_rounds
        log.error(
            "round %d rolled back after validation: %s; %s",
            server_round,
            why,
            f"site {culprit} sits out {self.run_config.exclude_rounds} round(s)" if culprit else "",
        )
        return previous

    def _aggregated(
        self,
        strategy: Any,
        server_round: int,
        updates: _Updates,
        layout: Any,
        record: dict[str, Any],
    ) -> ArrayRecord | None:
        """The strategy's aggregate of the usable updates, unpacked, with normalisation
        statistics averaged plainly where the strategy needs it; None if there is none."""
        weights = self._weights(updates)
        new_arrays = self._aggregate(strategy, server_round, updates.good, weights, record)
        if new_arrays is None:
            return None
        unpacked = self._finite_unpacked(server_round, new_arrays, layout)
        if unpacked is None:
            return None
        if self.statistics and statistics_averaged_plainly(self.run_config):
            return self._mean_statistics(unpacked, updates, weights, layout)
        return unpacked

    def _weights(self, updates: _Updates) -> dict[str, float]:
        """Each usable update's aggregation weight: its examples (at most its pinned
        n-train), capped at ``max-site-weight`` of the round (server/sizes.py)."""
        sizes = {
            name: min(float(metrics["num-examples"]), float(self._size_of(name)))
            for name, (_, _, metrics) in updates.good.items()
        }
        return capped(sizes, self.run_config.max_site_weight)

    def _size_of(self, name: str) -> int:
        return next(s.n_train for s in self.sites.values() if s.site == name)

    def _broken(self, previous: ArrayRecord, new: ArrayRecord, server_round: int) -> str | None:
        """Why the aggregate breaks the model (server/guard.py), or None: normalisation
        statistics out of bounds, or outputs on seeded noise images not finite or far
        larger than the previous model's."""
        before = {k: np.asarray(v.numpy()) for k, v in previous.items()}
        after = {k: np.asarray(v.numpy()) for k, v in new.items()}
        if why := statistics_error(after, before, self.statistics):
            return why
        if self._new_model is None:
            return None
        seed = self.seed + server_round
        _, scale = model_output_error(self._model(before), self.run_config.image_size, seed)
        why, _ = model_output_error(
            self._model(after), self.run_config.image_size, seed, previous_scale=scale
        )
        return why

    def _model(self, state: Mapping[str, np.ndarray]) -> torch.nn.Module:
        assert self._new_model is not None
        model = self._new_model()
        set_weights(model, dict(state))
        return model

    def _culprit(self, previous: ArrayRecord, updates: _Updates, layout: Any) -> str | None:
        """The site whose exclusion makes the round's weighted mean pass the checks."""
        weights = self._weights(updates)
        states = {
            name: {k: np.asarray(v) for k, v in unpack(update, layout).items()}
            for name, (_, update, _) in updates.good.items()
        }

        def check(mean: dict[str, np.ndarray]) -> str | None:
            arrays = ArrayRecord(
                {k: Array(np.asarray(v).astype(layout[k][1])) for k, v in mean.items()}
            )
            return self._broken(previous, arrays, 0)

        return leave_one_out(states, weights, check)

    def _mean_statistics(
        self, unpacked: ArrayRecord, updates: _Updates, weights: Mapping[str, float], layout: Any
    ) -> ArrayRecord:
        """The aggregate with the sites' weighted mean of each normalisation statistic."""
        sites = [
            (unpack(updates.good[name][1], layout), weights[name]) for name in sorted(updates.good)
        ]
        state = {k: np.asarray(v.numpy()) for k, v in unpacked.items()}
        mean = with_mean_statistics(state, sites, self.statistics)
        return array_record(mean)

    def _send_train(
        self,
        strategy: Any,
        server_round: int,
        wire: ArrayRecord,
        state: LoopState,
        node_ids: list[int],
    ) -> tuple[dict[int, Message], list[int]]:
        """The strategy configures the round for the sampled nodes; their replies and the
        nodes that sent none in time."""
        # best-round: the best round so far, for sites that keep personal state (client/task.py)
        config = ConfigRecord({"run-tag": state.run_tag, "best-round": state.best_round})
        if (counts := self.class_counts()) is not None:
            config["class-counts"] = counts  # the prior of every site's loss
        messages = list(
            strategy.configure_train(server_round, wire, config, SelectedGrid(self.grid, node_ids))
        )
        return self._exchange(messages, f"round {server_round} training")

    def _check_updates(
        self,
        server_round: int,
        wire: ArrayRecord,
        replies: dict[int, Message],
        by_node: Mapping[int, SiteInfo],
    ) -> _Updates:
        """Check every reply (in arrival order) and keep the usable updates."""
        wording = Wording(
            server_round,
            failed="round %d: site %s failed: %s",
            rejected="round %d: update from site %s rejected: %s",
            silent="round %d: site %s did not reply in time",
        )
        reference = {k: v.numpy() for k, v in wire.items()}
        updates = _Updates(server_round, reference, Problems(wording, self.timeout))
        updates.problems.collect(replies.items(), by_node, updates.take)
        return updates

    def _bound_norms(self, updates: _Updates, chosen: list[SiteInfo]) -> None:
        """Reject updates whose norm is out of bounds against the others' (server/replies.py)."""
        # a site's allowance grows with its steps: from its size capped against the others'
        sizes = capped({s.site: s.n_train for s in chosen}, self.run_config.max_site_weight)
        steps = {n: self.run_config.steps_per_round(int(sizes[n])) for n in updates.norms}
        factor, cap = self.run_config.update_norm_factor, self.run_config.update_norm_cap
        for name, why in sorted(norm_bound_errors(updates.norms, factor, cap, steps).items()):
            del updates.good[name]
            updates.problems.reject(name, why)

    def _enough_updates(self, server_round: int, usable: int) -> bool:
        """Whether ``usable`` updates meet min-train-nodes and the strategy's own minimum."""
        minimum = max(self.run_config.min_train_nodes, updates_needed(self.run_config))
        if usable >= minimum:
            return True
        log.error(
            "round %d: only %d usable updates (< %d: min-train-nodes=%d, strategy %s); "
            "global model kept",
            server_round,
            usable,
            minimum,
            self.run_config.min_train_nodes,
            self.run_config.strategy,
        )
        return False

    @staticmethod
    def _aggregate(
        strategy: Any,
        server_round: int,
        good: dict[str, _Update],
        weights: Mapping[str, float],
        record: dict[str, Any],
    ) -> ArrayRecord | None:
        """The strategy's aggregate of the usable updates (packed), or None when it did not
        aggregate; records whether it did and any site-level DP spending."""
        # The strategy sees only checked records: the update and the metric keys every
        # usable reply has (Flower refuses replies whose key sets differ), in a fixed order
        # (float sums are reproducible), plus the weight used under site-level DP.
        shared = set.intersection(*(set(metrics.keys()) for _, _, metrics in good.values()))
        checked = []
        for name in sorted(good):
            reply, update, metrics = good[name]
            kept = MetricRecord({k: metrics[k] for k in sorted(shared)})
            kept["num-examples"] = weights[name]  # pinned and capped (server/sizes.py)
            kept[UNIFORM_WEIGHT_KEY] = 1
            reply.content = RecordDict({"arrays": update, "metrics": kept})
            checked.append(reply)
        new_arrays, _ = strategy.aggregate_train(server_round, checked)
        record["aggregated"] = new_arrays is not None
        if spent := central_spent(strategy):
            record["central"] = spent
        if new_arrays is None:
            log.error(
                "round %d: the strategy did not aggregate (site-level DP with accounting needs "
                "an update from every sampled site); global model kept",
                server_round,
            )
        return new_arrays

    @staticmethod
    def _finite_unpacked(
        server_round: int, new_arrays: ArrayRecord, layout: Any
    ) -> ArrayRecord | None:
        """The aggregate unpacked to the model's tensors, or None when it is not finite."""
        aggregate = {k: np.asarray(v.numpy()) for k, v in new_arrays.items()}
        if any(
            np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()
            for a in aggregate.values()
        ):
            log.error("round %d: aggregate is not finite; global model kept", server_round)
            return None
        # Back to tensors; integer buffers (BatchNorm counters) integer after averaging.
        state = unpack(new_arrays, layout)
        return ArrayRecord({k: Array(np.asarray(v).astype(layout[k][1])) for k, v in state.items()})

    def _evaluate(
        self, arrays: ArrayRecord, split: str, server_round: int, best_round: int = 0
    ) -> dict[str, Any]:
        """Every site scores the model (server/evaluation.py)."""
        return evaluate(
            self.run_config,
            self.classes,
            self.ordered_sites(),
            self._exchange,
            arrays,
            split,
            server_round,
            best_round,
        )

    # ------------------------------------------------------------------ checkpoints
    def _save(self, name: str, arrays: ArrayRecord, state: LoopState, strategy: Any) -> None:
        self.checkpoints.save(name, arrays, state, strategy)

    def _print_round(self, record: dict[str, Any]) -> None:
        g = record["validation"]["global"]
        eps = record.get("epsilon") or {}
        eps_txt = f" eps max {max(eps.values()):.2f}" if eps else ""
        if central := record.get("central"):
            eps_txt += f" site-level eps {central['epsilon']:.2f}"
        problems = {**record.get("failures", {}), **record.get("rejected", {})}
        log.info(
            "round %d | val bal-acc %.3f acc %.3f auroc %.3f | %d sites trained%s%s | %.1fs",
            record["round"],
            g.get("balanced_accuracy", float("nan")),
            g.get("accuracy", float("nan")),
            g.get("auroc", float("nan")),
            len(record.get("train", {})),
            eps_txt,
            f" | problems: {sorted(problems)}" if problems else "",
            record["seconds"],
        )
