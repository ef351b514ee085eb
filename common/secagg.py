"""What both ends of a SecAgg+ round agree on: stage names, record keys, the masked vector.

A secure-aggregation round (Bell et al., CCS 2020, as Flower ships it) is four train
messages of the normal round: ``setup`` (each site makes two key pairs), ``share-keys``
(each site Shamir-shares its mask seed and first secret key, encrypted for each other
site), ``collect`` (each site trains, then sends its weighted update quantised and masked)
and ``unmask`` (each surviving site sends the shares the server needs to remove the masks
of the sum). The server drives them (server/secagg.py), the site answers (client/secagg.py);
the primitives are Flower's (``flwr.common.secure_aggregation``): no new cryptography.

The masked vector of a site is two integer arrays: ``factor`` (its quantised weight
``q``, the server-assigned share of the round's largest weight) and ``vector`` (its
floating-point update times ``q / quant-range``, clipped to +-``clip-range``, quantised
stochastically to ``[0, quant-range]``), masks added modulo ``modulus``. Integer arrays
(BatchNorm step counters) are not in it: the site sends them back as received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

STAGE_KEY = "secagg-stage"  # in the message's config record: which stage it is
RECORD = "secagg"  # the stage's own record, in the message and in the reply
MASKED = "masked"  # the collect stage's reply: the masked vector (an ArrayRecord)
SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
PREVIOUS = {SHARE_KEYS: SETUP, COLLECT: SHARE_KEYS, UNMASK: COLLECT}


def float_keys(arrays: Mapping[str, Any]) -> list[str]:
    """The floating-point arrays of a (packed) record, in a fixed order: what is masked."""
    return sorted(k for k, v in arrays.items() if np.issubdtype(_np(v).dtype, np.floating))


def flat_floats(arrays: Mapping[str, Any], keys: list[str]) -> np.ndarray:
    """The arrays named by ``keys`` as one float64 vector."""
    return np.concatenate([np.asarray(_np(arrays[k]), np.float64).ravel() for k in keys])


def dims(length: int) -> list[tuple[int, ...]]:
    """The shapes pseudo_rand_gen draws masks for: the factor, then the vector."""
    return [(1,), (length,)]


def quantised(update: np.ndarray, q: int, clip: float, quant: int) -> list[np.ndarray]:
    """``[factor, vector]`` before masking: the update weighted by ``q / quant``."""
    weighted = update * (q / quant)
    return [np.array([q], np.int64), quantize([weighted], clip, quant)[0].astype(np.int64)]


def mask(seed: bytes, modulus: int, length: int) -> list[np.ndarray]:
    """The mask a seed (a site's own seed, or a pairwise shared key) stands for."""
    return pseudo_rand_gen(seed, modulus, dims(length))


def recovered(total: list[np.ndarray], sites: int, clip: float, quant: int) -> tuple[int, Any]:
    """The summed weight factor and the weighted sum of the updates, from the unmasked sum
    of ``sites`` quantised vectors (each shifted by ``clip`` before quantising)."""
    q_total = int(total[0][0])
    summed = dequantize([total[1]], clip, quant)[0] - (sites - 1) * clip
    return q_total, summed


def step(clip: float, quant: int) -> float:
    """One quantisation step: each site's element is off by less than this."""
    return 2.0 * clip / quant


def _np(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
