"""Every site reply is checked before it touches the federation (server/replies.py).

The real round loop (``server.loop.Federation``: discovery, training rounds, evaluation,
FedAvg, reports) runs against a grid of fake sites: three honest ones and one that sends a
crafted reply. Each crafted reply is rejected by name, the run completes with the honest
sites, and the global models are exactly those of a run without the bad site.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.config import RunConfig, steps_for
from common.fedmetrics import BINS
from server.loop import Federation
from server.replies import (
    TRAIN_KEYS,
    TRAIN_KEYS_DP,
    discovery_error,
    evaluate_keys,
    evaluate_reply_error,
    guarded,
    key_set_error,
    norm_bound_errors,
    printable,
    site_name_error,
    site_skeleton,
    train_reply_error,
    update_norm,
)
from tests import helpers

CLASSES = ["mel", "nv"]
HONEST = {"alpha": 40, "bravo": 60, "charlie": 80}  # site -> n-train
N_SPLIT = 10  # validation and test images per site
ROUNDS = 3
BAD = "mallory"


@pytest.fixture(autouse=True, scope="module")
def _task_identity() -> None:
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


@pytest.fixture(autouse=True, scope="module")
def _no_plots() -> Iterator[None]:
    """metrics.json and the rest as usual, without the PNGs (~0.5 s a run, not under test)."""
    import server.loop
    from server.report import write_outputs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.loop, "write_outputs", functools.partial(write_outputs, plots=False))
        yield


# ------------------------------------------------------------------ honest fake sites
def honest_info(name: str, n_train: int) -> RecordDict:
    info = {
        "site": name,
        "classes": json.dumps(CLASSES),
        "n-train": n_train,
        "n-validation": N_SPLIT,
        "n-test": N_SPLIT,
    }
    return RecordDict({"info": ConfigRecord(info)})


def train_metrics(n_train: int) -> dict[str, int | float]:
    """The keys client/client_app.py sends after common/train.py train_local."""
    return {
        "train_loss": 0.5,
        "train_accuracy": 0.75,
        "num_examples": float(n_train),
        "steps": 4.0,
        "seconds": 0.1,
        "images_per_second": 400.0,
        "num-examples": n_train,
    }


def honest_train(name: str, n_train: int, msg: Message) -> RecordDict:
    """Global weights plus small site- and round-seeded steps; integer buffers unchanged."""
    rnd = int(msg.content.config_records["config"]["server-round"])
    rng = np.random.default_rng([zlib.crc32(name.encode()), rnd])
    out = {}
    for k, v in msg.content.array_records["arrays"].items():
        a = np.array(v.numpy())
        if np.issubdtype(a.dtype, np.floating):
            a = a + (0.01 * rng.normal(size=a.shape)).astype(a.dtype)
        out[k] = Array(a)
    return RecordDict(
        {
            "arrays": ArrayRecord(out),
            "metrics": MetricRecord(train_metrics(n_train)),
            "site": ConfigRecord({"site": name}),
        }
    )


def eval_metrics(rnd: int) -> dict[str, Any]:
    """Poolable evaluation of N_SPLIT images (5 per class); best in round 2."""
    right = {1: 3, 2: 5, 3: 4}.get(rnd, 4)
    conf = [right, 5 - right, 5 - right, right]
    hist = np.zeros((2, 2, BINS), np.int64)
    for k in range(2):
        hist[k, 0, 40], hist[k, 0, 10], hist[k, 1, 5] = right, 5 - right, 5
    acc = right / 5
    return {
        "accuracy": acc,
        "balanced_accuracy": acc,
        "auroc": 0.6,
        "auroc_mel": 0.6,
        "auroc_nv": 0.6,
        "recall_mel": acc,
        "recall_nv": acc,
        "num-examples": N_SPLIT,
        "confusion": conf,
        "score-hist": hist.ravel().tolist(),
    }


def honest_evaluate(msg: Message) -> RecordDict:
    rnd = int(msg.content.config_records["config"]["server-round"])
    return RecordDict({"metrics": MetricRecord(eval_metrics(rnd))})


Tamper = Callable[[RecordDict], RecordDict]


@dataclass
class Site:
    """A fake SuperNode: honest replies, optionally rewritten by ``query``/``train``/
    ``evaluate`` (each takes the honest content and returns what is sent)."""

    name: str
    n_train: int
    query: Tamper | None = None
    train: Tamper | None = None
    evaluate: Tamper | None = None

    def answer(self, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            content, tamper = honest_info(self.name, self.n_train), self.query
        elif kind == MessageType.TRAIN:
            content, tamper = honest_train(self.name, self.n_train, msg), self.train
        else:
            content, tamper = honest_evaluate(msg), self.evaluate
        return tamper(content) if tamper else content


class FakeGrid(helpers.FakeGrid):
    """Answers every pushed message at once, in the order sent; keeps the global models
    that the first site (``alpha``) was asked to evaluate (each round's and the test's)."""

    def __init__(self, sites: list[Site]) -> None:
        super().__init__({100 + i: s for i, s in enumerate(sites)})
        self.evaluated: list[dict[str, np.ndarray]] = []

    def answer(self, msg: Message) -> Message:
        site = self.nodes[msg.metadata.dst_node_id]
        if site.name == "alpha" and msg.metadata.message_type == MessageType.EVALUATE:
            arrays = msg.content.array_records["arrays"]
            self.evaluated.append({k: np.array(v.numpy()) for k, v in arrays.items()})
        return Message(site.answer(msg), reply_to=msg)


def initial_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.bias": torch.randn(2, generator=g),
    }


def honest_sites() -> list[Site]:
    return [Site(name, n) for name, n in HONEST.items()]


@dataclass
class Run:
    grid: FakeGrid
    metrics: dict[str, Any]
    log: list[str]


@pytest.fixture
def fedskin_log() -> Iterator[list[str]]:
    """The fedskin logger's lines (the runner may have stopped its propagation)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fedskin")
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level=: it clears the loggers' caches
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def run_federation(run_dir: Path, sites: list[Site], log: list[str] | None = None, **cfg) -> Run:
    """The real loop: discovery, ROUNDS rounds of FedAvg with validation, the test."""
    values = {"num-server-rounds": ROUNDS, "round-timeout": 5.0, "batch-size": 16, **cfg}
    flat = RunConfig.from_mapping(values).to_flat()
    grid = FakeGrid(sites)
    fed = Federation(grid, RunConfig.from_flat(flat), run_dir, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=3, wait=0)
    fed.run(initial_model(), ROUNDS, resume=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return Run(grid, metrics, list(log or []))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The run of the three honest sites alone."""
    return run_federation(tmp_path_factory.mktemp("baseline"), honest_sites())


def assert_same_models(run: Run, baseline: Run) -> None:
    assert len(run.grid.evaluated) == len(baseline.grid.evaluated) == ROUNDS + 1
    for got, want in zip(run.grid.evaluated, baseline.grid.evaluated, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_the_honest_run_trains_and_picks_its_best_round(baseline: Run) -> None:
    m = baseline.metrics
    assert [r["aggregated"] for r in m["rounds"]] == [True] * ROUNDS
    assert all(sorted(r["train"]) == sorted(HONEST) and not r["rejected"] for r in m["rounds"])
    assert m["best_round"] == 2
    first, last = baseline.grid.evaluated[0], baseline.grid.evaluated[ROUNDS - 1]
    assert not np.array_equal(first["packed/<f4"], last["packed/<f4"])  # it did train


# ----------------------------------------------------------------- crafted train replies
def _floats(content: RecordDict, change: Callable[[np.ndarray], np.ndarray]) -> RecordDict:
    arrays = content.array_records["arrays"]
    out = {
        k: Array(change(np.array(v.numpy())) if k == "packed/<f4" else v.numpy())
        for k, v in arrays.items()
    }
    content["arrays"] = ArrayRecord(out)
    return content


def _metric(content: RecordDict, key: str, value: Any = None, drop: bool = False) -> RecordDict:
    metrics = dict(content.metric_records["metrics"])
    if drop:
        del metrics[key]
    else:
        metrics[key] = value
    content["metrics"] = MetricRecord(metrics)
    return content


def _without(content: RecordDict, name: str) -> RecordDict:
    del content[name]
    return content


def _replace(name: str, record: Any) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        content[name] = record
        return content

    return tamper


TRAIN_ATTACKS: dict[str, tuple[Tamper, str, dict[str, Any]]] = {
    "huge-1e4": (lambda c: _floats(c, lambda a: a + 1e4), "exceeds update-norm-cap=10000", {}),
    "huge-1e30": (lambda c: _floats(c, lambda a: a + 1e30), "exceeds update-norm-cap", {}),
    "huge-1e4-no-cap": (
        lambda c: _floats(c, lambda a: a + 1e4),
        "exceeds update-norm-factor=10 x the median",
        {"update-norm-cap": 0.0},
    ),
    "complex-dtype": (
        lambda c: _floats(c, lambda a: (a + 1e3j).astype(np.complex64)),
        "wrong dtype for packed/<f4: complex64 instead of float32",
        {},
    ),
    "ints-for-floats": (
        lambda c: _floats(c, lambda a: a.astype(np.int32)),
        "wrong dtype for packed/<f4: int32",
        {},
    ),
    "num-examples-1e9": (
        lambda c: _metric(c, "num-examples", 10**9),
        "num-examples=1000000000 is outside 1..50",
        {},
    ),
    "num-examples-negative": (
        lambda c: _metric(c, "num-examples", -5),
        "num-examples=-5 is outside 1..50",
        {},
    ),
    "num-examples-float": (
        lambda c: _metric(c, "num-examples", 50.0),
        "num-examples=50.0 is not an integer",
        {},
    ),
    "list-metric": (
        lambda c: _metric(c, "train_loss", [0.1, 0.2]),
        "metric 'train_loss' is list, not a number",
        {},
    ),
    "nan-metric": (
        lambda c: _metric(c, "train_accuracy", math.nan),
        "metric 'train_accuracy' is not finite",
        {},
    ),
    "extra-metric-key": (
        lambda c: _metric(c, "gradient-norm", 1.0),
        "unexpected ['gradient-norm']",
        {},
    ),
    "server-weight-key": (
        lambda c: _metric(c, "site-weight", 1000),
        "unexpected ['site-weight']",
        {},
    ),
    "missing-metric-key": (
        lambda c: _metric(c, "train_loss", drop=True),
        "missing ['train_loss']",
        {},
    ),
    "missing-arrays": (lambda c: _without(c, "arrays"), "no 'arrays' ArrayRecord", {}),
    "missing-metrics": (lambda c: _without(c, "metrics"), "no 'metrics' MetricRecord", {}),
    "metrics-as-config": (
        _replace("metrics", ConfigRecord({"num-examples": "50"})),
        "no 'metrics' MetricRecord",
        {},
    ),
}


@pytest.mark.parametrize("attack", sorted(TRAIN_ATTACKS))
def test_a_crafted_update_is_rejected_every_round_and_changes_nothing(
    attack: str, tmp_path: Path, baseline: Run, fedskin_log: list[str]
) -> None:
    tamper, reason, cfg = TRAIN_ATTACKS[attack]
    sites = [*honest_sites(), Site(BAD, 50, train=tamper)]
    run = run_federation(tmp_path, sites, fedskin_log, **cfg)
    for r in run.metrics["rounds"]:
        assert BAD in r["sampled"] and BAD not in r["train"]
        assert reason in r["rejected"][BAD], r["rejected"]
        assert sorted(r["train"]) == sorted(HONEST) and r["aggregated"]
    assert "test" in run.metrics
    assert sum(f"update from site {BAD} rejected" in line for line in run.log) == ROUNDS
    assert_same_models(run, baseline)


def test_honest_sites_of_other_versions_aggregate_on_their_shared_keys(
    tmp_path: Path, baseline: Run
) -> None:
    """One site sends the optional DP keys, the others do not: Flower would refuse such a
    mix (InconsistentMessageReplies); the loop passes the keys all replies share."""
    dp = {"epsilon": 0.5, "delta": 1e-5, "noise_multiplier": 1.1, "dp-budget-exhausted": 0}

    def with_dp(content: RecordDict) -> RecordDict:
        metrics = dict(content.metric_records["metrics"]) | dp
        for key in ("train_loss", "train_accuracy"):  # not sent under sample-level DP
            del metrics[key]
        content["metrics"] = MetricRecord(metrics)
        return content

    sites = honest_sites()
    sites[1].train = with_dp
    run = run_federation(tmp_path, sites)
    for r in run.metrics["rounds"]:
        assert sorted(r["train"]) == sorted(HONEST) and not r["rejected"]
        assert r["epsilon"] == {"bravo": 0.5}
    assert_same_models(run, baseline)


def test_a_site_that_did_not_train_is_reported_not_aggregated(tmp_path: Path) -> None:
    spent = {k: 0 for k in TRAIN_KEYS_DP} | {"epsilon": 7.9, "dp-budget-exhausted": 1}
    sites = [
        *honest_sites(),
        Site(BAD, 50, train=_replace("metrics", MetricRecord(spent))),
    ]
    run = run_federation(tmp_path, sites)
    for r in run.metrics["rounds"]:
        assert r["rejected"] == {BAD: "privacy budget spent"} and r["epsilon"] == {BAD: 7.9}


def test_a_robust_strategy_left_short_of_updates_keeps_the_global_model(
    tmp_path: Path, fedskin_log: list[str]
) -> None:
    """Krum needs 3 updates at robust-malicious=0: with one of three sites rejected, the
    round keeps the global model (named in the log) instead of letting Krum fail."""
    first, second, _ = honest_sites()
    bad = Site(BAD, 50, train=lambda c: _floats(c, lambda a: a + 1e4))
    run = run_federation(
        tmp_path, [first, second, bad], fedskin_log, strategy="krum", **{"robust-malicious": 0}
    )
    for r in run.metrics["rounds"]:
        assert BAD in r["rejected"] and r["aggregated"] is False
    assert sum("strategy krum); global model kept" in line for line in run.log) == ROUNDS
    assert "test" in run.metrics
    sent = run.grid.evaluated
    for k in sent[0]:  # every model sent out is the initial one
        for model in sent[1:]:
            np.testing.assert_array_equal(model[k], sent[0][k])


# ------------------------------------------------------------ crafted evaluation replies
def _eval(change: Callable[[dict[str, Any]], None]) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        metrics = dict(content.metric_records["metrics"])
        change(metrics)
        content["metrics"] = MetricRecord(metrics)
        return content

    return tamper


def _inflate(m: dict[str, Any]) -> None:
    m["confusion"] = [10**12, 0, 0, 10**12]
    m["balanced_accuracy"] = m["accuracy"] = 1.0


def _negative(m: dict[str, Any]) -> None:
    m["confusion"] = [-999990, 5, 5, 0]


EVAL_ATTACKS: dict[str, tuple[Tamper, str]] = {
    "short-confusion": (
        _eval(lambda m: m.update(confusion=[5, 0, 5])),
        "confusion has 3 entries instead of 4",
    ),
    "inflated-confusion": (_eval(_inflate), "more than the 10 reported at discovery"),
    "negative-counts": (_eval(_negative), "confusion holds negative counts"),
    "short-score-hist": (
        _eval(lambda m: m.update({"score-hist": [1, 2, 3]})),
        "score-hist has 3 entries instead of 200",
    ),
    "score-hist-inflated": (
        _eval(lambda m: m.update({"score-hist": [10**9] * (4 * BINS)})),
        "score-hist counts",
    ),
    "score-above-one": (
        _eval(lambda m: m.update(balanced_accuracy=5.0)),
        "'balanced_accuracy'=5.0 is outside [0, 1]",
    ),
    "num-examples-1e9": (
        _eval(lambda m: m.update({"num-examples": 10**9})),
        "num-examples=1000000000 is outside 0..10",
    ),
    "list-for-scalar": (
        _eval(lambda m: m.update(auroc=[0.5, 0.5])),
        "metric 'auroc' is list, not a number",
    ),
    "extra-key": (_eval(lambda m: m.update(loss=0.1)), "unexpected ['loss']"),
    "missing-metrics": (lambda c: _without(c, "metrics"), "no 'metrics' MetricRecord"),
}


@pytest.mark.parametrize("attack", sorted(EVAL_ATTACKS))
def test_a_crafted_evaluation_is_rejected_and_decides_nothing(
    attack: str, tmp_path: Path, baseline: Run, fedskin_log: list[str]
) -> None:
    """The site holds no train data (its train replies say so) and sends crafted scores at
    every validation and at the test: the best round, the pooled scores and the models are
    those of the honest run."""
    tamper, reason = EVAL_ATTACKS[attack]
    run = run_federation(tmp_path, [*honest_sites(), Site(BAD, 0, evaluate=tamper)], fedskin_log)
    m, want = run.metrics, baseline.metrics
    for r, honest in zip(m["rounds"], want["rounds"], strict=True):
        assert r["rejected"] == {BAD: "no data"}
        assert reason in r["validation"]["rejected"][BAD], r["validation"]["rejected"]
        assert r["validation"]["global"] == honest["validation"]["global"]
        assert sorted(r["validation"]["sites"]) == sorted(HONEST)
    assert reason in m["test"]["rejected"][BAD]
    assert m["test"]["global"] == want["test"]["global"]
    assert m["best_round"] == want["best_round"] == 2
    assert sum(f"reply from site {BAD} rejected" in line for line in run.log) == ROUNDS + 1
    assert_same_models(run, baseline)


# ------------------------------------------------------------- crafted discovery replies
def _info(**changes: Any) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        info = dict(content.config_records["info"])
        for k, v in changes.items():
            if v is None:
                del info[k]
            else:
                info[k] = v
        content["info"] = ConfigRecord(info)
        return content

    return tamper


DISCOVERY_ATTACKS: dict[str, tuple[Tamper, str]] = {
    "n-train-lots": (_info(**{"n-train": "lots"}), "n-train='lots' is not a non-negative integer"),
    "n-train-negative": (_info(**{"n-train": -1}), "n-train=-1 is not a non-negative integer"),
    "n-test-float": (_info(**{"n-test": 2.5}), "n-test=2.5 is not a non-negative integer"),
    "n-validation-missing": (
        _info(**{"n-validation": None}),
        "n-validation=None is not a non-negative integer",
    ),
    "empty-name": (_info(site="  "), "is not a non-empty name"),
    "name-not-a-string": (_info(site=7), "site=7 is not a non-empty name"),
    "control-characters": (_info(site="a\nb"), "is not a printable name"),
    "no-info": (lambda c: RecordDict(), "no 'info' ConfigRecord"),
    # a duplicate name rejects both nodes: tests/test_sizes.py
    "counts-not-n-train": (
        _info(**{"train-counts": [1, 2]}),
        "train-counts sum to 3, not n-train=50",
    ),
    "counts-negative": (
        _info(**{"train-counts": [-1, 51]}),
        "train-counts=[-1, 51] is not a list of non-negative integers",
    ),
    "counts-per-class": (
        _info(**{"train-counts": [10, 20, 20]}),
        "train-counts has 3 entries for 2 classes",
    ),
}


@pytest.mark.parametrize("attack", sorted(DISCOVERY_ATTACKS))
def test_a_crafted_discovery_reply_rejects_that_node(
    attack: str, tmp_path: Path, baseline: Run, fedskin_log: list[str]
) -> None:
    tamper, reason = DISCOVERY_ATTACKS[attack]
    run = run_federation(tmp_path, [*honest_sites(), Site(BAD, 50, query=tamper)], fedskin_log)
    rejected = run.metrics["test"]["rejected-at-discovery"]
    (who,) = rejected
    assert who.startswith("node 103") and reason in rejected[who]
    assert any(line.startswith("node 103") and reason in line for line in run.log)
    for r in run.metrics["rounds"]:
        assert sorted(r["sampled"]) == sorted(HONEST) and not r["rejected"]
    assert_same_models(run, baseline)


def test_min_nodes_is_enforced(tmp_path: Path) -> None:
    fed = Federation(FakeGrid(honest_sites()[:2]), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError) as err:
        fed.discover(expected=3, wait=0.2)
    assert str(err.value) == (
        "only 2 site(s) connected within wait-for-nodes=0.2s; min-nodes=3 are needed"
    )
    sites = [*honest_sites()[:2], Site(BAD, 5, query=_info(**{"n-train": "lots"}))]
    fed = Federation(FakeGrid(sites), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"^only 2 usable site\(s\) of the 3 connected"):
        fed.discover(expected=3, wait=0)
    fed = Federation(FakeGrid(sites), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    assert [s.site for s in fed.discover(expected=2, wait=0)] == ["alpha", "bravo"]


# ------------------------------------------------------------------- replies.py units
REF = {"packed/<f4": np.zeros(6, np.float32), "packed/<i8": np.array([3], np.int64)}


def _train_content(**metrics: Any) -> RecordDict:
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in REF.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({**train_metrics(20), **metrics})})


def test_train_reply_checks() -> None:
    assert train_reply_error(_train_content(), REF, 20) is None
    assert train_reply_error(_train_content(**{"num-examples": 20}), REF, 19) == (
        "num-examples=20 is outside 1..19 (n-train at discovery)"
    )
    # a site that did not train: only num-examples = 0 is required
    assert (
        train_reply_error(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), REF, 5)
        is None
    )
    assert train_reply_error(_train_content(**{"num-examples": 0}), REF, 5) is None
    content = _train_content()
    content["arrays"] = ArrayRecord({"packed/<f4": Array(np.zeros(6, np.float32))})
    assert "wrong keys (missing ['packed/<i8']" in train_reply_error(content, REF, 20)
    content["arrays"] = ArrayRecord(
        {"packed/<f4": Array(np.zeros(5, np.float32)), "packed/<i8": Array(REF["packed/<i8"])}
    )
    assert "wrong shape for packed/<f4" in train_reply_error(content, REF, 20)
    inf = np.zeros(6, np.float32)
    inf[2] = np.inf
    content["arrays"] = ArrayRecord(
        {"packed/<f4": Array(inf), "packed/<i8": Array(REF["packed/<i8"])}
    )
    assert train_reply_error(content, REF, 20) == "non-finite values (NaN/Inf) in packed/<f4"
    dp = {**train_metrics(20), "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}
    dp["dp-budget-exhausted"] = 0
    assert "missing [], unexpected ['train_accuracy', 'train_loss']" in train_reply_error(
        _train_content(**dp), REF, 20
    )
    for key in ("train_loss", "train_accuracy"):
        del dp[key]
    content = _train_content()
    content["metrics"] = MetricRecord(dp)
    assert train_reply_error(content, REF, 20) is None


def test_the_train_keys_are_those_the_client_sends() -> None:
    """The client's own lists (tests/test_site_control.py checks them against its replies)."""
    from client import client_app

    assert TRAIN_KEYS == client_app.TRAIN_KEYS and TRAIN_KEYS_DP == client_app.TRAIN_KEYS_DP
    assert set(train_metrics(1)) == TRAIN_KEYS


def test_the_evaluation_keys_are_those_the_client_sends() -> None:
    """evaluate_keys mirrors client/task.py evaluate_site."""
    from common.data.site_data import classes_for
    from common.fedmetrics import site_summary
    from common.metrics import compute_metrics, scalar_metrics

    for classes in (CLASSES, classes_for("synth-ham"), classes_for("isic2020")):
        y = np.arange(8) % len(classes)
        probs = np.full((8, len(classes)), 1 / len(classes))
        sent = set(scalar_metrics(compute_metrics(y, probs, classes)))
        sent |= {"num-examples"} | set(site_summary(y, probs, len(classes)))
        assert sent == evaluate_keys(classes), classes
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        **scalar_metrics(compute_metrics(y, probs, classes)),
                        "num-examples": 8,
                        **site_summary(y, probs, len(classes)),
                    }
                )
            }
        )
        assert evaluate_reply_error(content, classes, 8) is None
        assert "more than the 7" in evaluate_reply_error(content, classes, 7)


def test_update_norm_and_its_bounds() -> None:
    update = ArrayRecord(
        {"packed/<f4": Array(np.full(6, 2.0, np.float32)), "packed/<i8": Array(np.array([3]))}
    )
    assert update_norm(update, REF) == pytest.approx(math.sqrt(6 * 4.0))
    huge = ArrayRecord(
        {"packed/<f4": Array(np.full(6, 3e38, np.float32)), "packed/<i8": Array(np.array([3]))}
    )
    assert math.isfinite(update_norm(huge, REF))  # float64: no overflow at float32's limit
    norms = {"a": 1.0, "b": 1.5, "c": 2.0, "d": 25.0}
    assert norm_bound_errors(norms, 10.0, 0.0) == {
        "d": "update norm 25 exceeds update-norm-factor=10 x the median 1.5 of the other updates"
    }
    assert norm_bound_errors(norms, 0.0, 0.0) == {}  # both off
    assert set(norm_bound_errors(norms, 0.0, 2.0)) == {"d"}  # cap only
    assert norm_bound_errors({"a": 1.0, "d": 25.0}, 10.0, 0.0) == {}  # fewer than three
    # a site taking 20x the steps of the others may move 20x as far
    assert norm_bound_errors(norms, 10.0, 0.0, {"a": 5, "b": 5, "c": 5, "d": 100}) == {}
    assert set(norm_bound_errors({**norms, "e": math.inf}, 10.0, 1e4)) == {"d", "e"}
    assert steps_for(100, 32, 2, 0) == 8 and steps_for(100, 32, 2, 5) == 5


def test_discovery_and_guard() -> None:
    assert discovery_error(honest_info("alpha", 3)) is None
    assert discovery_error(_info(**{"n-train": True})(honest_info("a", 3))) == (
        "n-train=True is not a non-negative integer"
    )

    def broken(content: RecordDict) -> str | None:
        return str(content["info"]["site"] + 1)

    why = guarded(broken, honest_info("alpha", 3))
    assert why is not None and why.startswith("malformed reply (TypeError: ")


# ------------------------------------------------------------- the federation's class prior
class RecordingGrid(FakeGrid):
    """A FakeGrid that also keeps the config of every train message it was given."""

    def __init__(self, sites: list[Site]) -> None:
        super().__init__(sites)
        self.train_configs: list[dict[str, Any]] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN:
                self.train_configs.append(dict(m.content.config_records["config"]))
        return super().push_messages(messages)


def _counted(counts: dict[str, list[int]]) -> list[Site]:
    return [
        Site(name, n, query=_info(**{"train-counts": counts[name]}) if name in counts else None)
        for name, n in HONEST.items()
    ]


def _train_configs(tmp_path: Path, sites: list[Site], **cfg: Any) -> list[dict[str, Any]]:
    values = {"num-server-rounds": 2, "round-timeout": 5.0, "class-prior": "federation", **cfg}
    flat = RunConfig.from_mapping(values).to_flat()
    grid = RecordingGrid(sites)
    fed = Federation(grid, RunConfig.from_flat(flat), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=3, wait=0)
    fed.run(initial_model(), 2, resume=False)
    assert len(grid.train_configs) == 2 * len(sites)
    return grid.train_configs


COUNTS = {"alpha": [40, 0], "bravo": [10, 50], "charlie": [5, 75]}


def test_every_site_trains_with_the_federations_class_counts(tmp_path: Path) -> None:
    """The sum of what the sites reported at discovery goes with every train message."""
    configs = _train_configs(tmp_path, _counted(COUNTS))
    assert all(list(c["class-counts"]) == [55, 125] for c in configs)
    network = json.loads((tmp_path / "network.json").read_text())
    assert "train-counts" in network["query"]["info"]  # shown as crossing the network


def test_no_counts_are_sent_when_a_site_withholds_them_or_the_prior_is_the_sites(
    tmp_path: Path, fedskin_log: list[str]
) -> None:
    partial = {k: v for k, v in COUNTS.items() if k != "bravo"}
    configs = _train_configs(tmp_path / "a", _counted(partial))
    assert not any("class-counts" in c for c in configs)
    assert any("bravo sent no class counts" in line for line in fedskin_log)
    configs = _train_configs(tmp_path / "b", _counted(COUNTS), **{"class-prior": "site"})
    assert not any("class-counts" in c for c in configs)


# ------------------------------------------------- site text in the log and metrics.json
def test_printable_removes_escapes_newlines_and_controls() -> None:
    raw = "\x1b[31mred\x1b[0m line1\nline2\r\n\ttab \x1b]0;pwned title\x07end \x1b[2J"
    shown = printable(raw)
    assert shown == "red line1 line2 tab end"
    assert printable("bell\x07 rtl\u202eevil zw\u200bj \x9b31mC1") == (
        "bell\\x07 rtl\\u202eevil zw\\u200bj C1"  # 8-bit CSI: a whole sequence too
    )
    long = printable("x" * 500, limit=50)
    assert len(long) == 50 and long.endswith("...")
    assert printable("plain text, kept: é ü 漢") == "plain text, kept: é ü 漢"
    for text in (raw, "\x1b", "\x1b[", "a\x1b]8;;http://x\x1b\\b", "\u2028\x85\x0b"):
        out = printable(text)
        assert out.isprintable() and "\x1b" not in out and "\n" not in out, out


def test_site_supplied_text_in_reasons_is_one_clean_line() -> None:
    """Keys and exception texts a site controls reach a reason only through printable."""
    why = key_set_error(["num-examples", "\x1b[2Jevil\nFAKE LOG LINE"], ["num-examples"])
    assert why is not None and "\n" not in why and "\x1b" not in why
    assert "evil FAKE LOG LINE" in why

    def raises(content: RecordDict) -> str | None:
        raise ValueError("bad\n\x1b[31mINFO round 9: all good\x1b[0m" + "y" * 300)

    why = guarded(raises, RecordDict())
    assert why is not None and why.isprintable() and "\x1b" not in why and len(why) < 200
    assert "bad INFO round 9: all good" in why
    assert discovery_error(_info(site="a\x1b[2Jb")(honest_info("a", 3))) == (
        "site='a\\x1b[2Jb' is not a printable name of at most 200"
    )


@pytest.mark.parametrize(
    ("name", "taken", "match"),
    [
        ("\u0430lpha", [], "not a plain ASCII name"),  # Cyrillic a
        ("\u0430lpha", ["alpha"], "not a plain ASCII name"),
        ("alpha\u200b", [], "not a plain ASCII name"),  # zero-width space
        ("\uff41lpha", [], "not a plain ASCII name"),  # fullwidth a: NFKC changes it
        ("al\npha", [], "not a plain ASCII name"),
        ("Zürich", [], "not a plain ASCII name"),
        ("  ", [], "not a non-empty name"),
        (7, [], "not a non-empty name"),
        (" alpha", [], "leading, trailing or repeated spaces"),
        ("x" * 201, [], "longer than 200"),
        ("alpha", ["alpha"], "^site 'alpha' is already claimed by another node$"),
        ("Alpha", ["alpha"], "confusable with the site 'alpha'"),
        ("site-1", ["site_l"], "confusable with the site 'site_l'"),
        ("clinic-m", ["clinic-rn"], "confusable"),
        ("h0spital", ["hospital"], "confusable"),
        ("sIte", ["\u0455ite"], "confusable|claimed"),  # taken list is what was accepted
    ],
)
def test_site_name_error_refuses_homoglyphs_and_confusables(
    name: Any, taken: list[str], match: str
) -> None:
    why = site_name_error(name, taken)
    if match == "confusable|claimed":  # a non-ASCII taken name is compared by skeleton
        assert why is None or "confusable" in why
        return
    assert why is not None and re.search(match, why), why
    assert "\n" not in why and "\x1b" not in why


def test_site_name_error_accepts_distinct_plain_names() -> None:
    taken = ["alpha", "bravo", "hospital-a", "clinic.c"]
    for name in ("charlie", "hospital-b", "Vienna DIAS", "site_2", "ISIC 2019 (BCN)"):
        assert site_name_error(name, taken) is None, name
    assert site_name_error("alpha") is None and site_name_error("alpha", iter([])) is None
    assert site_skeleton("Site-1") == site_skeleton("site_l") == site_skeleton("SITE.I")
