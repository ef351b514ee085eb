"""A several-round SecAgg+ run under the real Simulation Engine ends where the plaintext run does.

Rounding is stochastic (unseeded, in Flower's quantiser), so a SecAgg+ run is the plaintext
run nudged by up to one quantisation step (1.2e-7 at the defaults) per element and round.
That only stays within 0.02 balanced accuracy of the plaintext run if the run itself is not
chaotic: the tiny BatchNorm run of tests/test_simulation.py is (one 1e-7 nudge moved its
running variances by 0.36; SecAgg+ ended at 0.414 test balanced accuracy against 0.319 in
the clear after 4 rounds). ``STABLE`` is a setting without BatchNorm (ConvNeXt's LayerNorm),
i.i.d. sites and a small learning rate. Measured on it (2 shared CPU cores): after 3 rounds
plaintext and SecAgg+ both ended at 0.600 test balanced accuracy (chance 0.143), with the same
validation balanced accuracy in every round to three decimals (0.382, 0.376, 0.411); after
the 2 rounds run here both ended at 0.441 (validation 0.382, 0.376), still 0.2 above the
chance + 0.1 the test asks. (A GroupNorm setting through sample-level DP took 38 s a round
here and was not pursued.) Both runs join the session's Ray head node: no Ray start-up each.
"""

from __future__ import annotations

from typing import Any

import pytest

from simulations.runner import simulate
from tests.helpers import TINY
from tests.ray_harness import on_ray

STABLE = {
    **TINY,
    "model": "convnext_atto",  # LayerNorm: no running statistics to amplify a nudge
    "image-size": 32,  # ConvNeXt downsamples 32x; 16 px would leave no feature map
    "scheme": "iid",
    "lr": 0.001,
    "local-epochs": 1,
    "num-server-rounds": 2,
}
TOLERANCE = 0.02  # the issue's: test balanced accuracy, SecAgg+ against plaintext
CHANCE = 1 / 7


def final_score(metrics: dict[str, Any]) -> float:
    return float(metrics["test"]["global"]["balanced_accuracy"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_head) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("secagg-sim")
    with on_ray(ray_head):  # the session's Ray head node (conftest.py): no Ray start-up per run
        return {
            mode: simulate(None, {**STABLE, "secure-aggregation": mode}, out=out / mode)
            for mode in ("none", "secagg+")
        }


def test_every_secure_round_aggregated_every_site(runs) -> None:
    rounds = runs["secagg+"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["aggregated"] is True, r["round"]
        assert sorted(r["train"]) == sorted(r["sampled"]) and len(r["sampled"]) == 4
        assert not r["failures"] and not r["rejected"]


def test_secure_run_ends_where_the_plaintext_run_does(runs) -> None:
    plain, secure = (final_score(runs[m]) for m in ("none", "secagg+"))
    assert plain > CHANCE + 0.1, f"the plaintext run did not learn ({plain:.3f})"
    assert abs(secure - plain) <= TOLERANCE, (plain, secure)
