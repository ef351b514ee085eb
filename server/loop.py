"""The server's round loop: seeded sampling, robust aggregation, checkpoints and resume.

Flower's ``Strategy.start`` runs rounds but cannot resume, reject bad updates, or sample
reproducibly; this loop keeps Flower's strategies for configuring and aggregating a round
and adds those, so the same loop serves simulation and a real deployment. A round reads
as Flower's: sample, send, collect and check (server/updates.py), aggregate under the
rollback guard (server/rollback.py), evaluate (server/evaluation.py), checkpoint
(server/checkpoints.py). Messages travel through server/transport.py; the sites are found
and pinned by server/discovery.py; the head refit is server/refit.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common.config import RunConfig
from common.rundir import atomic_write_json
from common.wire import layout_of, pack
from server.checkpoints import Checkpoints, LoopState
from server.discovery import Roster, class_counts, ordered
from server.evaluation import evaluate
from server.progress import round_line
from server.refit import HeadRefit
from server.report import write_outputs
from server.results import RunResults
from server.resume import Resume
from server.rollback import Rollback
from server.secagg import SecureRound
from server.secagg import settings as secagg_settings
from server.sizes import SiteInfo
from server.strategies import load_strategy_state, make_strategy
from server.transport import SelectedGrid, reported_exchange
from server.updates import Aggregation, SecureAggregation, Updates, enough_updates

__all__ = ["Federation", "LoopState", "SiteInfo"]
log = logging.getLogger("fedskin")


class Federation:
    """Runs the rounds of one experiment against a grid of site nodes."""

    def __init__(self, grid: Grid, run: RunConfig, run_dir: Path, classes: list[str]) -> None:
        self.run_config = run  # typed: what the loop reads
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
        self._roster = Roster(self.run_config, classes, self.sites, self.discovery_rejected)

    # ------------------------------------------------------------------ sites
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
        on_round: Callable[[dict[str, Any]], None] | None = None,
        checked: Resume | None = None,
    ) -> dict:
        """The rounds, then the test of the best round's model. ``statistics`` names the
        model's normalisation statistics (BatchNorm buffers), which a server optimizer
        must not move (server/strategies.py: statistics_averaged_plainly); ``head`` the
        classifier's weight and bias, which ``head-calibration`` refits before the test;
        ``model`` builds the run's model, on which each aggregate is tried before it stands
        (outputs on noise images; without it only the statistics are checked); ``on_round``
        gets each round's record once it is saved (server/tracking.py: MLflow, live);
        ``checked`` the run's resume check, made by the ServerApp (server/resume.py)."""
        self.statistics = statistics
        guard = Rollback(self.run_config, len(self.classes), statistics, model)
        state, arrays, resumed = self.checkpoints.start(initial, resume, checked)
        self._roster.pin_to_checkpoint(state.pinned)
        strategy = make_strategy(self.run_config, len(self.sample(1)), len(self.sites))
        if self.run_config.secure_aggregation == "secagg+":  # refused before any site trains
            secagg_settings(self.run_config, len(self.sample(1)))
        if resumed is not None:  # the strategy's own state, as the checkpoint holds it
            load_strategy_state(strategy, resumed["strategy"])
        for server_round in range(state.round + 1, num_rounds + 1):
            t0 = time.time()
            record: dict[str, Any] = {"round": server_round}
            try:
                arrays = self._train_round(strategy, guard, server_round, arrays, state, record)
            except PrivacyBudgetExhausted as err:  # site-level budget: stop, keep what we have
                log.warning(
                    "round %d not run: site-level privacy budget spent (%s)", server_round, err
                )
                state.stopped = f"site-level privacy budget spent before round {server_round}"
                break
            record["validation"] = self._evaluate(arrays, "validation", server_round)
            if why := guard.collapsed(record["validation"], state, len(self.sites)):
                arrays = guard.roll_back(strategy, server_round, why, state, record)
                record["validation"] = self._evaluate(arrays, "validation", server_round)
            record["seconds"] = time.time() - t0
            state.round = server_round
            state.rounds.append(record)
            score = record["validation"]["decision_balanced_accuracy"]
            if not math.isnan(score) and score > state.best_score:
                state.best_score, state.best_round = score, server_round
                self.checkpoints.save("best", arrays, state, strategy)
            self.checkpoints.save("last", arrays, state, strategy)
            results = RunResults.of(self.cfg, self.classes, state.rounds, None, state.best_round)
            write_outputs(self.run_dir, results, plots=False)  # PNGs at the end: ~0.3 s each
            self._write_network()
            log.info(round_line(record, num_rounds, [r["seconds"] for r in state.rounds]))
            if on_round is not None:
                on_round(record)
        best = self.checkpoints.load_arrays("best") if state.best_round else arrays
        calibration = None
        if self.run_config.head_calibration == "lda" and state.rounds:
            refit = HeadRefit(
                self.run_config, self.classes, self.ordered_sites(), self._exchange, self._evaluate
            )
            best, calibration = refit.calibrate(best, head, state)
            if calibration["kept"]:
                self.checkpoints.save("best", best, state, strategy)
        test = self._evaluate(best, "test", state.round + 1, state.best_round or state.round)
        test["best_round"] = state.best_round
        if calibration is not None:
            test["head_calibration"] = calibration
        if self.discovery_rejected:
            test["rejected-at-discovery"] = dict(self.discovery_rejected)
        if state.stopped:
            test["stopped"] = state.stopped
        results = RunResults.of(self.cfg, self.classes, state.rounds, test, state.best_round)
        write_outputs(self.run_dir, results)
        self._write_network()
        return {"rounds": state.rounds, "test": test, "best_round": state.best_round}

    def _train_round(
        self,
        strategy: Any,
        guard: Rollback,
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
        configure = partial(self._train_messages, strategy, server_round, wire, state)
        if secure := self.run_config.secure_aggregation == "secagg+":  # server/secagg.py
            run, timeout = self.run_config, self.timeout
            updates = SecureRound(run, self._exchange, server_round, chosen, timeout).run(
                configure, wire
            )
        else:
            messages = configure(list(by_node))
            replies, missing = self._exchange(messages, f"round {server_round} training")
            updates = Updates.checked(server_round, wire, replies, by_node, self.timeout)
            updates.bound_norms(chosen, self.run_config)
            updates.problems.missing(missing, by_node)
        record.update(
            sampled=[s.site for s in chosen],
            train=updates.train_metrics(),
            failures=updates.problems.failures,
            rejected=updates.problems.rejected,
            epsilon=updates.epsilon,
        )
        if not enough_updates(self.run_config, server_round, updates.usable):
            record["aggregated"] = False
            return arrays
        aggregation = (SecureAggregation if secure else Aggregation)(
            self.run_config, strategy, self.statistics, self.ordered_sites(), layout
        )
        return guard.aggregate(aggregation, server_round, arrays, updates, state, record)

    def _train_messages(
        self,
        strategy: Any,
        server_round: int,
        wire: ArrayRecord,
        state: LoopState,
        node_ids: list[int],
    ) -> list[Message]:
        """The strategy's train messages of the round for the sampled nodes."""
        # best-round: the best round so far, for sites that keep personal state (client/task.py)
        config = ConfigRecord({"run-tag": state.run_tag, "best-round": state.best_round})
        if (counts := self.class_counts()) is not None:
            config["class-counts"] = counts  # the prior of every site's loss
        grid = SelectedGrid(self.grid, node_ids)
        return list(strategy.configure_train(server_round, wire, config, grid))

    def _evaluate(
        self,
        arrays: ArrayRecord,
        split: str,
        server_round: int,
        best_round: int = 0,
        label: str = "",
    ) -> dict[str, Any]:
        """Every site scores the model (server/evaluation.py); ``label`` names it in the log
        (the head refit's ``head refit validation``; default ``round N validation``, ``test``)."""
        return evaluate(
            self.run_config,
            self.classes,
            self.ordered_sites(),
            self._exchange,
            arrays,
            split,
            server_round,
            best_round,
            label,
        )

    # ------------------------------------------------------------------ messages, files
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
