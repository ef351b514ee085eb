"""The head refit checks the statistics it is given (server/headcheck.py), in the real loop.

Four honest fake sites send the LDA statistics of Gaussian class clusters (their own class
mix, as sites hold); a fifth sends crafted ones. The crafted site is dropped by name
(``head_calibration.screened`` in metrics.json, the log), and the refitted head is the
honest sites' own.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from common.config import RunConfig
from common.protocol import FEATURE_STATS
from common.wire import pack
from server.lda import lda_head
from server.loop import Federation
from tests.test_replies import (
    BAD,
    CLASSES,
    FakeGrid,
    Site,
    _no_plots,  # noqa: F401 - module fixture: no PNGs
    _task_identity,  # noqa: F401 - module fixture: Flower's task identity
)

D = 8
HONEST = {"alpha": 40, "bravo": 60, "charlie": 80, "delta": 50}
MEANS = np.stack([np.full(D, -1.0), np.full(D, 1.0)])
Stats = dict[str, np.ndarray]


def honest_stats(name: str, n: int) -> Stats:
    """Features of ``n`` images from two Gaussian classes, in the site's own mix."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    share = 0.2 + 0.6 * rng.random()
    y = (rng.random(n) < share).astype(int)
    x = MEANS[y] + rng.normal(size=(n, D))
    sums = np.stack([x[y == k].sum(0) for k in range(2)])
    return {"counts": np.bincount(y, minlength=2).astype(float), "sums": sums, "moment": x.T @ x}


def shifted_sums(stats: Stats) -> Stats:
    """Melanoma's sums moved far along one feature: the refit would never predict it."""
    out = dict(stats)
    out["sums"] = stats["sums"].copy()
    out["sums"][0, 0] -= 50.0 * stats["counts"][0]
    return out


def not_psd(stats: Stats) -> Stats:
    """A second moment no set of images has: its diagonal is the honest one, but features
    0 and 1 covary 10x more than their variances allow."""
    out = dict(stats)
    m = stats["moment"].copy()
    m[0, 1] = m[1, 0] = 10.0 * np.sqrt(m[0, 0] * m[1, 1])
    out["moment"] = m
    return out


class StatsGrid(FakeGrid):
    """FakeGrid sites that also answer the feature-statistics query."""

    def __init__(self, sites: list[Site], crafted: Callable[[Stats], Stats]) -> None:
        super().__init__(sites)
        self.crafted = crafted

    def pull_messages(self, ids: set[str]) -> list[Message]:
        kind = f"{MessageType.QUERY}.{FEATURE_STATS}"
        asked = [m for m in self.outbox if m.metadata.message_id in ids]
        if not asked or asked[0].metadata.message_type != kind:
            return super().pull_messages(ids)
        out = []
        for m in asked:
            site = self.nodes[m.metadata.dst_node_id]
            stats = honest_stats(site.name, site.n_train)
            if site.name == BAD:
                stats = self.crafted(stats)
            record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})
            out.append(Message(RecordDict({"stats": record}), reply_to=m))
        return out


def refit(tmp_path: Path, crafted: Callable[[Stats], Stats]) -> tuple[dict, np.ndarray]:
    """The run's head_calibration record and the refitted head it validated (packed)."""
    sites = [Site(name, n) for name, n in HONEST.items()] + [Site(BAD, 50)]
    values = {"num-server-rounds": 1, "round-timeout": 5.0, "head-calibration": "lda"}
    flat = RunConfig.from_mapping(values).to_flat()
    grid = StatsGrid(sites, crafted)
    fed = Federation(grid, RunConfig.from_flat(flat), tmp_path, CLASSES)  # type: ignore[arg-type]
    fed.discover(expected=5, wait=0)
    initial = {"fc.weight": torch.zeros(2, D), "fc.bias": torch.zeros(2)}
    fed.run(initial, 1, resume=False, head=("fc.weight", "fc.bias"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # alpha evaluated: round 1's model, the refitted candidate, then the test's model
    return metrics["test"]["head_calibration"], grid.evaluated[1]["packed/<f4"]


def packed_head(stats: list[Stats]) -> np.ndarray:
    weight, bias = lda_head(stats)
    state = {"fc.weight": weight.astype(np.float32), "fc.bias": bias.astype(np.float32)}
    return np.asarray(pack(state)["packed/<f4"].numpy())


@pytest.mark.parametrize(
    ("crafted", "reason"), [(shifted_sums, "site mallory"), (not_psd, "site mallory")]
)
def test_crafted_statistics_are_dropped_and_the_head_is_the_honest_sites(
    crafted: Callable[[Stats], Stats], reason: str, tmp_path: Path
) -> None:
    cal, candidate = refit(tmp_path, crafted)
    assert set(cal["screened"]) == {BAD} and reason in cal["screened"][BAD]
    assert cal["sites"] == sorted(HONEST)
    honest = [honest_stats(n, k) for n, k in sorted(HONEST.items())]
    np.testing.assert_allclose(candidate, packed_head(honest), rtol=1e-5, atol=1e-6)


def test_honest_statistics_are_all_used(tmp_path: Path) -> None:
    cal, candidate = refit(tmp_path, lambda stats: stats)
    assert cal["screened"] == {} and cal["sites"] == sorted([*HONEST, BAD])
    every = [honest_stats(n, k) for n, k in sorted({**HONEST, BAD: 50}.items())]
    np.testing.assert_allclose(candidate, packed_head(every), rtol=1e-5, atol=1e-6)
