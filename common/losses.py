"""Classification losses for imbalanced skin-lesion data.

Every loss here is a *per-sample* quantity averaged over the batch (``sum_i l_i / B``), also
when class-weighted. PyTorch's ``CrossEntropyLoss(weight=w)`` instead divides by ``sum_i
w[y_i]``, which couples the samples of a batch: Opacus' per-sample gradients would then depend
on the other samples' labels, breaking the sensitivity argument of DP-SGD. The per-sample
form is also what FLamby's Fed-ISIC2019 baseline (weighted focal loss, gamma 2) computes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.names import LOSSES


def class_weights(class_counts: np.ndarray) -> np.ndarray:
    """``n_train / (n_classes * count)`` (sklearn's "balanced"); absent classes get weight 0.

    A class with no training example cannot appear as a target, so its weight is never used
    for the loss; 0 keeps the vector finite.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2 or (counts < 0).any():
        raise ValueError(f"class_counts must be a 1-D vector of >= 2 non-negative counts: {counts}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("class_counts are all zero: no training examples")
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / (len(counts) * counts), 0.0)
    return w


class FocalLoss(nn.Module):
    """Softmax focal loss ``-w[y] (1 - p_y)^gamma log p_y``; gamma=0, w=None is plain CE.

    ``reduction`` ("mean" | "sum" | "none") is an attribute because Opacus' ghost clipping
    switches it to "none" to get per-sample losses.
    """

    def __init__(
        self, weight: torch.Tensor | None = None, gamma: float = 2.0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.register_buffer("weight", weight if weight is None else weight.float())
        self.gamma = float(gamma)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), target, reduction="none")  # -log p_y
        if self.gamma > 0:
            loss = loss * (1.0 - torch.exp(-loss)).clamp(min=0.0).pow(self.gamma)
        if self.weight is not None:
            loss = loss * self.weight[target]
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class BalancedSoftmax(nn.Module):
    """Cross-entropy on ``logits + log(prior)`` (Ren et al. 2020; FedLC, Zhang et al. 2022).

    The network then learns class scores free of the prior's label distribution, and its raw
    logits are balanced at test time (what balanced accuracy rewards), and a site of 94% nv
    does not teach the shared model that everything is nv. The prior is the site's own, or
    with ``class-prior = "federation"`` the federation's (common/train_config.py ``loss_counts``),
    with which the sites' losses add up to the pooled model's. Unlike inverse-frequency
    weights it never multiplies a loss by 100 because a class has 2 images at a site.
    Per-sample (see the module docstring), so it is DP-compatible.
    """

    def __init__(self, class_counts: np.ndarray, reduction: str = "mean") -> None:
        super().__init__()
        counts = np.asarray(class_counts, dtype=np.float64)
        # A class absent from the counts gets a prior far below any present one.
        prior = np.maximum(counts, 1e-3) / max(counts.sum(), 1.0)
        self.register_buffer("log_prior", torch.as_tensor(np.log(prior), dtype=torch.float32))
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.log_prior, target, reduction=self.reduction)


def make_loss(name: str, class_counts: np.ndarray, gamma: float = 2.0) -> nn.Module:
    """Build a loss of :data:`LOSSES` (weights or prior from the site's ``class_counts``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if name == "balanced-softmax":
        return BalancedSoftmax(class_counts)
    weight = None
    if name.startswith("weighted-"):
        weight = torch.as_tensor(class_weights(class_counts), dtype=torch.float32)
    return FocalLoss(weight=weight, gamma=gamma if name.endswith("focal") else 0.0)
