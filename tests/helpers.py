"""Constants and helpers shared by several test modules (fixtures: conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.data.schema import HAM_CLASSES

if TYPE_CHECKING:
    from flwr.app import Message

# ----------------------------------------------------------------- shared synthetic data sets
SYNTH_SIZE = 32  # image side of the shared fixtures
SYNTH_N = {"ham-hf": 160, "ham-dataverse": 160, "isic2020": 120, "fedisic2019": 160}


def copy_dataset(src: Path, dst: Path) -> Path:
    """A private, writable copy of a shared fixture data set."""
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------- tiny simulated federation
# Tiny but real: 4 natural sites of the built-in synthetic HAM10000-like set, 16 px images.
# Enough rounds that the model learns clearly (val balanced accuracy 0.55-0.6, chance 0.14):
# a run at chance is chaotic, and its figures differ between CPU kernels (AVX2, AVX-512).
TINY = {
    "builtin-images": 600,
    "image-size": 16,
    "model": "test_efficientnet",
    "num-server-rounds": 6,
    "local-epochs": 3,
    "batch-size": 32,
    "lr": 0.003,
}
SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]


# ----------------------------------------------------------------- what crosses the network
SCALAR = re.compile(
    r"^(num-examples|accuracy|balanced_accuracy|auroc|loss|n|"
    r"(recall|auroc)_(" + "|".join(HAM_CLASSES) + r"))$"
)
TRAIN_KEYS = {
    "num-examples",
    "num_examples",
    "train_loss",
    "train_accuracy",
    "steps",
    "seconds",
    "images_per_second",
    "epsilon",
    "delta",
    "noise_multiplier",
    "dp-budget-exhausted",
}


def check_network_json(run_dir: Path) -> None:
    """network.json lists every record and key the sites sent; all are on the allow-list.

    Shared by the simulation and the real-process deployment tests."""
    from common.fedmetrics import AGGREGATE_KEYS

    seen = json.loads((run_dir / "network.json").read_text())
    assert sorted(seen) == ["evaluate", "query", "train"]
    assert sorted(seen["query"]) == ["info"]
    info = {"site", "classes", "n-train", "n-validation", "n-test"}
    optional = {"train-counts", "version"}  # class-prior; common/version.py
    assert info <= set(seen["query"]["info"]) <= info | optional
    assert sorted(seen["train"]) == ["arrays", "metrics", "site"]
    assert seen["train"]["arrays"].startswith("ArrayRecord: model weights")
    assert set(seen["train"]["metrics"]) <= TRAIN_KEYS, seen["train"]["metrics"]
    assert seen["train"]["site"] == ["site"] and seen["evaluate"]["site"] == ["site"]
    assert sorted(seen["evaluate"]) == ["metrics", "site"]  # no arrays back from evaluation
    scalars = set(seen["evaluate"]["metrics"]) - set(AGGREGATE_KEYS)
    assert scalars and all(SCALAR.match(k) for k in scalars), sorted(scalars)


# ----------------------------------------------------------------- Flower messages and grids
def assign_message_id(msg: Message, message_id: str) -> Message:
    """``msg`` with the id a Flower grid gives a message when it is pushed; returns ``msg``.

    A new Message's id is "" until the SuperLink stores it, and Flower 1.41 has no public
    setter: its own grid (``flwr.superlink.grid.inmemory_grid.InMemoryGrid.push_messages``)
    writes the metadata's ``_message_id`` directly. This is the one place the tests do the
    same, for a message a grid pushes or one handed straight to a ClientApp."""
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


class FakeGrid:
    """The part of Flower's ``Grid`` that ``server.loop.Federation`` uses, answered in
    process: build a real Federation with ``Federation(grid, run, run_dir, classes)``.

    ``nodes`` maps each node id to what stands behind it (a site, a name: the subclass
    decides). ``push_messages`` numbers the messages ``m1``, ``m2``, ... over the grid's
    life, as a grid assigns ids on push, and keeps the last batch in ``outbox``;
    ``pull_messages`` returns :meth:`answer` of each pushed message asked for, in the
    order sent (every site answers at once)."""

    def __init__(self, nodes: Mapping[int, Any]) -> None:
        self.nodes = dict(nodes)
        self.outbox: list[Message] = []
        self.count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.outbox = []
        for m in messages:
            self.count += 1
            self.outbox.append(assign_message_id(m, f"m{self.count}"))
        return [m.metadata.message_id for m in self.outbox]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = set(message_ids)
        return [self.answer(m) for m in self.outbox if m.metadata.message_id in ids]

    def answer(self, msg: Message) -> Message:
        """The reply to one pushed message (``Message(content, reply_to=msg)``)."""
        raise NotImplementedError
