"""Constants and helpers shared by several test modules (fixtures: conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from common.data.schema import HAM_CLASSES

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
    assert info <= set(seen["query"]["info"]) <= info | {"train-counts"}  # see class-prior
    assert sorted(seen["train"]) == ["arrays", "metrics", "site"]
    assert seen["train"]["arrays"].startswith("ArrayRecord: model weights")
    assert set(seen["train"]["metrics"]) <= TRAIN_KEYS, seen["train"]["metrics"]
    assert seen["train"]["site"] == ["site"] and seen["evaluate"]["site"] == ["site"]
    assert sorted(seen["evaluate"]) == ["metrics", "site"]  # no arrays back from evaluation
    scalars = set(seen["evaluate"]["metrics"]) - set(AGGREGATE_KEYS)
    assert scalars and all(SCALAR.match(k) for k in scalars), sorted(scalars)
