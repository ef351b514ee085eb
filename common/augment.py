"""Batch-wise augmentation on tensors, on the training device.

All geometric augmentations (flips, 90° rotations, small rotation + zoom, random resized
crop) are folded into one affine matrix per sample and applied with a single
``affine_grid``/``grid_sample`` call, so a batch costs one kernel launch whatever its size and
there is no per-sample Python. Random numbers are drawn on the CPU from the caller's
generator (cheap: a few numbers per image), which keeps runs reproducible on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Augmentation strength. Dermoscopy has no canonical orientation, hence the full 90° group
# and flips; colour jitter is kept mild because colour carries diagnostic signal.
MAX_ANGLE_DEG = 15.0
ZOOM = (0.9, 1.1)
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
BRIGHTNESS = 0.2
CONTRAST = 0.2
SATURATION = 0.2


def _nchw01(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] or float [0,1], NHWC or NCHW -> float32 NCHW in [0,1]."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B,H,W,3) or (B,3,H,W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        if x.shape[-1] != 3:
            raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Evaluation transform: uint8 NHWC (or NCHW) -> ImageNet-normalised float NCHW."""
    return _normalise(_nchw01(x))


def _uniform(n: int, low: float, high: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def _affine_thetas(b: int, g: torch.Generator | None) -> torch.Tensor:
    """(B,2,3) matrices mapping output to input coordinates: crop ∘ rotate/zoom ∘ flip."""
    flip_x = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    k90 = torch.randint(0, 4, (b,), generator=g).float()
    angle = k90 * (math.pi / 2) + _uniform(b, -MAX_ANGLE_DEG, MAX_ANGLE_DEG, g) * math.pi / 180
    zoom = _uniform(b, *ZOOM, g)
    # random resized crop (torchvision's recipe): area fraction and aspect ratio
    area = _uniform(b, *CROP_AREA, g)
    log_ratio = _uniform(b, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), g)
    ratio = torch.exp(log_ratio)
    cw = torch.sqrt(area * ratio).clamp(max=1.0)
    ch = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - cw)
    ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - ch)

    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cw * cos * flip_x
    theta[:, 0, 1] = -cw * sin * flip_y
    theta[:, 1, 0] = ch * sin * flip_x
    theta[:, 1, 1] = ch * cos * flip_y
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random geometric + colour augmentation of a batch; returns normalised float NCHW."""
    x = _nchw01(x)
    b = x.shape[0]
    if b == 0:
        return _normalise(x)
    dev = x.device
    theta = _affine_thetas(b, generator).to(device=dev, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(b, 1 - strength, 1 + strength, generator)
        return f.to(device=dev, dtype=x.dtype).view(b, 1, 1, 1)

    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    x = x * factor(BRIGHTNESS)
    mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * factor(CONTRAST) + mean
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (x - gray) * factor(SATURATION) + gray
    return _normalise(x.clamp(0.0, 1.0))
