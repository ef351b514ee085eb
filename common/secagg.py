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

The head refit's statistics (``query.feature_stats``, server/refit.py) go through the same
four stages as query messages: the vector is a site's counts, class sums and the upper
triangle of its moment, each part divided by a scale the server sets at setup (the
largest entry an honest site can have: :func:`stats_vector`), so every entry lies in
[-1, 1]; it is quantised to :data:`STATS_QUANT` levels (finer than Flower's int32
rounding allows, :func:`quantised`: each entry off by less than one step, 2^-49 of its
scale), masked modulo :data:`STATS_MODULUS` (int64 sums wrap modulo 2^64, a multiple of
it). Its ``factor`` is ``[1, entries clipped]``: the server
learns how many sites summed and how many entries of the federation were out of range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.quantization import dequantize

STAGE_KEY = "secagg-stage"  # in the message's config record: which stage it is
RECORD = "secagg"  # the stage's own record, in the message and in the reply
MASKED = "masked"  # the collect stage's reply: the masked vector (an ArrayRecord)
SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
PREVIOUS = {SHARE_KEYS: SETUP, COLLECT: SHARE_KEYS, UNMASK: COLLECT}
# The statistics' fixed-point form: entries scaled into [-1, 1], 2^50 levels (a step of
# 2^-49 of the scale per site), sums modulo 2^62 (up to 2^12 = 4096 sites before a wrap).
STATS_CLIP, STATS_QUANT, STATS_MODULUS = 1.0, 2**50, 2**62
STATS_FACTORS = 2  # [sites summed, entries clipped]
FLOWER_MAX_QUANT = 2**30  # Flower's quantize rounds through int32
MASK_DOMAIN = b"fedskin secagg+ mask\0"  # the masks' keys: no other use of a seed collides


def float_keys(arrays: Mapping[str, Any]) -> list[str]:
    """The floating-point arrays of a (packed) record, in a fixed order: what is masked
    (read from each array's dtype: a record's arrays are not decoded for it)."""
    return sorted(k for k, v in arrays.items() if np.issubdtype(_dtype(v), np.floating))


def flat_floats(arrays: Mapping[str, Any], keys: list[str]) -> np.ndarray:
    """The arrays named by ``keys`` as one float64 vector."""
    return np.concatenate([_np(arrays[k]).ravel() for k in keys], dtype=np.float64)


def dims(length: int, factors: int = 1) -> list[tuple[int, ...]]:
    """The shapes of a mask (:func:`mask`): the factor, then the vector."""
    return [(factors,), (length,)]


def quantised(values: np.ndarray, factor: list[int], clip: float, quant: int) -> list[np.ndarray]:
    """``[factor, vector]`` before masking: ``values`` clipped to +-``clip`` and quantised
    stochastically to ``[0, quant]``, Flower's map (``quantize``: ``(v + clip) x quant /
    (2 clip)``, rounded up with the probability of its fraction), in int64 with one
    vectorised draw: Flower's own rounds through int32 (at most 2^30 levels) and masks
    with a boolean index, 3-5x slower on a model's 2.3 M entries. For the statistics
    (``quant`` a power of 2 above 2^30, ``clip`` 1) ``v x quant / 2`` is exact and the
    integer ``quant / 2`` is added after rounding, so small entries keep all their bits.
    Each entry is off by less than one step, ``2 clip / quant``, unbiased."""
    x = np.clip(np.asarray(values, np.float64), -clip, clip)
    fine = quant > FLOWER_MAX_QUANT
    if not fine:
        x += clip
    x *= quant / (2 * clip)
    low = np.floor(x)
    x -= low  # the fraction: rounded up with this probability
    vector = low.astype(np.int64)
    vector += np.random.default_rng().random(x.shape) < x
    if fine:
        vector += quant // 2
    return [np.asarray(factor, np.int64), vector]


def mask(seed: bytes, modulus: int, length: int, factors: int = 1) -> list[np.ndarray]:
    """The mask a seed (a site's own seed, or a pairwise shared key) stands for, in the
    shapes of :func:`dims`: uniform over ``[0, modulus)`` (a power of 2), the keystream of
    AES-256 in counter mode under a key hashed from the whole seed, modulo ``modulus``.

    Flower's ``pseudo_rand_gen`` folds the seed into 32 bits for NumPy's Mersenne Twister:
    a server that learns a site's own mask at the unmask stage could then try all 2^32
    pairwise masks of a site with one neighbour (a federation of two) and keep the one that
    leaves a vector in the quantised range, i.e. read that site's update. A keystream of a
    cipher (as Bell et al. specify a PRG) has no such shortcut, and is faster here (AES-NI:
    ~3 ms for a 2.3 M-entry mask, where the Mersenne Twister takes ~24 ms)."""
    check_modulus(modulus)
    values = np.empty(factors + length, np.int64)
    _keystream(seed, values)
    values &= modulus - 1
    return [values[:factors], values[factors:]]


def add_masks(parts: list[np.ndarray], seeds: list[tuple[bytes, int]], modulus: int) -> None:
    """Add (sign 1) or subtract (sign -1) each seed's :func:`mask` to the int64 ``parts``
    (the shapes of :func:`dims`) in place, then reduce them modulo ``modulus``: the same
    result as adding the masks one by one, without building each (the keystreams are
    summed as they come, modulo 2^64, a multiple of any power-of-2 modulus)."""
    check_modulus(modulus)
    stream = np.empty(sum(part.size for part in parts), np.int64)
    zeros = bytes(stream.nbytes)
    for seed, sign in seeds:
        _keystream(seed, stream, zeros)
        offset = 0
        for part in parts:
            piece = stream[offset : offset + part.size]
            (np.add if sign > 0 else np.subtract)(part, piece, out=part)
            offset += part.size
    for part in parts:
        np.bitwise_and(part, modulus - 1, out=part)


def check_modulus(modulus: int) -> None:
    if modulus < 2 or modulus & (modulus - 1) or modulus > 2**63:
        raise ValueError(f"a SecAgg+ modulus must be a power of 2 up to 2^63, got {modulus}")


def _keystream(seed: bytes, out: np.ndarray, zeros: bytes | None = None) -> None:
    """AES-256-CTR's keystream under a hash of the whole seed, written over ``out``."""
    key = hashlib.sha256(MASK_DOMAIN + seed).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(zeros or bytes(out.nbytes), out.view(np.uint8))


def recovered(total: list[np.ndarray], sites: int, clip: float, quant: int) -> tuple[int, Any]:
    """The summed weight factor and the weighted sum of the updates, from the unmasked sum
    of ``sites`` quantised vectors (each shifted by ``clip`` before quantising)."""
    q_total = int(total[0][0])
    if quant <= FLOWER_MAX_QUANT:
        summed = dequantize([total[1]], clip, quant)[0] - (sites - 1) * clip
    else:  # the shifts removed in int64 first: small sums keep every bit
        summed = (total[1] - sites * (quant // 2)).astype(np.float64) * (2 * clip / quant)
    return q_total, summed


# ---------------------------------------------------------------- the head refit's statistics
def stats_length(classes: int, dim: int) -> int:
    """Entries of a statistics vector: counts, class sums, the moment's upper triangle."""
    return classes + classes * dim + dim * (dim + 1) // 2


def stats_vector(stats: Mapping[str, Any], scales: list[float]) -> np.ndarray:
    """A site's counts, class sums and the upper triangle of its moment, each part divided
    by its scale (``[counts, sums, moment]``), as one float64 vector."""
    moment = np.asarray(_np(stats["moment"]), np.float64)
    parts = (
        np.asarray(_np(stats["counts"]), np.float64).ravel() / scales[0],
        np.asarray(_np(stats["sums"]), np.float64).ravel() / scales[1],
        moment[np.triu_indices(len(moment))] / scales[2],
    )
    return np.concatenate(parts)


def stats_of_vector(
    vector: np.ndarray, classes: int, dim: int, scales: list[float]
) -> dict[str, np.ndarray]:
    """The statistics a (summed) :func:`stats_vector` stands for; the moment mirrored."""
    counts = vector[:classes] * scales[0]
    sums = vector[classes : classes + classes * dim].reshape(classes, dim) * scales[1]
    moment = np.zeros((dim, dim))
    moment[np.triu_indices(dim)] = vector[classes + classes * dim :] * scales[2]
    moment = moment + np.triu(moment, 1).T
    return {"counts": counts, "sums": sums, "moment": moment}


def step(clip: float, quant: int) -> float:
    """One quantisation step: each site's element is off by less than this."""
    return 2.0 * clip / quant


def _np(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _dtype(value: Any) -> np.dtype:
    """An array's dtype: a Flower ``Array`` names it (a string), a NumPy array holds it."""
    dtype = getattr(value, "dtype", None)
    return np.dtype(dtype) if isinstance(dtype, str | np.dtype) else _np(value).dtype
