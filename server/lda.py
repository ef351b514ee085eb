"""The server's half of the LDA head refit: the classifier solved from the sites' summed
feature statistics (common/headfit.py computes them at a site; server/refit.py screens and
keeps the result), the DP query's projection derived from the model alone, and the same
refit for a baseline trained on one machine (simulations/baselines.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.headfit import feature_stats, penultimate

# Shrinkage of the pooled within-class covariance toward its mean variance (Ledoit-Wolf
# style): keeps the solve stable when a class has few images.
SHRINKAGE = 0.1
# Under DP the noised covariance needs more (measured on the HAM10000 sample: 0.5 beat 0.1).
DP_SHRINKAGE = 0.5
# Noise images the server runs through the model to centre and scale the projection.
REFERENCE_IMAGES = 256
# Under SecAgg+ without DP, the statistics are scaled for features up to this many times
# the reference images' largest norm: a sum of n such features has entries up to n x it,
# the moment n x it^2; 16^2 costs 8 bits of the 49-bit fixed point (common/secagg.py).
FEATURE_BOUND_FACTOR = 16.0


def stats_error(stats: Mapping[str, np.ndarray], num_classes: int, dim: int, n: int | None) -> str:
    """Why a site's statistics cannot be used ("" when they can): shapes, finiteness, and
    counts that add up to the training images the site declared at discovery (``n``; None
    for noised statistics, whose counts are not whole and whose diagonal may dip below 0)."""
    shapes = {"counts": (num_classes,), "sums": (num_classes, dim), "moment": (dim, dim)}
    for key, shape in shapes.items():
        if key not in stats:
            return f"no {key!r} array"
        a = np.asarray(stats[key])
        if a.shape != shape:
            return f"{key!r} has shape {a.shape}, expected {shape}"
        if not np.isfinite(a).all():
            return f"{key!r} is not finite"
    moment = np.asarray(stats["moment"])
    if not np.allclose(moment, moment.T, rtol=1e-6, atol=1e-6):
        return "'moment' is not a symmetric matrix"
    if n is None:
        return ""
    counts = np.asarray(stats["counts"])
    if (counts < 0).any() or counts.sum() != n or (counts != np.round(counts)).any():
        return f"counts {counts.tolist()} are not {n} training images"
    if (np.diag(moment) < 0).any():
        return "'moment' has a negative diagonal"
    return ""


def lda_head(
    stats: Sequence[Mapping[str, np.ndarray]], shrinkage: float = SHRINKAGE
) -> tuple[np.ndarray, np.ndarray]:
    """The LDA classifier (weight K×D, bias K) of the summed statistics, with equal class
    priors (balanced accuracy is the target). A class no site has keeps a bias far below
    every other, so it is never predicted. ValueError when the statistics give no finite
    head (too few images, or degenerate ones)."""
    counts = sum(np.asarray(s["counts"]) for s in stats)
    sums = sum(np.asarray(s["sums"]) for s in stats)
    moment = sum(np.asarray(s["moment"]) for s in stats)
    present = counts > 0
    n_classes = int(present.sum())
    if counts.sum() - n_classes < 1:
        raise ValueError("too few images for a covariance: need more than one per class")
    means = np.where(present[:, None], sums / np.maximum(counts, 1)[:, None], 0.0)
    scatter = moment - (means.T * counts) @ means  # sum of (x - mean_y)(x - mean_y)^T
    cov = scatter / (counts.sum() - n_classes)
    dim = cov.shape[0]
    target = np.trace(cov) / dim * np.eye(dim)
    cov = (1 - shrinkage) * cov + shrinkage * target + 1e-9 * np.eye(dim)
    weight = np.linalg.solve(cov, means.T).T
    bias = -0.5 * np.einsum("kd,kd->k", weight, means)
    bias[~present] = bias[present].min() - 1e6
    weight[~present] = 0.0
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError("the solved head is not finite")
    return weight, bias


def classifier_keys(model: nn.Module) -> tuple[str, str]:
    """The state-dict names of the classifier's weight and bias (timm's ``classifier``)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    head = model.get_classifier()
    if not name or not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError(f"{type(model).__name__}: no linear classifier with a bias to refit")
    return f"{name}.weight", f"{name}.bias"


def with_lda_head(
    model: nn.Module, images: torch.Tensor, labels: np.ndarray, num_classes: int
) -> nn.Module:
    """A copy of ``model`` whose classifier is the LDA head of these images' features: the
    refit a baseline trained on one machine gets, so that it is compared with the
    federation's refitted model on equal terms. Raises ValueError when the images cannot
    give a covariance or the model has no linear head (the caller keeps its head)."""
    classifier_keys(model)  # a linear classifier with a bias, or ValueError
    weight, bias = lda_head([feature_stats(model, images, labels, num_classes)])
    refit = copy.deepcopy(model)
    head = refit.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return refit


# ------------------------------------------------------------------ the query's reference
def reference_features(model: nn.Module, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The model's features of :data:`REFERENCE_IMAGES` noise images drawn from ``rng``:
    what the server knows of the feature space without any site's data."""
    shape = (REFERENCE_IMAGES, image_size, image_size, 3)
    return penultimate(model, torch.from_numpy(rng.integers(0, 256, shape, np.uint8))).numpy()


def feature_bound(model: nn.Module, image_size: int, seed: int) -> float:
    """The feature norm a SecAgg+ statistics exchange scales for (server/refit.py):
    :data:`FEATURE_BOUND_FACTOR` times the largest norm of the reference images' features
    (a site's entries beyond it are clipped, and the federation's count of them reported)."""
    ref = reference_features(model, image_size, np.random.default_rng(seed))
    return FEATURE_BOUND_FACTOR * max(float(np.linalg.norm(ref, axis=1).max(initial=0.0)), 1e-6)


# ------------------------------------------------------------------ under sample-level DP
def dp_projection(
    model: nn.Module, image_size: int, dims: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The centre (D,) and projection (D, d) of a DP query, from the model alone: the mean
    feature of seeded noise images, and ``dims`` orthonormal random directions scaled so
    that those images' centred projections have median norm 1 (the sites clip at 1).
    Real features sit far from 0 in one common direction; centring keeps the clipping
    budget for what differs between images."""
    rng = np.random.default_rng(seed)
    ref = reference_features(model, image_size, rng)
    centre = ref.mean(axis=0)
    directions, _ = np.linalg.qr(rng.normal(size=(ref.shape[1], min(dims, ref.shape[1]))))
    scale = float(np.median(np.linalg.norm((ref - centre) @ directions, axis=1)))
    return centre, directions / max(scale, 1e-12)


def private_lda_head(
    stats: Sequence[Mapping[str, np.ndarray]],
    centre: np.ndarray,
    projection: np.ndarray,
    noise_std: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The LDA head (K×D, K) of noised statistics, acting on the model's own features:
    solved in the projected space, then folded back (``W (x - c) P + b`` is linear in x).
    A class whose summed noisy count is below 3 x ``noise_std`` (the sum's noise) is
    treated as absent: its noisy mean would be noise divided by almost nothing."""
    counts = sum(np.asarray(s["counts"], dtype=np.float64) for s in stats)
    present = counts >= max(3.0 * noise_std, 1.0)
    summed = {
        "counts": np.where(present, counts, 0.0),
        "sums": np.where(present[:, None], sum(np.asarray(s["sums"]) for s in stats), 0.0),
        "moment": sum(np.asarray(s["moment"]) for s in stats),
    }
    weight, bias = lda_head([summed], shrinkage=DP_SHRINKAGE)
    full = weight @ projection.T
    return full, bias - full @ centre
