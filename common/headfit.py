"""A federated model's classifier refitted from the sites' feature statistics (LDA).

Why: on real HAM10000 sources, classes live at different sites (akiec and bcc almost only
at one), and FedAvg's shared classifier drifts toward each site's own classes during local
steps: the averaged features are good, the averaged head is not (docs/results.md). Linear
discriminant analysis needs only sums over the images, so the sites can send them (this
module) and the server solves for the head in closed form (server/lda.py), as if it had all
the features at once (the idea of CCVR, Luo et al. 2021, and Fed3R, Fanì et al. 2024, in its
simplest exact form).

What a site sends: its training images per class, the per-class sums of the penultimate
features and the sum of their outer products (a D×D matrix; D = 368 for regnetx_002).
That is more than FedAvg's updates disclose (class means of features), so a site can refuse
it in its node config (client/siteconfig.py).

Under sample-level DP the site sends them through the Gaussian mechanism instead
(:func:`private_stats`), spending ``dp-head-share`` of its budget (common/privacy.py): each
image's features are centred and projected to ``dp-head-dims`` dimensions by a map the
server derives from the model alone (server/lda.py: ``dp_projection``: noise images, random
directions; no data), then clipped to norm 1, so one image changes the counts, the sums and
the moment by at most 1 each (L2 sensitivity sqrt(3)) whatever the server sent. On real
images this is what learns under DP where DP-SGD from random weights stays at chance
(docs/results.md): the noise of DP-SGD grows with the network's 2.7 M parameters, that of
the statistics with the 7 + 7·16 + 16·16 numbers released once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.augment import to_float

# L2 sensitivity of (counts, sums, upper triangle of the moment) to one image of norm <= 1.
SENSITIVITY = float(np.sqrt(3.0))
# The largest projection entry a site accepts (client/task.py: dp_query_projection). What
# dp_projection sends is orthonormal directions (every entry <= 1 in size) over a scale it
# floors at 1e-12, so no honest projection exceeds it; with it, the product (x - c) P of
# float32 features stays below 1e60, far from float64's overflow. (private_stats does not
# rely on it: a larger projection's overflowing rows become zero vectors there.)
MAX_PROJECTION_ENTRY = 1e12
# The largest centre entry a site accepts: the centre is a mean of float32 features.
MAX_CENTRE_ENTRY = float(np.finfo(np.float32).max)


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The features the classifier sees (timm's ``pre_logits``), in eval mode, float64.

    An image's features do not depend on the other images in its batch, except through
    floating-point rounding (kernels choose their blocking by batch size: differences of
    about 1e-7 measured); ``batch_size=1`` removes even that (what the DP release uses)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).double().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.num_features), dtype=torch.float64)


def feature_stats(
    model: nn.Module, images: torch.Tensor, labels: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """One site's sufficient statistics for LDA: counts (K,), sums (K, D), moment (D, D)."""
    return _stats_of(penultimate(model, images).numpy(), labels, num_classes)


def _stats_of(x: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Counts (K,), per-class sums (K, D) and the moment x^T x (D, D), in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    return {
        "counts": np.bincount(y, minlength=num_classes).astype(np.float64),
        "sums": sums,
        "moment": x.T @ x,
    }


# ------------------------------------------------------------------ under sample-level DP
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
    stats = _stats_of(z, labels, num_classes)
    gen = rng if rng is not None else np.random.default_rng()
    std = noise_multiplier * SENSITIVITY
    stats["counts"] = stats["counts"] + gen.normal(0.0, std, stats["counts"].shape)
    stats["sums"] = stats["sums"] + gen.normal(0.0, std, stats["sums"].shape)
    upper = np.triu(gen.normal(0.0, std, stats["moment"].shape))
    stats["moment"] = stats["moment"] + upper + np.triu(upper, 1).T
    return stats
