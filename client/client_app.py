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

from common.data.site_data import load_site
from common.rundir import atomic_write_text
from common.siteconfig import (
    SiteConfigError,
    confined,
    eval_split,
    require_run_dp,
    require_state_dir,
    run_tag,
    safe_name,
    site_config,
)

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
    """Run config, the site's node config on top, then the server's per-round config, which
    may not touch the site's own keys (data, privacy budget, state, identity: see
    :mod:`common.siteconfig`)."""
    sent = None
    if msg is not None and "config" in msg.content.config_records:
        sent = dict(msg.content.config_records["config"])
    return site_config(context.run_config, context.node_config, sent)


# What a train reply's metrics hold (tests/test_site_control.py checks both). Under
# sample-level DP the train loss and accuracy are left out: they are computed on the private
# batches without noise, outside what the accountant covers (docs/privacy.md).
TRAIN_KEYS = frozenset(
    {
        "num-examples",
        "num_examples",
        "train_loss",
        "train_accuracy",
        "steps",
        "seconds",
        "images_per_second",
    }
)
TRAIN_KEYS_DP = frozenset(
    (TRAIN_KEYS - {"train_loss", "train_accuracy"})
    | {"epsilon", "delta", "noise_multiplier", "dp-budget-exhausted"}
)
NOT_UNDER_DP = ("train_loss", "train_accuracy")


# ------------------------------------------------------------------------ privacy state
def _dp_state_file(cfg: dict[str, Any], site: str, tag: str) -> Path | None:
    """``<state-dir>/<site>-<run-tag>-privacy.json``: one accountant per run, kept across
    restarts; neither name may lead out of ``state-dir``."""
    d = str(cfg.get("state-dir", ""))
    if not d:
        return None
    name = f"{safe_name(site, 'site')}-{run_tag(tag)}-privacy.json"
    return confined(d, name)


def _dp_tag(cfg: dict[str, Any], context: Context) -> str:
    """The run tag the site's accountant was started under (a later message cannot switch
    this SuperNode to another file mid-run), else the one the server sends."""
    if "dp" in context.state.config_records and "run-tag" in context.state.config_records["dp"]:
        return str(context.state.config_records["dp"]["run-tag"])
    return run_tag(cfg.get("run-tag", "run"))


def _load_dp(cfg: dict[str, Any], context: Context, site: str, n_train: int, steps: int):
    """The site's accountant lives across rounds: client state, or a file at the site."""
    from common.privacy import DPConfig, DPSession

    state = None
    if "dp" in context.state.config_records:
        state = str(context.state.config_records["dp"]["session"])
    path = _dp_state_file(cfg, site, _dp_tag(cfg, context))
    if state is None and path is not None and path.is_file():
        state = path.read_text()
    if state is not None:
        return DPSession.from_json(state)
    return DPSession(DPConfig.from_run_config(cfg), n_train, int(cfg["batch-size"]), steps)


def _save_dp(cfg: dict[str, Any], context: Context, site: str, session: Any) -> None:
    text = session.to_json()
    tag = _dp_tag(cfg, context)
    context.state.config_records["dp"] = ConfigRecord({"session": text, "run-tag": tag})
    path = _dp_state_file(cfg, site, tag)
    if path is not None:
        atomic_write_text(path, text)  # a crash mid-write keeps the previous spending


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
    _refuse(require_run_dp, cfg, context.run_config)
    _refuse(require_state_dir, cfg, context.node_config)
    data = load_site(cfg, context.node_config)
    n_train = data.n("train")
    session = None
    if bool(cfg.get("dp", False)):
        session = _load_dp(cfg, context, data.site, n_train, steps_per_round(cfg, n_train))
        if not session.can_train_round():
            log.warning("site %s: privacy budget spent, not training this round", data.site)
            reply = {k: 0 for k in TRAIN_KEYS_DP} | session.metrics()
            reply["dp-budget-exhausted"] = 1
            return _train_reply(msg, msg.content.array_records["arrays"], reply, data.site)
    # context.state keeps the personal entries of personalize=fedbn|ditto; never sent
    arrays, metrics = train_site(cfg, msg, data, session, context.state)
    if session is not None:
        _save_dp(cfg, context, data.site, session)
        metrics["dp-budget-exhausted"] = 0
        for key in NOT_UNDER_DP:  # computed on private batches without noise: never sent
            metrics.pop(key, None)
    metrics["num-examples"] = n_train
    return _train_reply(msg, arrays, metrics, data.site)


def _refuse(check: Any, *args: Any) -> None:
    """Run a site check; a refusal is one line in the site's log, then the error reply."""
    try:
        check(*args)
    except SiteConfigError as err:
        log.error("site refuses: %s", err)
        raise


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
    split = eval_split(cfg)  # never the train split: it is what DP protects
    _refuse(require_run_dp, cfg, context.run_config)
    data = load_site(cfg, context.node_config)
    reply = evaluate_received(cfg, msg, data, split, context.state)
    content = RecordDict(
        {"metrics": MetricRecord(reply), "site": ConfigRecord({"site": data.site})}
    )
    return Message(content, reply_to=msg)
