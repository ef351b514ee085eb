"""What every step of one local round shares (common/train.py runs the round, common/train_dp.py
its DP-SGD steps): the round's state, the seeded randomness, one batch's forward pass, the
batch order and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import (
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from common.augment import augment_batch, to_float
from common.train_config import TrainConfig


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t.to(device)`` without blocking the host (pinned staging for CPU -> CUDA)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def epoch_batches(
    n: int, batch_size: int, steps: int, g: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """``steps`` index batches from successive seeded permutations (epochs) of 0..n-1.

    Each epoch's permutation is drawn on the CPU from ``g`` (the same random stream on every
    device, interleaved with the augmentation draws exactly as before) and moved to
    ``device`` in one non-blocking copy; the batches are slices of it, so no step pays a
    host-to-device copy of its indices. A last batch of one image joins the one before it:
    BatchNorm cannot train on a single image (a site of 33 images at batch size 32 failed
    every round).
    """
    done = 0
    while done < steps:
        perm = to_device(torch.randperm(n, generator=g), device)
        chunks = list(perm.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        for idx in chunks:
            yield idx
            done += 1
            if done == steps:
                return


@dataclass
class Tally:
    """Running sums of the data loss and correct predictions over the round's batches.

    The sums stay on the device so nothing in the loop waits for the GPU; they are read once,
    after the last step.
    """

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def on(cls, device: torch.device) -> Tally:
        return cls(
            loss_sum=torch.zeros((), device=device),
            correct=torch.zeros((), device=device, dtype=torch.long),
        )

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's (data) loss and correct count."""
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(y)
            self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)


@dataclass
class Round:
    """What every step of one local round shares, built once before the seeded loop: the
    model and its optimiser, the split on its device, the loss, FedProx's anchor and the
    running tallies. The step functions take it instead of a dozen loose arguments."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor  # long, on the images' device
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    global_params: list[torch.Tensor] | None  # the weights at entry, when FedProx is on
    memory_format: torch.memory_format
    autocast: Any
    tally: Tally

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mu(self) -> float:
        return self.cfg.proximal_mu


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed the round's randomness without disturbing the caller's: the global RNGs (dropout,
    drop-path) are forked and seeded, and the yielded CPU generator drives the batch order,
    the Poisson sampling and the augmentation, in the order the loop consumes them."""
    cuda_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)  # dropout / drop-path draws
        yield torch.Generator().manual_seed(seed)


def forward(
    r: Round, net: nn.Module, idx: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather, augment and forward one batch; the logits come back in fp32."""
    idx = to_device(idx, r.images.device)
    x = r.images[idx].to(r.device, non_blocking=True)
    y = r.labels[idx].to(r.device, non_blocking=True)
    x = augment_batch(x, g) if r.cfg.augment else to_float(x)
    x = x.contiguous(memory_format=r.memory_format)
    with r.autocast:
        logits = net(x)
    return logits.float(), y  # the loss in fp32 under bf16 autocast (a no-op otherwise)


class step_progress:
    """A rich progress bar when asked (``progress`` True or a label), else a no-op; yields an
    ``advance()`` callable. Shows steps done, elapsed time and the ETA."""

    def __init__(self, enabled: bool | str, total: int) -> None:
        self.bar = None
        if enabled:
            columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn()]
            columns += [TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA")]
            self.bar = Progress(*columns, TimeRemainingColumn(), transient=True)
        self.label = enabled if isinstance(enabled, str) else "local training"
        self.total = total

    def __enter__(self) -> Any:
        if self.bar is None:
            return lambda: None
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
