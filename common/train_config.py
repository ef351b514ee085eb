"""What a local round is configured by: :class:`TrainConfig`, the learning-rate schedule,
the optimiser, FedProx's proximal term and the class counts the loss is weighted by."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import RunConfig, steps_for, value_of
from common.errors import ConfigError

_RUN = RunConfig.defaults()  # the schema's defaults: the one place a default is written
# TrainConfig field -> the run-config key whose default and rule it takes
RUN_KEYS = {
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight-decay",
    "batch_size": "batch-size",
    "local_epochs": "local-epochs",
    "local_steps": "local-steps",
    "loss": "loss",
    "focal_gamma": "focal-gamma",
    "augment": "augment",
    "amp": "amp",
    "channels_last": "channels-last",
    "compile": "compile",
    "seed": "seed",
}


@dataclass
class TrainConfig:
    """Local training hyper-parameters: the training section of the run config (defaults and
    rules are the schema's, common/config.py), plus what the server sends per round."""

    optimizer: str = _RUN.optimizer
    lr: float = _RUN.lr
    momentum: float = _RUN.momentum
    weight_decay: float = _RUN.weight_decay
    batch_size: int = _RUN.batch_size
    local_epochs: int = _RUN.local_epochs
    local_steps: int = _RUN.local_steps  # > 0 overrides local_epochs
    loss: str = _RUN.loss
    focal_gamma: float = _RUN.focal_gamma
    # FedProx's term, sent by the server with each train message (0: none)
    proximal_mu: float = 0.0
    # The federation's training class counts (class-prior = "federation", sent by the
    # server); None: the loss's prior or weights come from the images trained on.
    class_counts: tuple[int, ...] | None = None
    augment: bool = _RUN.augment
    amp: bool = _RUN.amp
    channels_last: bool = _RUN.channels_last
    compile: bool = _RUN.compile
    seed: int = _RUN.seed

    def __post_init__(self) -> None:
        """Each field by its key's rule in the schema (one owner of the rules)."""
        for name, key in RUN_KEYS.items():
            value_of({key: getattr(self, name)}, key)
        value_of({"proximal-mu": self.proximal_mu}, "proximal-mu")
        if self.local_steps <= 0 and self.local_epochs < 1:
            raise ConfigError("set local-epochs >= 1 or local-steps >= 1")

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
        taken = {name: getattr(run, name) for name in RUN_KEYS}
        taken["lr"] = round_lr(run.lr, run.lr_schedule, server_round, run.num_server_rounds)
        return cls(**taken, proximal_mu=proximal_mu, class_counts=class_counts)

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
