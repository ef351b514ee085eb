"""What a local round is configured by: :class:`TrainConfig`, the learning-rate schedule,
the optimiser, FedProx's proximal term and the class counts the loss is weighted by."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import RunConfig, run_config_of, steps_for
from common.names import OPTIMIZERS


@dataclass
class TrainConfig:
    """Local training hyper-parameters (kebab-case keys in the Flower run config)."""

    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local_epochs
    loss: str = "weighted-ce"
    focal_gamma: float = 2.0
    proximal_mu: float = 0.0
    # The federation's training class counts (class-prior = "federation", sent by the
    # server); None: the loss's prior or weights come from the images trained on.
    class_counts: tuple[int, ...] | None = None
    augment: bool = True
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_size < 1 or self.lr <= 0 or self.proximal_mu < 0:
            raise ValueError("batch-size must be >= 1, lr > 0 and proximal-mu >= 0")
        if self.local_steps <= 0 and self.local_epochs < 1:
            raise ValueError("set local-epochs >= 1 or local-steps >= 1")

    @classmethod
    def from_run(
        cls,
        run: RunConfig,
        proximal_mu: float = 0.0,
        server_round: int = 0,
        class_counts: tuple[int, ...] | None = None,
    ) -> TrainConfig:
        """The training view of the typed run config. ``proximal_mu`` is FedProx's, which
        the server sends with each train message: the run config's ``proximal-mu`` is the
        strategy's to read (a site trains without the term unless the server asks).
        ``server_round`` sets the round's learning rate (:func:`round_lr`);
        ``class_counts`` are the federation's (see ``class-prior``)."""
        return cls(
            optimizer=run.optimizer,
            lr=round_lr(run.lr, run.lr_schedule, server_round, run.num_server_rounds),
            momentum=run.momentum,
            weight_decay=run.weight_decay,
            batch_size=run.batch_size,
            local_epochs=run.local_epochs,
            local_steps=run.local_steps,
            loss=run.loss,
            focal_gamma=run.focal_gamma,
            proximal_mu=proximal_mu,
            class_counts=class_counts,
            augment=run.augment,
            amp=run.amp,
            channels_last=run.channels_last,
            compile=run.compile,
            seed=run.seed,
        )

    @classmethod
    def from_run_config(cls, cfg: RunConfig | Mapping[str, Any]) -> TrainConfig:
        """:meth:`from_run` of a flat run config (checked; other keys ignored)."""
        return cls.from_run(run_config_of(cfg))

    def steps_per_round(self, n_train: int) -> int:
        return steps_for(n_train, self.batch_size, self.local_epochs, self.local_steps)


def round_lr(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based; 0: no round, the base rate).

    ``cosine`` anneals it from ``lr`` in round 1 towards 0 over the run's rounds. Under label
    skew, FedAvg settles where the sites' local steps pull apart, at a distance that grows
    with the step size: annealing the step shrinks that distance round by round, and the
    pooled and local baselines follow the same schedule (simulations/baselines.py).
    """
    if schedule == "constant" or server_round < 1 or rounds < 1:
        return lr
    t = (min(server_round, rounds) - 1) / rounds
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def proximal_term(
    model: nn.Module, global_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx penalty ``(mu/2) * sum ||w - w_global||^2`` over the trainable parameters.

    ``global_params`` is the round's global model, frozen at the start of local training
    (a list aligned with ``model.parameters()`` or a name -> tensor mapping).
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if isinstance(global_params, Mapping):
        pairs = [(p, global_params[n]) for n, p in named]
    else:
        if len(global_params) != len(named):
            raise ValueError(f"{len(global_params)} global tensors for {len(named)} parameters")
        pairs = [(p, g) for (_, p), g in zip(named, global_params, strict=True)]
    total = torch.zeros((), device=named[0][1].device)
    for p, g in pairs:
        if p.requires_grad:
            total = total + (p - g.to(p.device, p.dtype)).pow(2).sum()
    return 0.5 * mu * total


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def loss_counts(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """The class counts that set the loss's prior or weights: the federation's when the
    server sent them, else those of the images trained on.

    Why the federation's: a site's own prior makes balanced-softmax learn scores balanced
    *within that site*. When classes live at different sites (akiec and bcc almost only at
    one HAM10000 source), those within-site scores are not balanced across the federation;
    with the federation's prior the sites' losses sum to the pooled model's. Why not always:
    a site's own prior leaves the classes it lacks alone, which the personalised models and
    short runs gained from (docs/results.md has both, measured).
    """
    if cfg.class_counts is None:
        return np.bincount(labels.cpu().numpy().astype(np.int64), minlength=num_classes)
    counts = np.asarray(cfg.class_counts, dtype=np.int64)
    if counts.shape != (num_classes,) or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(
            f"class counts {list(cfg.class_counts)} are not {num_classes} non-negative "
            "counts with a positive sum"
        )
    return counts
