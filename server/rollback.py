"""The rollback of rounds that break the model, around the pure checks of server/guard.py.

An aggregate is tried before it stands (normalisation statistics, outputs on seeded noise
images); one that breaks the model is undone, the strategy restored to its state before
the round, and the site whose update explains it (:func:`server.guard.leave_one_out`)
sits out ``exclude-rounds`` while the round is aggregated again without it. A round whose
validation collapses is undone the same way after the fact.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.models import set_weights
from server.arrays import array_record, numpy_state
from server.checkpoints import LoopState
from server.guard import leave_one_out, model_output_error, statistics_error
from server.updates import Aggregation, Updates, enough_updates

log = logging.getLogger("fedskin")
Snapshot = tuple[dict[str, Any], Any]


def snapshot(strategy: Any) -> Snapshot:
    """A copy of the strategy's state to restore after a rolled-back round: its attributes
    (FedAdam's moments, a clipping norm, ...) and a site-level DP accountant's state (the
    accountant itself holds modules, which do not copy)."""
    attrs = {k: v for k, v in vars(strategy).items() if k != "accountant"}
    accountant = getattr(strategy, "accountant", None)
    saved = None if accountant is None else copy.deepcopy(accountant.state_dict())
    return copy.deepcopy(attrs), saved


def restore(strategy: Any, saved: Snapshot) -> None:
    attrs, accountant = saved
    vars(strategy).update(copy.deepcopy(attrs))
    if accountant is not None:
        strategy.accountant.load_state_dict(copy.deepcopy(accountant))


def farthest(updates: Updates) -> str | None:
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


class Rollback:
    """The guard of one run: ``statistics`` names the model's normalisation statistics,
    ``new_model`` builds the run's model to try outputs on (None: statistics only). It
    keeps the last aggregated round's model, strategy state and updates to undo it."""

    def __init__(
        self,
        run: RunConfig,
        num_classes: int,
        statistics: frozenset[str],
        new_model: Callable[[], torch.nn.Module] | None,
    ) -> None:
        self.run, self.num_classes = run, num_classes
        self.statistics, self.new_model = statistics, new_model
        self._undo: tuple[ArrayRecord, Snapshot, Updates, Aggregation] | None = None

    def aggregate(
        self,
        aggregation: Aggregation,
        server_round: int,
        previous: ArrayRecord,
        updates: Updates,
        state: LoopState,
        record: dict[str, Any],
    ) -> ArrayRecord:
        """The round's aggregate when it does not break the model; else the aggregate
        without the site whose update did it (that site sits out), or ``previous``."""
        strategy = aggregation.strategy
        backup = snapshot(strategy)  # a rolled-back round leaves no trace
        self._undo = (previous, backup, updates, aggregation)
        new = aggregation(server_round, updates, record)
        if new is None:
            record["aggregated"] = False
            return previous
        why = self.broken(previous, new, server_round)
        if why is None:
            return new
        # The round broke the model: roll it back, name the site whose update did it.
        restore(strategy, backup)
        culprit = self.culprit(previous, updates, aggregation)
        record["rolled_back"] = {"why": why, "site": culprit or ""}
        log.error(
            "round %d rolled back: %s; %s",
            server_round,
            why,
            f"site {culprit} caused it and sits out {self.run.exclude_rounds} round(s)"
            if culprit
            else "no single site's update explains it",
        )
        if culprit is None:
            record["aggregated"] = False
            return previous
        state.excluded[culprit] = server_round + 1 + self.run.exclude_rounds
        updates.problems.reject(culprit, f"its update broke the global model ({why})")
        del updates.good[culprit]
        if not enough_updates(self.run, server_round, len(updates.good)):
            record["aggregated"] = False
            return previous
        new = aggregation(server_round, updates, record)
        if new is None or self.broken(previous, new, server_round) is not None:
            restore(strategy, backup)
            record["aggregated"] = False
            return previous
        return new

    def collapsed(self, validation: Mapping[str, Any], state: LoopState, sites: int) -> str | None:
        """Why the round's model must not stand after its validation, or None: most of the
        ``sites``' evaluation failed on non-finite outputs, or the pooled score fell below
        half of chance after an earlier round had reached chance."""
        if self._undo is None:
            return None
        failures = validation.get("failures", {})
        broken = [s for s, why in failures.items() if "non-finite" in why]
        if broken and 2 * len(broken) >= sites:
            return f"{len(broken)} of {sites} sites got non-finite outputs"
        chance = 1.0 / self.num_classes
        score = validation["decision_balanced_accuracy"]
        if state.best_score >= chance and (math.isnan(score) or score < chance / 2):
            return f"pooled validation balanced accuracy {score:.3f} is below half of chance"
        return None

    def roll_back(
        self, strategy: Any, server_round: int, why: str, state: LoopState, record: dict
    ) -> ArrayRecord:
        """The model before the round, the strategy as it was, and the site whose update
        explains it (the checks on the round's mean without it, else the update farthest
        from the others) sitting out ``exclude-rounds``."""
        assert self._undo is not None
        previous, backup, updates, aggregation = self._undo
        restore(strategy, backup)
        culprit = self.culprit(previous, updates, aggregation) or farthest(updates)
        record["aggregated"] = False
        record["rolled_back"] = {"why": why, "site": culprit or ""}
        if culprit:
            state.excluded[culprit] = server_round + 1 + self.run.exclude_rounds
        log.error(
            "round %d rolled back after validation: %s; %s",
            server_round,
            why,
            f"site {culprit} sits out {self.run.exclude_rounds} round(s)" if culprit else "",
        )
        return previous

    def broken(self, previous: ArrayRecord, new: ArrayRecord, server_round: int) -> str | None:
        """Why the aggregate breaks the model (server/guard.py), or None: normalisation
        statistics out of bounds, or outputs on seeded noise images not finite or far
        larger than the previous model's."""
        before, after = numpy_state(previous), numpy_state(new)
        if why := statistics_error(after, before, self.statistics):
            return why
        if self.new_model is None:
            return None
        seed = self.run.seed + server_round
        _, scale = model_output_error(self._model(before), self.run.image_size, seed)
        why, _ = model_output_error(
            self._model(after), self.run.image_size, seed, previous_scale=scale
        )
        return why

    def culprit(
        self, previous: ArrayRecord, updates: Updates, aggregation: Aggregation
    ) -> str | None:
        """The site whose exclusion makes the round's weighted mean pass the checks."""
        layout = aggregation.layout

        def check(mean: dict[str, np.ndarray]) -> str | None:
            return self.broken(previous, array_record(mean, layout), 0)

        return leave_one_out(updates.states(layout), aggregation.weights(updates), check)

    def _model(self, state: Mapping[str, np.ndarray]) -> torch.nn.Module:
        assert self.new_model is not None
        model = self.new_model()
        set_weights(model, dict(state))
        return model
