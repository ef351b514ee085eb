"""fedskin ClientApp: one per hospital site, on Flower's Message API.

The same app runs in simulation (the partition id picks a site of the manifest) and in a real
deployment (the SuperNode's ``--node-config`` names the site and its local files). Images
never leave the site: replies carry model weights and aggregate metrics only. The model work
is in :mod:`client.task`, imported only by the handlers that need it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common.data.site_data import load_site, merged_config

log = logging.getLogger("fedskin")


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Site-level DP with clipping at the site: Flower's clipping mod, when the run asks.

    ``central-dp = client-fixed | client-adaptive`` makes the server wrap its strategy in
    Flower's client-side DP wrapper, which relies on every site clipping its own update
    before it leaves; any other setting passes messages through untouched.
    """
    kind = str(context.run_config.get("central-dp", "") or "")
    if msg.metadata.message_type != MessageType.TRAIN or not kind.startswith("client-"):
        return call_next(msg, context)
    mod = fixedclipping_mod if kind == "client-fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[central_dp_mod])


def _config(context: Context, msg: Message | None = None) -> dict[str, Any]:
    """Run config, the site's node config on top, then the server's per-round config."""
    cfg = merged_config(context.run_config, context.node_config)
    if msg is not None and "config" in msg.content.config_records:
        cfg.update(dict(msg.content.config_records["config"]))
    return cfg


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
    from client.task import train_site
    from common.personal import personalize_mode

    cfg = _config(context, msg)
    personalize_mode(cfg)  # refused before any DP step is taken (see common/personal.py)
    data = load_site(cfg, context.node_config)
    n_train = data.n("train")
    session = None
    if bool(cfg.get("dp", False)):
        session = _load_dp(cfg, context, data.site, n_train, steps_per_round(cfg, n_train))
        if not session.can_train_round():
            log.warning("site %s: privacy budget spent, not training this round", data.site)
            reply = {
                "num-examples": 0,
                "dp-budget-exhausted": 1,
                "epsilon": float(session.epsilon()),
            }
            return _train_reply(msg, msg.content.array_records["arrays"], reply, data.site)
    # context.state keeps the personal entries of personalize=fedbn|ditto; never sent
    arrays, metrics = train_site(cfg, msg, data, session, context.state)
    if session is not None:
        _save_dp(cfg, context, data.site, session)
        metrics["dp-budget-exhausted"] = 0
    metrics["num-examples"] = n_train
    return _train_reply(msg, arrays, metrics, data.site)


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
    """Score the received model on this site's validation (or, at the end, test) split;
    with ``personalize``, the site's personalised model (see :mod:`common.personal`)."""
    from client.task import evaluate_received

    cfg = _config(context, msg)
    data = load_site(cfg, context.node_config)
    split = str(cfg.get("split", "validation"))
    reply = evaluate_received(cfg, msg, data, split, context.state)
    content = RecordDict(
        {"metrics": MetricRecord(reply), "site": ConfigRecord({"site": data.site})}
    )
    return Message(content, reply_to=msg)
