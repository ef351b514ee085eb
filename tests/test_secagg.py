"""SecAgg+ rounds (server/secagg.py, client/secagg.py) through the real ClientApp.

Each site is the real ``client.client_app.app`` on a simulated partition of the built-in
synthetic set, answered in process by :class:`AppGrid` (a FakeGrid); the server is the real
``Federation``. The same round is run in the clear and under SecAgg+, and the global models
compared array by array within the quantisation bound the settings imply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from client.client_app import app
from client.message import message_config
from common.config import ConfigError, RunConfig
from common.data.schema import HAM_CLASSES
from common.secagg import COLLECT, MASKED, RECORD, SHARE_KEYS, STAGE_KEY, step
from common.wire import pack
from server.loop import Federation
from server.secagg import settings
from server.server_app import initial_model, statistics_of
from tests.helpers import TINY, FakeGrid, assign_message_id

SITES = 3
RUN = {
    **TINY,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "local-steps": 2,
    "max-site-weight": 1.0,
    "round-timeout": 1.0,  # a silent site costs this much
    "secagg-threshold": 2,
}


@pytest.fixture(autouse=True)
def _identity():
    from simulations.flower_adapter import task_identity

    with task_identity(run_id=1):
        yield


class AppGrid(FakeGrid):
    """Every node is the real ClientApp with its own context; ``silent`` maps a node to
    the stage (or "train") from which it stops answering; every reply is recorded."""

    def __init__(self, run: Mapping[str, Any], node: Mapping[int, dict] | None = None) -> None:
        node = node or {}
        contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": SITES, **node.get(i, {})},
                state=RecordDict(),
                run_config=dict(run),
            )
            for i in range(SITES)
        }
        super().__init__(contexts)
        self.silent: dict[int, str] = {}
        self.received: list[Message] = []
        self.tamper: Any = None  # (message, reply) -> reply, for forged replies

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids, out = set(message_ids), []
        for m in self.outbox:
            if m.metadata.message_id not in ids or self._silent(m):
                continue
            reply = self.answer(m)
            if self.tamper is not None:
                reply = self.tamper(m, reply)
            self.received.append(reply)
            out.append(reply)
        return out

    def _silent(self, m: Message) -> bool:
        if m.metadata.message_type != MessageType.TRAIN:
            return False
        stage = message_config(m).get(STAGE_KEY, COLLECT)  # plaintext training: as collect
        return self.silent.get(m.metadata.dst_node_id) == stage

    def answer(self, msg: Message) -> Message:
        try:
            return app(msg, self.nodes[msg.metadata.dst_node_id])
        except Exception as err:  # what Flower's runtime sends back for a raising app
            return Message(Error(code=0, reason=str(err)), reply_to=msg)


def run_round(tmp: Path, grid_values: dict, node: dict | None = None, silent=None, tamper=None):
    """One round of a real Federation; the new global model's state, the grid, the run."""
    run = RunConfig.from_mapping({**RUN, **grid_values})
    flat = run.to_flat()
    grid = AppGrid(flat, node)
    grid.silent, grid.tamper = dict(silent or {}), tamper
    fed = Federation(grid, flat, tmp, list(HAM_CLASSES))  # type: ignore[arg-type]
    fed.discover(expected=SITES, wait=0)
    model = initial_model(run, len(HAM_CLASSES))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = fed.run(initial, 1, resume=False, statistics=statistics_of(model))
    arrays = torch.load(tmp / "checkpoints" / "last.pt", weights_only=True)["arrays"]
    return {k: v.numpy() for k, v in arrays.items()}, initial, grid, result


def quantisation_bound(result: dict, sizes: dict[str, float], run: RunConfig) -> float:
    """Each element of the survivors' mean update is off by less than n steps over the
    summed weight share (stochastic rounding: < 1 step per site and element)."""
    trained = result["rounds"][0]["train"]
    top = max(sizes.values())
    ratio = sum(sizes[s] / top for s in trained)
    return len(trained) * step(run.secagg_clip_range, run.secagg_quant_range) / ratio


def sizes_of(grid: AppGrid) -> dict[str, float]:
    out = {}
    for ctx in grid.nodes.values():
        query = Message(RecordDict({}), dst_node_id=ctx.node_id, message_type=MessageType.QUERY)
        info = app(assign_message_id(query, "q"), ctx).content.config_records["info"]
        out[str(info["site"])] = float(info["n-train"])
    return out


CASES = {
    "fedavg": {},
    "fedavg-dp": {"dp": True, "noise-multiplier": 0.5, "target-epsilon": 1000.0},
    "fedbn": {"personalize": "fedbn"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_secure_round_equals_the_plaintext_round(case: str, tmp_path: Path) -> None:
    values = CASES[case]
    plain, initial, grid, _ = run_round(tmp_path / "plain", values)
    secure, _, _, result = run_round(
        tmp_path / "secure", {**values, "secure-aggregation": "secagg+"}
    )
    run = RunConfig.from_mapping({**RUN, **values})
    bound = quantisation_bound(result, sizes_of(grid), run)
    assert result["rounds"][0]["aggregated"] and sorted(result["rounds"][0]["train"])
    moved = 0.0
    for k, ref in plain.items():
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(secure[k], ref, rtol=0, atol=bound + 1e-6, err_msg=k)
            moved = max(moved, float(np.abs(ref - initial[k].numpy()).max()))
        else:
            np.testing.assert_array_equal(secure[k], ref, err_msg=k)
    assert moved > 100 * bound  # the round did move the model: the comparison means something
