"""A site's LDA feature statistics released under sample-level DP: the Gaussian mechanism on
clipped, projected features (the plain statistics and the idea: common/headfit.py; the
server's fit: server/lda.py). Only the site releases them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.headfit import SENSITIVITY, penultimate, stats_of

# The largest projection entry a site accepts (client/task.py: dp_query_projection). What
# dp_projection sends is orthonormal directions (every entry <= 1 in size) over a scale it
# floors at 1e-12, so no honest projection exceeds it; with it, the product (x - c) P of
# float32 features stays below 1e60, far from float64's overflow. (private_stats does not
# rely on it: a larger projection's overflowing rows become zero vectors there.)
MAX_PROJECTION_ENTRY = 1e12
# The largest centre entry a site accepts: the centre is a mean of float32 features.
MAX_CENTRE_ENTRY = float(np.finfo(np.float32).max)


def finite_or_zero(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 copy of ``a`` with every non-finite entry replaced by 0, a constant that
    depends on no data."""
    a = np.array(a.numpy() if torch.is_tensor(a) else a, dtype=np.float64)
    a[~np.isfinite(a)] = 0.0
    return a


def clipped_projections(x: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Each row of ``(x - centre) @ projection`` scaled to L2 norm <= 1, finite whatever the
    inputs: non-finite entries of ``x``, ``centre`` and ``projection`` count as 0, and a row
    whose product is still not finite (overflow: float64 tops out near 1.8e308) becomes the
    zero vector. The clip never squares a large number: a row is divided by its largest
    entry first, so computing its norm cannot overflow either. Row i depends on x[i] and
    the query only, so one image moves the sum of the rows by at most 1. (Each row's
    product is its own call: a matrix product's blocking, and so its rounding, may depend on
    how many rows there are, and a huge projection would magnify that difference.)"""
    x, centre, projection = (finite_or_zero(a) for a in (x, centre, projection))
    z = np.zeros((len(x), projection.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        for i, row in enumerate(x - centre):
            z[i] = row @ projection
    z[~np.isfinite(z).all(axis=1)] = 0.0
    top = np.abs(z).max(axis=1, keepdims=True, initial=0.0)  # finite, >= 0
    nonzero = top > 0
    unit = z / np.where(nonzero, top, 1.0)  # entries in [-1, 1], largest of a row +-1
    length = np.where(nonzero, np.linalg.norm(unit, axis=1, keepdims=True), 1.0)  # [1, sqrt d]
    # ||z|| = top x length; clip where it is about 1 or more (top >= 1 / length never
    # overflows). The margin 1e-12 covers rounding (relative d x 2^-53): norms never pass 1.
    clip = top >= (1.0 - 1e-12) / length
    return np.where(clip, unit / (length * (1.0 + 1e-12)), z)


def private_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    centre: np.ndarray,
    projection: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """A site's LDA statistics under the Gaussian mechanism: features centred, projected,
    clipped to norm 1, summed, then Gaussian noise of std ``noise_multiplier`` x
    :data:`SENSITIVITY` added to every released number (the moment's upper triangle,
    mirrored). ``rng``: a seeded one in simulations (reproducible, as DP-SGD's noise there);
    by default fresh OS entropy, what a deployed site uses (client/task.py).

    Guarantee, for any model, centre and projection the server sends (huge, infinite, NaN,
    rank-deficient): each image contributes a finite vector z of norm <= 1
    (:func:`clipped_projections`: non-finite features, centre or projection entries count
    as 0, a row that overflows becomes 0) and computed from that image alone (its features
    come from a batch of one, so not even floating-point rounding depends on the other
    images). Before the noise, removing one image changes the counts by 1 in one class,
    the sums by z (norm <= 1) and the moment by z z^T (its upper triangle has norm <= 1):
    L2 sensitivity <= sqrt(3), the noise's scale. Every released number is finite."""
    features = penultimate(model, images, batch_size=1).numpy()
    z = clipped_projections(features, centre, projection)
    stats = stats_of(z, labels, num_classes)
    gen = rng if rng is not None else np.random.default_rng()
    std = noise_multiplier * SENSITIVITY
    stats["counts"] = stats["counts"] + gen.normal(0.0, std, stats["counts"].shape)
    stats["sums"] = stats["sums"] + gen.normal(0.0, std, stats["sums"].shape)
    upper = np.triu(gen.normal(0.0, std, stats["moment"].shape))
    stats["moment"] = stats["moment"] + upper + np.triu(upper, 1).T
    return stats
