"""fedskin ClientApp: one per hospital site, on Flower's Message API.

The same app runs in simulation (the partition id picks a site of the manifest) and in a real
deployment (the SuperNode's ``--node-config`` names the site and its local files). Images
never leave the site: replies carry model weights and aggregate metrics only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.data.site_data import SiteData, load_site, merged_config
from common.fedmetrics import site_summary
from common.metrics import compute_metrics, scalar_metrics
from common.models import build_model, set_weights
from common.train import TrainConfig, pick_device, place_images, predict, train_local

log = logging.getLogger("fedskin")
app = ClientApp()

_MODELS: dict[tuple, torch.nn.Module] = {}
_TENSORS: dict[tuple, tuple[SiteData, torch.Tensor]] = {}


def site_images(data: SiteData, split: str) -> torch.Tensor:
    """A split's uint8 images, moved to the training device once per process, not per round."""
    device = pick_device()
    key = (data.site, split, str(device))
    if key not in _TENSORS or _TENSORS[key][0] is not data:  # same site, reloaded data
        _TENSORS[key] = (data, place_images(torch.from_numpy(data.images[split]), device))
    return _TENSORS[key][1]


def _config(context: Context, msg: Message | None = None) -> dict[str, Any]:
    """Run config, the site's node config on top, then the server's per-round config."""
    cfg = merged_config(context.run_config, context.node_config)
    if msg is not None and "config" in msg.content.config_records:
        cfg.update(dict(msg.content.config_records["config"]))
    return cfg


def _model(cfg: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """Build each architecture once per process; weights are overwritten every message."""
    key = (cfg["model"], num_classes, bool(cfg.get("dp", False)), str(cfg.get("pretrained", "")))
    if key not in _MODELS:
        _MODELS[key] = build_model(
            cfg["model"], num_classes, pretrained=str(cfg.get("pretrained", "")), dp=key[2]
        )
    return _MODELS[key]


def _site_seed(cfg: dict[str, Any], site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{cfg.get('seed', 0)}/{site}/{server_round}".encode()).hexdigest()
    return int(digest[:8], 16)


# ------------------------------------------------------------------------ privacy state
def _dp_state_file(cfg: dict[str, Any], site: str) -> Path | None:
    d = str(cfg.get("state-dir", ""))
    tag = str(cfg.get("run-tag", "run"))  # one accountant per run, kept across restarts
    return Path(d).expanduser() / f"{site}-{tag}-privacy.json" if d else None


def _load_dp(cfg: dict[str, Any], context: Context, site: str, n_train: int, steps: int):
    """The site's accountant lives across rounds: client state, or a file at the site."""
    from common.privacy import DPConfig, DPSession

    state = None
    if "dp" in context.state.config_records:
        state = str(context.state.config_records["dp"]["session"])
    path = _dp_state_file(cfg, site)
    if state is None and path is not None and path.is_file():
        state = path.read_text()
    if state is not None:
        return DPSession.from_json(state)
    return DPSession(DPConfig.from_run_config(cfg), n_train, int(cfg["batch-size"]), steps)


def _save_dp(cfg: dict[str, Any], context: Context, site: str, session: Any) -> None:
    text = session.to_json()
    context.state.config_records["dp"] = ConfigRecord({"session": text})
    path = _dp_state_file(cfg, site)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def steps_per_round(cfg: dict[str, Any], n_train: int) -> int:
    if int(cfg.get("local-steps", 0)) > 0:
        return int(cfg["local-steps"])
    per_epoch = max(1, int(np.ceil(n_train / int(cfg["batch-size"]))))
    return per_epoch * int(cfg.get("local-epochs", 1))


# ------------------------------------------------------------------------------ handlers
@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is and how much data it holds."""
    cfg = _config(context, msg)
    data = load_site(cfg, context.node_config)
    info = ConfigRecord(
        {
            "site": data.site,
            "classes": json.dumps(data.classes),
            "n-train": data.n("train"),
            "n-validation": data.n("validation"),
            "n-test": data.n("test"),
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(context, msg)
    data = load_site(cfg, context.node_config)
    server_round = int(cfg.get("server-round", 0))
    model = _model(cfg, len(data.classes))
    arrays: ArrayRecord = msg.content.array_records["arrays"]
    set_weights(model, arrays.to_torch_state_dict())
    tcfg = train_config(cfg, msg)
    n_train = data.n("train")

    session = None
    metrics: dict[str, float] = {}
    if bool(cfg.get("dp", False)):
        session = _load_dp(cfg, context, data.site, n_train, steps_per_round(cfg, n_train))
        if not session.can_train_round():
            log.warning("site %s: privacy budget spent, not training this round", data.site)
            reply = {
                "num-examples": 0,
                "dp-budget-exhausted": 1,
                "epsilon": float(session.epsilon()),
            }
            return _train_reply(msg, arrays, reply, data.site)
    metrics = train_local(
        model,
        site_images(data, "train"),
        torch.from_numpy(data.labels["train"]),
        tcfg,
        num_classes=len(data.classes),
        device=pick_device(),
        dp=session,
        seed=_site_seed(cfg, data.site, server_round),
    )
    if session is not None:
        _save_dp(cfg, context, data.site, session)
        metrics["dp-budget-exhausted"] = 0
    metrics["num-examples"] = n_train
    new_arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return _train_reply(msg, new_arrays, metrics, data.site)


def train_config(cfg: dict[str, Any], msg: Message) -> TrainConfig:
    """Local training settings; the proximal term only when the server's strategy asks.

    FedProx sends ``proximal-mu`` with every train message. A ``proximal-mu`` left in the run
    config must not turn FedAvg (or FedAdam) into FedProx behind the user's back.
    """
    server = msg.content.config_records.get("config", {})
    return replace(
        TrainConfig.from_run_config(cfg), proximal_mu=float(server.get("proximal-mu", 0.0))
    )


def _train_reply(msg: Message, arrays: ArrayRecord, metrics: dict, site: str) -> Message:
    record = MetricRecord({k: _num(v) for k, v in metrics.items()})
    content = RecordDict(
        {"arrays": arrays, "metrics": record, "site": ConfigRecord({"site": site})}
    )
    return Message(content, reply_to=msg)


def _num(v: Any) -> int | float:
    return int(v) if isinstance(v, (bool, np.integer, int)) else float(v)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation (or, at the end, test) split."""
    cfg = _config(context, msg)
    data = load_site(cfg, context.node_config)
    split = str(cfg.get("split", "validation"))
    model = _model(cfg, len(data.classes))
    set_weights(model, msg.content.array_records["arrays"].to_torch_state_dict())
    reply = evaluate_site(model, data, split)
    content = RecordDict(
        {"metrics": MetricRecord(reply), "site": ConfigRecord({"site": data.site})}
    )
    return Message(content, reply_to=msg)


def evaluate_site(model: torch.nn.Module, data: SiteData, split: str) -> dict[str, Any]:
    """Site metrics (scalars) plus the poolable aggregates of :mod:`common.fedmetrics`."""
    probs = predict(model, site_images(data, split), device=pick_device())
    labels = data.labels[split]
    out: dict[str, Any] = {
        k: float(v) for k, v in scalar_metrics(compute_metrics(labels, probs, data.classes)).items()
    }
    out["num-examples"] = int(len(labels))
    out.update(site_summary(labels, probs, len(data.classes)))
    return out
