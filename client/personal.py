"""Personalised federated learning at a site: what stays local, and Ditto's personal step.

Three methods (run-config key ``personalize``), all on top of FedAvg on the wire:

* ``fedbn`` (Li et al. 2021, FedBN): the normalisation layers' parameters and running
  statistics stay at the site; :func:`norm_keys` finds them by module type;
* ``finetune`` (as FLamby): the federated model is fine-tuned at the site for
  ``finetune-steps`` steps before the final test evaluation;
* ``ditto`` (Li et al. 2021, as FL4Health): the site keeps a personal model ``v`` trained with
  ``loss + (lambda/2) ||v - w||^2`` against the round's received global ``w``
  (:func:`ditto_step`).

Pure torch: the Flower side (where the site keeps this state) is in :mod:`client.task`;
which method a run uses, and its refusal under DP, is common/personal.py (the server and the
runner check it too). The personal state a site keeps at the test is written here and read
back by ``fedskin evaluate --site`` (simulations/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import timm.layers
import torch
from torch import nn

from common.errors import DataError
from common.fileio import atomic_torch_save, confined
from common.rundir import read_checkpoint
from common.train import TrainConfig, train_local

# Methods whose site scores its own model at the test, saved at the site for `fedskin evaluate
# --site` (FedBN: its normalisation entries; Ditto: its personal model; fine-tuning: the
# fine-tuned model it tested).
KEEPS_STATE = ("fedbn", "ditto", "finetune")
PERSONAL_FORMAT = "fedskin-personal/1"

# Normalisation layers by module type, timm's variants included: BatchNorm (and timm's
# BatchNormAct2d / SyncBatchNormAct) and InstanceNorm derive from _NormBase, GroupNormAct
# from GroupNorm, timm's LayerNorm / LayerNorm2d / LayerNormAct from LayerNorm; the rest
# are timm's own classes.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    *(
        getattr(timm.layers, name)
        for name in (
            "FrozenBatchNorm2d",
            "FrozenBatchNormAct2d",
            "RmsNorm",
            "RmsNorm2d",
            "SimpleNorm",
            "SimpleNorm2d",
        )
        if hasattr(timm.layers, name)
    ),
)


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's normalisation layers: their own parameters and
    persistent buffers (weight, bias, running_mean, running_var, num_batches_tracked)."""
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{name}." if name else ""
            # direct entries only: a child (e.g. BatchNormAct2d's act/drop) is not the norm
            keys += [prefix + k for k in module.state_dict() if "." not in k]
    return keys


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's normalisation entries, as detached CPU copies (what FedBN keeps)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in norm_keys(model)}


def overwrite(state: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the entries of ``local`` in place of its own (a new dict).

    FedBN at a site: ``overwrite(received_global, kept_norms)``; every other entry is the
    received one, untouched. A ``local`` key the state lacks is an error (another model).
    """
    extra = sorted(set(local) - set(state))
    if extra:
        raise ValueError(f"kept entries not in the model: {extra[:3]} (another architecture?)")
    return {k: (local[k] if k in local else v) for k, v in state.items()}


def ditto_step(
    model: nn.Module,
    anchor: Mapping[str, torch.Tensor],
    lam: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> dict[str, float]:
    """Train the personal model in place with ``loss + (lam/2) ||v - anchor||^2``.

    ``anchor`` maps parameter names to the round's received global weights. The penalty's
    gradient ``lam (v - anchor)`` is added to each parameter's gradient right after
    backward accumulates it (a post-accumulate-grad hook), so the optimizer steps on the
    gradient of the penalised loss exactly as if the term were in the loss; everything else
    is :func:`common.train.train_local` with ``cfg`` (its own proximal term off).
    """
    if lam < 0:
        raise ValueError(f"ditto-lambda must be >= 0, got {lam}")
    device = torch.device(device)
    model.to(device)
    handles = []
    if lam > 0:
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in anchor:
                raise ValueError(f"no anchor for parameter {name!r}")
            w = torch.as_tensor(anchor[name]).to(device=device, dtype=p.dtype)

            def pull(param: torch.Tensor, w: torch.Tensor = w) -> None:
                if param.grad is not None:
                    param.grad.add_(param.detach() - w, alpha=lam)

            handles.append(p.register_post_accumulate_grad_hook(pull))
    try:
        return train_local(
            model,
            images,
            labels,
            replace(cfg, proximal_mu=0.0),
            num_classes=num_classes,
            device=device,
            seed=seed,
        )
    finally:
        for h in handles:
            h.remove()


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    steps: int,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> dict[str, float]:
    """Fine-tune in place for ``steps`` steps (the run's settings otherwise, no proximal)."""
    if steps < 1:
        raise ValueError(f"finetune-steps must be >= 1, got {steps}")
    tcfg = replace(cfg, local_steps=int(steps), proximal_mu=0.0)
    return train_local(
        model, images, labels, tcfg, num_classes=num_classes, device=device, seed=seed
    )


# ----------------------------------------------------------- the personal state on disk
# At the test, a FedBN or Ditto site writes the entries it scored with (those it held at the
# server's best round), and a fine-tuning site its whole fine-tuned model, to
# <state-dir>/<site>-personal.pt, so that `fedskin evaluate --site` can score the same
# personal model later. It stays at the site (never in a reply). Tensors and plain data only
# (read with weights_only=True); a site's next run overwrites it.


def personal_file(state_dir: str | Path, site: str) -> Path:
    """``<state-dir>/<site>-personal.pt``; a site name that would leave the folder is refused."""
    return confined(state_dir, f"{site}-personal.pt")


def save_personal(
    state_dir: str | Path, site: str, mode: str, best_round: int, entries: Mapping[str, Any]
) -> Path:
    """Write the personal ``entries`` the site scored its test with (none: the global)."""
    payload = {
        "format": PERSONAL_FORMAT,
        "site": str(site),
        "personalize": str(mode),
        "round": int(best_round),
        "arrays": {k: _cpu_tensor(v) for k, v in entries.items()},
    }
    return atomic_torch_save(personal_file(state_dir, site), payload)


def _cpu_tensor(value: Any) -> torch.Tensor:
    """A detached CPU copy of a tensor (a model's state, on any device) or an array."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    return torch.as_tensor(np.array(value))


def read_personal(state_dir: str | Path, site: str, mode: str) -> dict[str, Any]:
    """The site's saved personal state (``arrays``: its entries), checked against the run's
    ``personalize``; a missing or foreign file is one line naming it."""
    path = personal_file(state_dir, site)
    if not path.is_file():
        raise DataError(
            f"no personal state of site {site!r}: {path} not found (a {mode} site writes it "
            "at the run's test; pass --state-dir where the site keeps it)"
        )
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("format") != PERSONAL_FORMAT:
        raise DataError(f"{path} is not a fedskin personal state file")
    if saved.get("personalize") != mode or saved.get("site") != site:
        raise DataError(
            f"{path} holds the {saved.get('personalize')!r} state of site "
            f"{saved.get('site')!r}, not the {mode!r} state of {site!r}"
        )
    return saved
