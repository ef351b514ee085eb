"""ArrayRecord <-> numpy state dict: the one conversion the server's modules share.

Every array keeps its shape: ``np.ascontiguousarray`` would turn the 0-d BatchNorm step
counters into shape (1,), which no model loads (a refitted best.pt did not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def numpy_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays as numpy arrays, by key, in the record's order."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def array_record(
    state: Mapping[str, Any], dtypes: Mapping[str, tuple[Any, np.dtype]] | None = None
) -> ArrayRecord:
    """A state dict as an ArrayRecord (C order, every shape kept); ``dtypes``: a layout
    (common/wire.py: key -> (shape, dtype)) whose dtypes the arrays are cast back to (the
    integer BatchNorm counters stay integers after averaging)."""
    if dtypes is not None:
        state = {k: np.asarray(v).astype(dtypes[k][1]) for k, v in state.items()}
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in state.items()})
