"""Weights on the wire: packed into one array per dtype, exactly the same numbers back."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.models import SUPPORTED_MODELS, build_model
from common.wire import is_packed, layout_of, pack, unpack


@pytest.mark.parametrize("dp", [False, True])
def test_every_model_round_trips_bit_exact(dp: bool) -> None:
    for name in SUPPORTED_MODELS:
        state = build_model(name, 7, dp=dp).state_dict()
        record = pack(state)
        assert is_packed(record) and len(record) <= 2  # float32 weights (+ int64 counters)
        back = unpack(record, layout_of(state))
        assert list(back) == list(state)
        for k, v in state.items():
            assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k


def test_fedavg_on_packed_arrays_equals_fedavg_per_tensor() -> None:
    """Flower's weighted mean, element-wise: packing changes no aggregated value."""
    rng = np.random.default_rng(0)
    base = build_model("test_efficientnet", 7).state_dict()
    sites = [
        {
            k: np.asarray(v.numpy() + rng.normal(size=v.shape)).astype(v.numpy().dtype)
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    weights = [10, 30, 7]

    def contents(records: list[ArrayRecord]) -> list[RecordDict]:
        return [
            RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": w})})
            for r, w in zip(records, weights, strict=True)
        ]

    plain = aggregate_arrayrecords(
        contents([ArrayRecord({k: Array(v) for k, v in s.items()}) for s in sites]), "num-examples"
    )
    packed = aggregate_arrayrecords(contents([pack(s) for s in sites]), "num-examples")
    unpacked = unpack(packed, layout_of(base))
    for k in base:
        assert np.array_equal(unpacked[k], plain[k].numpy()), k


def test_a_model_of_another_architecture_is_named_not_misread() -> None:
    state = build_model("test_efficientnet", 7).state_dict()
    other = pack(build_model("test_resnet", 7).state_dict())
    with pytest.raises(ValueError, match="architecture|packed arrays"):
        unpack(other, layout_of(state))
    plain = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    assert not is_packed(plain)  # what older servers and Flower's own tools send
    assert list(unpack(plain, layout_of(state))) == list(state)
