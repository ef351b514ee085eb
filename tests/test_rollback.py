"""Rounds that break the model are rolled back and the site that broke them sits out.

The real round loop (``server.loop.Federation``) with the run's real model (the default
``test_efficientnet``, BatchNorm and all) and four fake sites: three honest ones (the global
model plus small seeded steps) and one attacker whose update stays inside the norm bound.
Every site evaluates the model it receives for real, as client/task.py does: it fails on
non-finite scores, and otherwise scores it against the initial model's own answers on
seeded images (so an honest run scores near 1 and a flipped classifier near 0).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app import Error as FlowerError

from common.augment import to_float
from common.config import RunConfig
from common.fedmetrics import site_summary
from common.metrics import compute_metrics, scalar_metrics
from common.models import get_weights, model_for_run, set_weights
from common.rundir import load_checkpoint
from common.wire import layout_of, pack, unpack
from server.guard import noise_images
from server.loop import Federation
from server.server_app import statistics_of
from tests.helpers import assign_message_id
from tests.test_replies import (
    N_SPLIT,
    _no_plots,  # noqa: F401 - module fixture: no PNGs
    _task_identity,  # noqa: F401 - module fixture: Flower's task identity
    honest_info,
    train_metrics,
)

CLASSES = ["mel", "nv"]
HONEST = {"alpha": 40, "bravo": 60, "charlie": 80}
ATTACKER = "mallory"
ROUNDS = 3
STEP = 0.001  # honest per-weight step; running variances move by up to 10 %
CFG = {"num-server-rounds": ROUNDS, "round-timeout": 5.0, "batch-size": 16, "image-size": 16}

State = dict[str, np.ndarray]


def run_model() -> torch.nn.Module:
    return model_for_run(RunConfig.from_mapping(CFG), len(CLASSES), pretrained=False)


def _initial() -> State:
    """Seeded initial weights, the classifier scaled to 1/5 (so that flipping it fits
    in the norm bound of these small honest steps; its answers are the same)."""
    torch.manual_seed(0)
    state = {k: v.numpy().copy() for k, v in get_weights(run_model()).items()}
    state["classifier.weight"] = state["classifier.weight"] * np.float32(0.2)
    return state


INITIAL = _initial()
LAYOUT = layout_of(INITIAL)


def scores(state: State, images: torch.Tensor | None = None) -> np.ndarray:
    """The model's class probabilities on the sites' validation images."""
    model = run_model()
    set_weights(model, state)
    model.eval()
    with torch.no_grad():
        return torch.softmax(
            model(to_float(IMAGES if images is None else images)).double(), 1
        ).numpy()


def _validation() -> tuple[torch.Tensor, np.ndarray]:
    """N_SPLIT noise images, half of each class the initial model sees most clearly (so
    small honest steps keep its answers), and those answers as labels."""
    pool = noise_images(16, seed=7, count=400)
    probs = scores(INITIAL, pool)
    margin, answer = np.abs(probs[:, 1] - probs[:, 0]), probs.argmax(1)
    picked = [
        np.flatnonzero(answer == c)[np.argsort(-margin[answer == c])][: N_SPLIT // 2]
        for c in (0, 1)
    ]
    index = np.concatenate(picked)
    return pool[index], answer[index]


IMAGES, LABELS = _validation()


def evaluation(probs: np.ndarray) -> dict:
    """What client/task.py evaluate_site sends."""
    out = scalar_metrics(compute_metrics(LABELS, probs, CLASSES))
    return out | {"num-examples": N_SPLIT} | site_summary(LABELS, probs, len(CLASSES))


def honest_step(name: str, rnd: int, state: State) -> State:
    """Small seeded steps on the weights; running variances nudged, as after training."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), rnd])
    out = {}
    for k, v in state.items():
        a = np.array(v)
        if k.endswith("running_var"):
            a = a * (1 + 0.1 * rng.random(a.shape)).astype(a.dtype)
        elif np.issubdtype(a.dtype, np.floating):
            a = a + (STEP * rng.normal(size=a.shape)).astype(a.dtype)
        out[k] = a
    return out


class Grid:
    """Sites answer at once; ``attack(round, global state) -> state`` is the attacker's
    update (None: it trains honestly)."""

    def __init__(self, attack: Callable[[int, State], State] | None) -> None:
        self.sites = {100 + i: n for i, n in enumerate([*HONEST, ATTACKER])}
        self.attack = attack
        self.outbox: list[Message] = []
        self.count = 0
        self.trained_by: dict[int, list[str]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            self.count += 1
            assign_message_id(m, f"m{self.count}")
        self.outbox = list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return [self.answer(m) for m in self.outbox if m.metadata.message_id in ids]

    def answer(self, m: Message) -> Message:
        name = self.sites[m.metadata.dst_node_id]
        kind = m.metadata.message_type
        if kind == MessageType.QUERY:
            return Message(honest_info(name, HONEST.get(name, 50)), reply_to=m)
        state = unpack(m.content.array_records["arrays"], LAYOUT)
        rnd = int(m.content.config_records["config"]["server-round"])
        if kind == MessageType.EVALUATE:
            probs = scores(state)
            if not np.isfinite(probs).all():
                why = "the received model gives non-finite scores for its validation images"
                return Message(FlowerError(0, why), reply_to=m)
            return Message(RecordDict({"metrics": MetricRecord(evaluation(probs))}), reply_to=m)
        self.trained_by.setdefault(rnd, []).append(name)
        if name == ATTACKER and self.attack is not None:
            new = self.attack(rnd, state)
        else:
            new = honest_step(name, rnd, state)
        content = RecordDict(
            {
                "arrays": pack(new),
                "metrics": MetricRecord(train_metrics(HONEST.get(name, 50))),
                "site": ConfigRecord({"site": name}),
            }
        )
        return Message(content, reply_to=m)


def run(
    tmp_path: Path, attack: Callable[[int, State], State] | None, rounds: int = ROUNDS, **cfg
) -> tuple[dict, Grid]:
    flat = RunConfig.from_mapping(CFG | cfg | {"num-server-rounds": rounds}).to_flat()
    grid = Grid(attack)
    fed = Federation(grid, RunConfig.from_flat(flat), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=4, wait=0)
    stats = statistics_of(run_model())
    initial = {k: torch.from_numpy(v.copy()) for k, v in INITIAL.items()}
    fed.run(initial, rounds, resume=False, statistics=stats, model=run_model)
    return json.loads((tmp_path / "metrics.json").read_text()), grid


# ------------------------------------------------------------------ attacks in the bound
def negative_variance(rnd: int, state: State) -> State:
    """From round 2, one running_var entry at -8 (the update's norm, ~9, stays inside
    10 x the honest median of ~1.7); FedAvg's mean of it is negative."""
    out = honest_step(ATTACKER, rnd, state)
    if rnd < 2:
        return out
    key = next(k for k in out if k.endswith("running_var"))
    out[key] = out[key].copy()
    out[key].flat[0] = -8.0
    return out


def vanishing_variance(rnd: int, state: State) -> State:
    """From round 2 (round 1 starts from PyTorch's initial statistics, which real data
    move a lot), one running_var entry chosen so that the weighted mean is 0.005, 200 x
    smaller: that channel's activations grow 14-fold (the honest steps are seeded, so the
    attacker can compute them)."""
    out = honest_step(ATTACKER, rnd, state)
    if rnd < 2:
        return out
    key = next(k for k in out if k.endswith("running_var"))
    honest = sum(n * honest_step(s, rnd, state)[key].flat[0] for s, n in HONEST.items())
    out[key] = out[key].copy()
    out[key].flat[0] = np.float32((230 * 5e-3 - honest) / 50)  # weights 40, 60, 80 and 50
    return out


def flipped_head(rnd: int, state: State) -> State:
    """From round 2, the classifier pointed the other way, 5x over (inside the bound):
    FedAvg's mean flips every prediction."""
    out = honest_step(ATTACKER, rnd, state)
    if rnd >= 2:
        key = next(k for k in out if k.endswith("weight") and out[k].ndim == 2)
        out[key] = -5.0 * state[key]
    return out


def fixed_direction(rnd: int, state: State) -> State:
    """From round 2, an update along one fixed direction (against the classifier) at 0.9 x
    the norm bound: 10 x the smallest honest update's norm (the honest steps are seeded, so
    the attacker can compute them; the loop's bound is at least this)."""
    if rnd < 2:
        return honest_step(ATTACKER, rnd, state)
    norms = []
    for name in HONEST:
        step = honest_step(name, rnd, state)
        norms.append(np.sqrt(sum(float(np.sum((step[k] - state[k]) ** 2.0)) for k in step)))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)
    direction = -state[key] / np.linalg.norm(state[key])
    out = {k: np.array(v) for k, v in state.items()}
    out[key] = (state[key] + 0.9 * 10.0 * min(norms) * direction).astype(state[key].dtype)
    return out


def test_an_honest_run_is_never_rolled_back(tmp_path: Path) -> None:
    metrics, grid = run(tmp_path, None)
    assert [r["aggregated"] for r in metrics["rounds"]] == [True] * ROUNDS
    assert not any("rolled_back" in r for r in metrics["rounds"])
    assert all(len(grid.trained_by[r]) == 4 for r in range(1, ROUNDS + 1))
    assert metrics["rounds"][-1]["validation"]["global"]["balanced_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("attack", "reason", "strategy"),
    [
        (negative_variance, "is negative", "fedavg"),
        (negative_variance, "is negative", "fedadam"),
        (vanishing_variance, "changed by a factor", "fedavg"),
    ],
)
def test_a_statistic_that_breaks_the_model_is_rolled_back_and_its_site_named(
    attack: Callable[[int, State], State], reason: str, strategy: str, tmp_path: Path
) -> None:
    cfg = {"exclude-rounds": 1, "strategy": strategy}
    metrics, grid = run(tmp_path, attack, rounds=4, **cfg)
    assert "rolled_back" not in metrics["rounds"][0]
    second = metrics["rounds"][1]
    assert second["rolled_back"]["site"] == ATTACKER and reason in second["rolled_back"]["why"]
    assert second["aggregated"] and ATTACKER in second["rejected"]  # again, without it
    # no honest evaluation failed; the attacker sat out round 3 and was back in round 4
    assert all(not r["validation"]["failures"] for r in metrics["rounds"])
    assert ATTACKER not in grid.trained_by[3] and ATTACKER in grid.trained_by[4]
    assert metrics["rounds"][-1]["validation"]["global"]["balanced_accuracy"] > 0.5
    for name in ("best", "last"):  # every checkpoint loads into the run's model as it is
        arrays = load_checkpoint(tmp_path / "checkpoints" / f"{name}.pt")["arrays"]
        set_weights(run_model(), arrays)


@pytest.mark.parametrize("attack", [flipped_head, fixed_direction])
def test_a_round_whose_validation_collapses_below_chance_is_rolled_back(
    attack: Callable[[int, State], State], tmp_path: Path
) -> None:
    metrics, grid = run(tmp_path, attack, **{"exclude-rounds": 1})
    second = metrics["rounds"][1]
    assert second["rolled_back"]["site"] == ATTACKER
    assert "below half of chance" in second["rolled_back"]["why"]
    assert second["validation"]["global"]["balanced_accuracy"] > 0.5  # the round-1 model
    assert ATTACKER not in grid.trained_by[3]
    assert metrics["test"]["global"]["balanced_accuracy"] > 0.5
