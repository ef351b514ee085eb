"""What a site sends over the network is aggregate only: fixed keys, fixed-size lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.task import evaluate_site
from common.data.schema import HAM_CLASSES
from common.data.site_data import SiteData
from common.fedmetrics import BINS
from common.models import build_model
from tests.helpers import SCALAR, TRAIN_KEYS


def _site(n: int) -> SiteData:
    rng = np.random.default_rng(n)
    images = {"validation": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)}
    labels = {"validation": rng.integers(0, len(HAM_CLASSES), n)}
    return SiteData("x", HAM_CLASSES, images, labels)


def test_evaluate_reply_is_aggregate_and_fixed_size():
    torch.manual_seed(0)
    model = build_model("test_efficientnet", len(HAM_CLASSES))
    replies = [evaluate_site(model, _site(n), "validation") for n in (9, 57)]
    c = len(HAM_CLASSES)
    for reply in replies:
        lists = {k for k, v in reply.items() if isinstance(v, list)}
        assert lists == {"confusion", "score-hist"}
        assert len(reply["confusion"]) == c * c
        assert len(reply["score-hist"]) == c * 2 * BINS
        scalars = set(reply) - lists
        assert all(SCALAR.match(k) for k in scalars), sorted(scalars)
        assert all(isinstance(reply[k], (int, float)) for k in scalars)
    assert set(replies[0]) == set(replies[1])  # keys do not depend on the site's size


def test_train_metrics_keys_are_known_aggregates():
    """Everything train_local reports is on the allow-list (a real run: test_simulation)."""
    from common.train import TrainConfig, train_local

    model = build_model("test_efficientnet", len(HAM_CLASSES))
    site = _site(20)
    out = train_local(
        model,
        torch.from_numpy(site.images["validation"]),
        torch.from_numpy(site.labels["validation"]),
        TrainConfig(local_steps=1),
        num_classes=len(HAM_CLASSES),
    )
    assert set(out) | {"num-examples"} <= TRAIN_KEYS, sorted(set(out) - TRAIN_KEYS)
    assert all(isinstance(v, (int, float)) for v in out.values())


def test_a_model_with_nan_outputs_is_reported_by_site_not_crashed_on():
    model = build_model("test_efficientnet", len(HAM_CLASSES))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "classifier" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"site x: .*non-finite scores for 9 of 9 validation"):
        evaluate_site(model, _site(9), "validation")
