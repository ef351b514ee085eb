"""Local training at a site: plain, FedProx, or sample-level DP (Opacus), plus prediction.

The whole site split arrives as one uint8 N×H×W×3 tensor (from the cache). It is moved to the
device once when it fits; mini-batches are index tensors gathered with ``images[idx]`` and
augmented on the device, so the hot loop has no per-sample Python and no DataLoader workers.

The round's configuration (optimiser, schedule, FedProx): :mod:`common.train_config`; its
shared step state: :mod:`common.train_round`; DP-SGD: :mod:`common.train_dp`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.augment import to_float
from common.losses import make_loss
from common.train_config import TrainConfig, loss_counts, make_optimizer, proximal_term
from common.train_round import (
    Round,
    Tally,
    epoch_batches,
    forward,
    seeded,
    step_progress,
    to_device,
)

if TYPE_CHECKING:
    from common.privacy import DPSession

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the whole split to the GPU once if it takes under 30% of free memory."""
    if device.type != "cuda" or images.device == device:
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < 0.3 * free:
        return images.to(device, non_blocking=True)
    log.info("images (%.1f GB) kept on the CPU, gathered per batch", images.nbytes / 1e9)
    return images.pin_memory() if not images.is_pinned() else images


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 N×H×W×3 tensor, got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no training images at this site")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {lo}..{hi}")


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    dp: DPSession | None = None,
    seed: int | None = None,
    progress: bool | str = False,
) -> dict[str, float]:
    """Train ``model`` in place on this site's split; return training metrics.

    With ``dp`` the round runs ``dp.steps_per_round`` Poisson-sampled DP-SGD steps and records
    them in the session's accountant. With ``cfg.proximal_mu > 0`` the FedProx penalty
    against the weights at entry (the round's global model) is applied at every step.
    """
    _check_inputs(images, labels, num_classes)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda:
        return _train_local(model, images, labels, cfg, num_classes, device, dp, seed, progress)
    # cuDNN autotuning pays off when shapes repeat: without DP every step has the full batch
    # shape except one smaller last batch per epoch, and cuDNN caches its choice per shape, so
    # that batch is tuned once per process (per distinct size), not every epoch. DP-SGD's
    # Poisson batches change size at every step and would be re-tuned for each new size, so
    # autotuning is off there. The previous setting is restored afterwards.
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dp is None
    try:
        return _train_local(model, images, labels, cfg, num_classes, device, dp, seed, progress)
    finally:
        torch.backends.cudnn.benchmark = before


def _prepare_round(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
) -> Round:
    """Move the model and the split to ``device`` and build the loss and optimiser."""
    cuda = device.type == "cuda"
    model.to(device)
    memory_format = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    images = place_images(images, device)
    # Indices and labels live where the images are (the GPU, unless the split did not fit):
    # a batch is then gathered without any per-step copy of its indices.
    labels_src = to_device(labels.to(dtype=torch.long), images.device)
    counts = loss_counts(cfg, labels, num_classes)
    criterion = make_loss(cfg.loss, counts, cfg.focal_gamma).to(device)
    optimizer = make_optimizer(model, cfg)
    mu = cfg.proximal_mu
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()
    return Round(
        model=model,
        cfg=cfg,
        device=device,
        images=images,
        labels=labels_src,
        criterion=criterion,
        optimizer=optimizer,
        global_params=global_params,
        memory_format=memory_format,
        autocast=autocast,
        tally=Tally.on(device),
    )


def _plain_step(r: Round, net: nn.Module, idx: torch.Tensor, g: torch.Generator) -> None:
    """One optimiser step on one batch, with the FedProx term when it is on."""
    logits, y = forward(r, net, idx, g)
    loss = r.criterion(logits, y)
    r.tally.add(loss, logits, y)  # the data loss, before the FedProx term
    if r.global_params is not None:
        loss = loss + proximal_term(r.model, r.global_params, r.mu)
    r.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    r.optimizer.step()


def _train_plain(r: Round, g: torch.Generator, steps: int, progress: bool | str) -> None:
    """``steps`` steps over successive seeded epochs of the split."""
    net = torch.compile(r.model) if r.cfg.compile and r.cuda else r.model
    batches = epoch_batches(len(r.images), r.cfg.batch_size, steps, g, r.images.device)
    with step_progress(progress, steps) as advance:
        for idx in batches:
            _plain_step(r, net, idx, g)
            advance()


def _train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    dp: DPSession | None,
    seed: int | None,
    progress: bool | str,
) -> dict[str, float]:
    """:func:`train_local` once the inputs are checked and the cuDNN setting is chosen."""
    seed = cfg.seed if seed is None else seed
    model.train()
    if dp is not None:
        # DP-SGD lives with Opacus (about 1 CPU-s to import): loaded by DP rounds only, so a
        # site or simulation actor without DP never pays for it
        from common.train_dp import check_dp, train_dp

        check_dp(model, dp, len(images))
    r = _prepare_round(model, images, labels, cfg, num_classes, device)
    t0 = time.perf_counter()
    with seeded(seed, device) as g:
        if dp is None:
            steps = cfg.steps_per_round(len(images))
            _train_plain(r, g, steps, progress)
        else:
            steps = dp.steps_per_round
            train_dp(r, dp, g, seed, progress)
    if r.cuda:
        torch.cuda.synchronize(device)
    return _round_metrics(r.tally, len(images), steps, time.perf_counter() - t0, dp)


def _round_metrics(
    tally: Tally, n: int, steps: int, seconds: float, dp: DPSession | None
) -> dict[str, float]:
    """The metrics a round reports (the only point where the device-side sums are read)."""
    out = {
        "train_loss": float(tally.loss_sum) / max(tally.seen, 1),
        "train_accuracy": float(tally.correct) / max(tally.seen, 1),
        "num_examples": float(n),
        "steps": float(steps),
        "seconds": seconds,
        "images_per_second": tally.seen / max(seconds, 1e-9),
    }
    if dp is not None:
        out.update(dp.metrics())
    return out


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Softmax probabilities (N, C) for a uint8 N×H×W×3 tensor, in eval mode."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.to(device).eval()
    out: list[torch.Tensor] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        out.append(F.softmax(logits.float(), dim=1))  # stays on the device: no sync per batch
    model.train(was_training)
    if not out:
        n_classes = _num_outputs(model)
        return np.zeros((0, n_classes), dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def _num_outputs(model: nn.Module) -> int:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return int(getattr(head, "out_features", 0))
