"""The site's model work for the ClientApp: torch, timm and Opacus live here.

Split from ``client_app`` (as in Flower's examples) so that a message that needs no model,
such as the server's query, does not pay for importing torch and timm: in a deployment every
message runs in a fresh ClientApp process.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from common.data.site_data import SiteData
from common.fedmetrics import site_summary
from common.metrics import compute_metrics, scalar_metrics
from common.models import model_for_run, set_weights
from common.train import TrainConfig, pick_device, place_images, predict, train_local
from common.wire import is_packed, layout_of, pack, unpack

_MODELS: dict[tuple, torch.nn.Module] = {}
_TENSORS: dict[tuple, tuple[SiteData, torch.Tensor]] = {}


def site_images(data: SiteData, split: str) -> torch.Tensor:
    """A split's uint8 images, moved to the training device once per process, not per round."""
    device = pick_device()
    key = (data.site, split, str(device))
    if key not in _TENSORS or _TENSORS[key][0] is not data:  # same site, reloaded data
        _TENSORS[key] = (data, place_images(torch.from_numpy(data.images[split]), device))
    return _TENSORS[key][1]


def model_for(
    cfg: dict[str, Any], num_classes: int, arrays: ArrayRecord
) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """The run's architecture (built once per process) holding the received weights, and
    those weights as a state dict (they arrive packed, see :mod:`common.wire`)."""
    keys = ("model", "dp", "central-dp", "pretrained")
    key = (num_classes, *(str(cfg.get(k, "")) for k in keys))
    if key not in _MODELS:
        _MODELS[key] = model_for_run(cfg, num_classes)
    state = unpack(arrays, layout_of(_MODELS[key].state_dict()))
    set_weights(_MODELS[key], state)
    return _MODELS[key], state


def site_seed(cfg: dict[str, Any], site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{cfg.get('seed', 0)}/{site}/{server_round}".encode()).hexdigest()
    return int(digest[:8], 16)


def train_config(cfg: dict[str, Any], msg: Message) -> TrainConfig:
    """Local training settings; the proximal term only when the server's strategy asks.

    FedProx sends ``proximal-mu`` with every train message. A ``proximal-mu`` left in the run
    config must not turn FedAvg (or FedAdam) into FedProx behind the user's back.
    """
    server = msg.content.config_records.get("config", {})
    return replace(
        TrainConfig.from_run_config(cfg), proximal_mu=float(server.get("proximal-mu", 0.0))
    )


def train_site(
    cfg: dict[str, Any], msg: Message, data: SiteData, session: Any
) -> tuple[ArrayRecord, dict[str, float]]:
    """Train the received model on the site's train split; return new weights and metrics.

    Integer buffers (BatchNorm step counters) go back as received: they do not change the
    model's output, and under site-level DP they would dominate the norm that is clipped.
    """
    received: ArrayRecord = msg.content.array_records["arrays"]
    model, start = model_for(cfg, len(data.classes), received)
    metrics = train_local(
        model,
        site_images(data, "train"),
        torch.from_numpy(data.labels["train"]),
        train_config(cfg, msg),
        num_classes=len(data.classes),
        device=pick_device(),
        dp=session,
        seed=site_seed(cfg, data.site, int(cfg.get("server-round", 0))),
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not v.is_floating_point():
            state[k] = torch.from_numpy(np.array(start[k]))
    # The reply travels the way the weights came: packed from the fedskin server.
    return (pack(state) if is_packed(received) else ArrayRecord(state)), metrics


def evaluate_site(model: torch.nn.Module, data: SiteData, split: str) -> dict[str, Any]:
    """Site metrics (scalars) plus the poolable aggregates of :mod:`common.fedmetrics`."""
    probs = predict(model, site_images(data, split), device=pick_device())
    bad = int((~np.isfinite(np.asarray(probs)).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"site {data.site}: the received model gives non-finite scores for {bad} of "
            f"{len(probs)} {split} images (a diverged or over-noised global model)"
        )
    labels = data.labels[split]
    out: dict[str, Any] = {
        k: float(v) for k, v in scalar_metrics(compute_metrics(labels, probs, data.classes)).items()
    }
    out["num-examples"] = int(len(labels))
    out.update(site_summary(labels, probs, len(data.classes)))
    return out


def evaluate_received(cfg: dict[str, Any], msg: Message, data: SiteData, split: str) -> dict:
    model, _ = model_for(cfg, len(data.classes), msg.content.array_records["arrays"])
    return evaluate_site(model, data, split)
