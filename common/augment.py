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


# Small constant tensors per (device, dtype). Building them with ``torch.tensor(..., device=
# "cuda")`` for every batch is a host-to-device copy that blocks the host until the GPU has
# caught up, i.e. a pipeline stall per batch; cached, they are created once per process.
_CONSTANTS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_CONSTANT_VALUES = {
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "gray": (0.299, 0.587, 0.114),  # luma weights for contrast / saturation
}


def cached_constant(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (1,3,1,1) constant on ``device``: same values as a fresh ``torch.tensor`` each time."""
    key = (name, device, dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.tensor(_CONSTANT_VALUES[name], device=device, dtype=dtype).view(1, 3, 1, 1)
        _CONSTANTS[key] = t
    return t


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = cached_constant("mean", x.device, x.dtype)
    std = cached_constant("std", x.device, x.dtype)
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


def _to_device(
    theta: torch.Tensor, factors: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the CPU-drawn parameters to ``device`` in one non-blocking copy.

    Separate synchronous ``.to("cuda")`` calls would stall the host once per tensor per batch;
    one pinned buffer copied with ``non_blocking=True`` lets the host queue the next kernels.
    On the CPU the tensors are returned as they are.
    """
    if device.type == "cpu":
        return theta, factors
    b = theta.shape[0]
    packed = torch.cat([theta.reshape(b, 6), factors], 1)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return packed[:, :6].reshape(b, 2, 3), packed[:, 6:]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random geometric + colour augmentation of a batch; returns normalised float NCHW."""
    x = _nchw01(x)
    b = x.shape[0]
    if b == 0:
        return _normalise(x)
    dev = x.device
    # All random numbers come from the CPU generator, in a fixed order (geometry, then
    # brightness, contrast, saturation), so results do not depend on the device.
    theta = _affine_thetas(b, generator)
    factors = torch.stack(
        [_uniform(b, 1 - s, 1 + s, generator) for s in (BRIGHTNESS, CONTRAST, SATURATION)], 1
    )
    theta, factors = _to_device(theta, factors, dev)
    theta = theta.to(dtype=x.dtype)
    factors = factors.to(dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factor(i: int) -> torch.Tensor:
        return factors[:, i].reshape(b, 1, 1, 1)

    gray_w = cached_constant("gray", dev, x.dtype)
    x = x * factor(0)
    mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * factor(1) + mean
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (x - gray) * factor(2) + gray
    return _normalise(x.clamp(0.0, 1.0))
