"""The model's weights as they cross the network: one flat array per dtype.

Flower 1.41 moves an ``ArrayRecord`` one array per HTTPS request (and one SQLite write at
the SuperLink): 88 requests each way for ``test_efficientnet``, 360 for efficientnet_b0.
Packing the state dict into one array per dtype (float32 weights, int64 BatchNorm counters)
makes that two, without changing a single value. Both sides know the layout (the key order,
shapes and dtypes of the run's architecture), so nothing but the numbers is sent.

Element-wise aggregation (FedAvg, FedProx, FedAdam, FedYogi) and Flower's DP clipping (one
norm over all arrays) give the same result on the packed arrays as on the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

PREFIX = "packed/"

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return value.numpy()
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def layout_of(state: Mapping[str, Any]) -> Layout:
    """Key order, shapes and dtypes of a state dict (or an unpacked ArrayRecord)."""
    out: Layout = {}
    for k, v in state.items():
        a = _numpy(v)
        out[k] = (tuple(a.shape), a.dtype)
    return out


def is_packed(record: ArrayRecord) -> bool:
    return len(record) > 0 and all(k.startswith(PREFIX) for k in record.keys())


def pack(state: Mapping[str, Any]) -> ArrayRecord:
    """One flat array per dtype, the tensors concatenated in ``state``'s order."""
    groups: dict[str, list[np.ndarray]] = {}
    for v in state.values():
        a = _numpy(v)
        groups.setdefault(a.dtype.str, []).append(np.ascontiguousarray(a).reshape(-1))
    return ArrayRecord({PREFIX + d: Array(np.concatenate(parts)) for d, parts in groups.items()})


def packed_size_error(record: ArrayRecord, layout: Layout) -> str | None:
    """Why ``record`` cannot be unpacked into ``layout`` (None when it can)."""
    expected: dict[str, int] = {}
    for shape, dtype in layout.values():
        expected[PREFIX + dtype.str] = expected.get(PREFIX + dtype.str, 0) + int(np.prod(shape))
    if set(record.keys()) != set(expected):
        return f"packed arrays {sorted(record.keys())} instead of {sorted(expected)}"
    for k, n in expected.items():
        got = record[k].numpy().shape
        if got != (n,):
            return (
                f"wrong shape for {k}: {got} instead of ({n},) (the site's model does not have "
                "this run's architecture)"
            )
    return None


def unpack(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """The state dict back from :func:`pack`; an unpacked record is returned as it is."""
    if not is_packed(record):
        return {k: v.numpy() for k, v in record.items()}
    if why := packed_size_error(record, layout):
        raise ValueError(f"cannot unpack the received weights: {why}")
    offsets = {k: 0 for k in record.keys()}
    flat = {k: record[k].numpy() for k in record.keys()}
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in layout.items():
        key = PREFIX + dtype.str
        n = int(np.prod(shape))
        out[name] = flat[key][offsets[key] : offsets[key] + n].reshape(shape)
        offsets[key] += n
    return out
