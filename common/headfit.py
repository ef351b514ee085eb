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
(client/headstats.py: ``private_stats``), spending ``dp-head-share`` of its budget
(common/privacy.py): each image's features are centred and projected to ``dp-head-dims``
dimensions by a map the server derives from the model alone (server/lda.py:
``dp_projection``: noise images, random directions; no data), then clipped to norm 1, so one
image changes the counts, the sums and the moment by at most 1 each (L2 sensitivity sqrt(3))
whatever the server sent. On real images this is what learns under DP where DP-SGD from
random weights stays at chance (docs/results.md): the noise of DP-SGD grows with the
network's 2.7 M parameters, that of the statistics with the 7 + 7·16 + 16·16 numbers
released once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.augment import to_float

# L2 sensitivity of (counts, sums, upper triangle of the moment) to one image of norm <= 1.
SENSITIVITY = float(np.sqrt(3.0))


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
    return stats_of(penultimate(model, images).numpy(), labels, num_classes)


def stats_of(x: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Counts (K,), per-class sums (K, D) and the moment x^T x (D, D) of features ``x``, in
    float64 (the plain statistics, or under DP those of the clipped projections)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    return {
        "counts": np.bincount(y, minlength=num_classes).astype(np.float64),
        "sums": sums,
        "moment": x.T @ x,
    }
