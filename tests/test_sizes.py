"""Sizes are pinned, not believed (server/sizes.py), through the real round loop.

A site's declared sizes are fixed at its first discovery (in the run's checkpoint, and in
``site-registry`` when set); no site weighs more than ``max-site-weight`` of a round's
aggregate, of the federation's class prior or of the validation score the loop decides by.
The fake sites are those of tests/test_replies.py: three honest ones and a liar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common.config import RunConfig
from server.loop import Federation
from server.sizes import Sizes, capped, capped_counts, read_registry, scale_factors
from tests.test_replies import (
    BAD,
    CLASSES,
    HONEST,
    N_SPLIT,
    ROUNDS,
    FakeGrid,
    Site,
    _no_plots,  # noqa: F401 - module fixture: no PNGs
    _task_identity,  # noqa: F401 - module fixture: Flower's task identity
    eval_metrics,
    honest_sites,
    initial_model,
    run_federation,
)

SHIFT = 0.5  # the liar's fixed step on every float weight


def _info(**changes: object):
    def tamper(content: RecordDict) -> RecordDict:
        info = dict(content.config_records["info"]) | changes
        return RecordDict({"info": ConfigRecord(info)})

    return tamper


def _liar(claimed: int, **extra: object) -> Site:
    """A site that claims ``claimed`` training images and trains with that weight, stepping
    every float weight by SHIFT (an honest-looking norm: the bound is off in these runs)."""

    def train(content: RecordDict) -> RecordDict:
        metrics = dict(content.metric_records["metrics"]) | {"num-examples": claimed}
        arrays = content.array_records["arrays"]
        from flwr.app import Array, ArrayRecord

        out = {
            k: Array(np.array(v.numpy()) + (SHIFT if k == "packed/<f4" else 0))
            for k, v in arrays.items()
        }
        return RecordDict(
            {"arrays": ArrayRecord(out), "metrics": MetricRecord(metrics), "site": content["site"]}
        )

    return Site(BAD, 50, query=_info(**{"n-train": claimed}, **extra), train=train)


# ------------------------------------------------------------------------------ units
def test_a_size_is_capped_at_the_others_total_at_max_site_weight_one_half() -> None:
    sizes = {"a": 40, "b": 60, "c": 80, "liar": 10**9}
    assert capped(sizes, 0.5) == {"a": 40.0, "b": 60.0, "c": 80.0, "liar": 180.0}
    assert capped(sizes, 1.0)["liar"] == 10**9
    assert capped({"a": 40, "b": 60, "c": 80}, 0.5) == {"a": 40.0, "b": 60.0, "c": 80.0}
    assert scale_factors({"a": 10, "b": 30}, 0.5) == {"a": 1.0, "b": pytest.approx(1 / 3)}


def test_the_federation_prior_uses_capped_counts() -> None:
    counts = {"a": (30, 10), "b": (20, 40), "liar": (1_000_000_000, 90)}
    # the liar's 1e9+90 images count as the others' 100, split as it declared
    got = capped_counts(counts, 0.5)
    assert got == [50 + round(100 * 1e9 / (1e9 + 90)), 50 + round(100 * 90 / (1e9 + 90))]


# -------------------------------------------------------------------- the round loop
@pytest.mark.parametrize("factor", [10, 1_000_000])
def test_a_site_claiming_more_data_weighs_no_more_than_max_site_weight(
    factor: int, tmp_path: Path
) -> None:
    """Hand computation: the round-1 model is half the honest sites' mean (by their own
    sizes) and half the liar's update, whatever it claimed (uncapped: 0.735 and 0.99997)."""
    sites = [*honest_sites(), _liar(50 * factor)]
    run = run_federation(tmp_path / "liar", sites, **{"update-norm-factor": 0.0})
    honest = run_federation(tmp_path / "honest", honest_sites())
    start, honest_mean = _packed_start(), honest.grid.evaluated[0]["packed/<f4"]
    moved = run.grid.evaluated[0]["packed/<f4"] - honest_mean
    # the liar sends start + its own 0.01-scale noise + SHIFT, at weight 1/2
    np.testing.assert_allclose(moved, 0.5 * (start + SHIFT - honest_mean), atol=0.03)
    assert np.abs(moved).max() < 0.5 * SHIFT + 0.03


def _packed_start() -> np.ndarray:
    """The initial global model as the loop packs it (what round 1 sent)."""
    from flwr.app import Array, ArrayRecord

    from common.wire import pack

    record = ArrayRecord({k: Array(v.numpy()) for k, v in initial_model().items()})
    return np.asarray(pack(record)["packed/<f4"].numpy())


def test_the_liars_class_counts_are_capped_in_the_prior_every_site_receives(
    tmp_path: Path,
) -> None:
    from tests.test_replies import RecordingGrid  # keeps the train configs sent

    def counts(name: str, n: int) -> list[int]:
        return [n // 2, n - n // 2]

    sites = [
        Site(name, n, query=_info(**{"train-counts": counts(name, n)}))
        for name, n in HONEST.items()
    ]
    sites.append(Site(BAD, 50, query=_info(**{"n-train": 10**9 + 90, "train-counts": [10**9, 90]})))
    flat = RunConfig.from_mapping({"num-server-rounds": 1, "class-prior": "federation"}).to_flat()
    fed = Federation(RecordingGrid(sites), RunConfig.from_flat(flat), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=3, wait=0)
    prior = fed.class_counts()
    assert prior is not None and sum(prior) == 2 * sum(HONEST.values())
    assert prior[1] < sum(HONEST.values())  # the liar's 1e9 mel do not swamp nv


def test_faked_validation_moves_the_decision_score_by_at_most_its_capped_share(
    tmp_path: Path,
) -> None:
    """A site declaring n-validation = n-test = 1000 and perfect scores counts as the other
    sites together (1/2 of the decision score), not 1000/1030 of it."""
    big = 1000

    def perfect(content: RecordDict) -> RecordDict:
        m = eval_metrics(1)
        m |= {"num-examples": big, "confusion": [big // 2, 0, 0, big // 2]}
        m |= {"accuracy": 1.0, "balanced_accuracy": 1.0, "recall_mel": 1.0, "recall_nv": 1.0}
        hist = np.zeros((2, 2, 50), np.int64)
        hist[:, 0, 49], hist[:, 1, 0] = big // 2, big // 2
        m["score-hist"] = hist.ravel().tolist()
        return RecordDict({"metrics": MetricRecord(m)})

    liar = Site(BAD, 50, query=_info(**{"n-validation": big, "n-test": big}), evaluate=perfect)
    run = run_federation(tmp_path, [*honest_sites(), liar])
    for r in run.metrics["rounds"]:
        honest = eval_metrics(r["round"])["balanced_accuracy"]
        got = r["validation"]["decision_balanced_accuracy"]
        assert got == pytest.approx(0.5 * honest + 0.5 * 1.0)
        assert r["validation"]["global"]["balanced_accuracy"] >= got  # the raw pool believed it


def test_an_evaluation_that_does_not_add_up_to_the_pinned_split_is_rejected(
    tmp_path: Path,
) -> None:
    def fewer(content: RecordDict) -> RecordDict:
        m = dict(content.metric_records["metrics"]) | {"num-examples": N_SPLIT - 2}
        m["confusion"] = [3, 1, 1, 3]
        return RecordDict({"metrics": MetricRecord(m)})

    run = run_federation(tmp_path, [*honest_sites(), Site(BAD, 50, evaluate=fewer)])
    for r in run.metrics["rounds"]:
        assert "not the pinned split size" in r["validation"]["rejected"][BAD]


def test_a_name_claimed_by_two_nodes_belongs_to_neither(tmp_path: Path) -> None:
    impostor = Site(BAD, 50, query=_info(site="alpha"))
    fed = Federation(FakeGrid([*honest_sites(), impostor]), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    sites = fed.discover(expected=2, wait=0)
    assert [s.site for s in sites] == ["bravo", "charlie"]
    assert sorted(fed.discovery_rejected) == ["node 100 (site 'alpha')", "node 103 (site 'alpha')"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("\u0430lpha", "not a plain ASCII name"), ("Alpha", "confusable with the site 'alpha'")],
)
def test_a_look_alike_name_is_not_a_new_site(name: str, reason: str, tmp_path: Path) -> None:
    fed = Federation(
        FakeGrid([*honest_sites(), Site(BAD, 50, query=_info(site=name))]),
        RunConfig.defaults(),
        tmp_path,
        CLASSES,
    )  # type: ignore[arg-type]
    fed.discover(expected=3, wait=0)
    ((who, why),) = fed.discovery_rejected.items()
    assert who.startswith("node 103") and reason in why


def test_a_site_with_other_classes_is_rejected_at_discovery(tmp_path: Path) -> None:
    other = Site(BAD, 50, query=_info(classes=json.dumps(["nv", "mel"])))
    fed = Federation(FakeGrid([*honest_sites(), other]), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=3, wait=0)
    ((who, why),) = fed.discovery_rejected.items()
    assert who.startswith("node 103") and "are not the run's ['mel', 'nv']" in why


def test_the_registry_enrols_at_first_discovery_and_rejects_later_changes(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "sites.json"
    cfg = {"site-registry": str(registry)}
    Federation(
        FakeGrid(honest_sites()), RunConfig.from_flat(cfg), tmp_path / "a", CLASSES
    ).discover(3, 0)  # type: ignore[arg-type]
    assert read_registry(registry) == {
        name: Sizes(n, N_SPLIT, N_SPLIT) for name, n in HONEST.items()
    }
    grown = [*honest_sites()[:2], Site("charlie", 800)]
    fed = Federation(FakeGrid(grown), RunConfig.from_flat(cfg), tmp_path / "b", CLASSES)  # type: ignore[arg-type]
    assert [s.site for s in fed.discover(2, 0)] == ["alpha", "bravo"]
    ((who, why),) = fed.discovery_rejected.items()
    assert "charlie" in who and f"declares n-train=800, but {registry} pinned it at 80" in why


def test_a_resumed_run_rejects_a_site_whose_sizes_changed(tmp_path: Path) -> None:
    run_federation(tmp_path, honest_sites())
    flat = RunConfig.from_mapping(
        {"num-server-rounds": ROUNDS + 1, "round-timeout": 5.0, "batch-size": 16}
    ).to_flat()
    grown = [*honest_sites()[:2], Site("charlie", 800)]
    fed = Federation(FakeGrid(grown), RunConfig.from_flat(flat), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=2, wait=0)
    fed.run(initial_model(), ROUNDS + 1, resume=True)
    assert "pinned it at 80" in fed.discovery_rejected["node 102 (site 'charlie')"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics["rounds"][-1]["sampled"]) == ["alpha", "bravo"]
