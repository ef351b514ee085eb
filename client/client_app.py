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

from client.message import ServerAsks, message_config
from common.config import RunConfig
from common.data.site_data import load_site
from common.protocol import FEATURE_STATS, TRAIN_KEYS, TRAIN_KEYS_DP
from common.rundir import atomic_write_text
from common.siteconfig import (
    SiteConfigError,
    confined,
    eval_split,
    is_simulation,
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
    kind = RunConfig.from_flat(context.run_config).central_dp
    if msg.metadata.message_type != MessageType.TRAIN or not kind.startswith("client-"):
        return call_next(msg, context)
    mod = fixedclipping_mod if kind == "client-fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[central_dp_mod])


def _config(context: Context, msg: Message | None = None) -> tuple[RunConfig, ServerAsks]:
    """Run config, the site's node config on top, then the server's per-round config, which
    may not touch the site's own keys (data, privacy budget, state, identity: see
    :mod:`common.siteconfig`): typed once, here, with the message's own fields apart."""
    run = site_config(context.run_config, context.node_config, message_config(msg))
    return run, ServerAsks.of(msg)


# What a train reply's metrics hold: common/protocol.py (tests/test_site_control.py checks
# both sets against what the site sends).
NOT_UNDER_DP = tuple(sorted(TRAIN_KEYS - TRAIN_KEYS_DP))  # train loss and accuracy


# ------------------------------------------------------------------------ privacy state
def _dp_state_file(run: RunConfig, site: str, tag: str) -> Path | None:
    """``<state-dir>/<site>-<run-tag>-privacy.json``: one accountant per run, kept across
    restarts; neither name may lead out of ``state-dir``."""
    d = run.state_dir
    if not d:
        return None
    name = f"{safe_name(site, 'site')}-{run_tag(tag)}-privacy.json"
    return confined(d, name)


def _dp_tag(asks: ServerAsks, context: Context) -> str:
    """The run tag the site's accountant was started under (a later message cannot switch
    this SuperNode to another file mid-run), else the one the server sends."""
    if "dp" in context.state.config_records and "run-tag" in context.state.config_records["dp"]:
        return str(context.state.config_records["dp"]["run-tag"])
    return run_tag(asks.run_tag)


def _load_dp(run: RunConfig, asks: ServerAsks, context: Context, site: str, n_train: int):
    """The site's accountant lives across rounds: client state, or a file at the site."""
    from common.privacy import DPConfig, DPSession

    state = None
    if "dp" in context.state.config_records:
        state = str(context.state.config_records["dp"]["session"])
    path = _dp_state_file(run, site, _dp_tag(asks, context))
    if state is None and path is not None and path.is_file():
        state = path.read_text()
    secure = not is_simulation(context.node_config)  # a deployed site's noise is unseeded
    if state is not None:
        return DPSession.from_json(state, secure=secure)
    steps = run.steps_per_round(n_train)
    return DPSession(DPConfig.from_run(run), n_train, run.batch_size, steps, secure=secure)


def _save_dp(run: RunConfig, asks: ServerAsks, context: Context, site: str, session: Any) -> None:
    text = session.to_json()
    tag = _dp_tag(asks, context)
    context.state.config_records["dp"] = ConfigRecord({"session": text, "run-tag": tag})
    path = _dp_state_file(run, site, tag)
    if path is not None:
        atomic_write_text(path, text)  # a crash mid-write keeps the previous spending


# ------------------------------------------------------------------------------ handlers
@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is and how much data it holds; with
    ``class-prior = "federation"`` and no DP, also its training class counts (the server
    sums them into the prior every site's loss uses; under DP they are not covered by the
    accountant, so they are never sent)."""
    run, _ = _config(context, msg)
    data = load_site(run, context.node_config)
    info = ConfigRecord(
        {
            "site": data.site,
            "classes": json.dumps(data.classes),
            "n-train": data.n("train"),
            "n-validation": data.n("validation"),
            "n-test": data.n("test"),
        }
    )
    if run.class_prior == "federation" and not run.private:
        counts = np.bincount(data.labels["train"], minlength=len(data.classes))
        info["train-counts"] = [int(c) for c in counts]
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.query(FEATURE_STATS)
def feature_stats(msg: Message, context: Context) -> Message:
    """The received model's feature statistics on this site's training split, from which the
    server refits the classifier (``head-calibration = "lda"``, common/headfit.py). Refused
    when the site's own node config says ``head-calibration = "none"``. Under DP, released
    once per run through the Gaussian mechanism on the budget the site's accountant set
    aside for it (``dp-head-share``), recorded and saved before anything is sent."""
    from client.task import dp_seed, site_feature_stats
    from common.headfit import SENSITIVITY

    run, asks = _config(context, msg)
    if run.head_calibration == "none":
        raise SiteConfigError("site refuses to send feature statistics: head-calibration='none'")
    _refuse(require_run_dp, run, context.run_config)
    _refuse(require_state_dir, run, context.node_config)
    data = load_site(run, context.node_config)
    meta, release = ConfigRecord({"site": data.site}), None
    if run.dp:
        session = _load_dp(run, asks, context, data.site, data.n("train"))

        def release() -> tuple[float, int]:  # spent and saved before anything leaves
            try:
                noise = session.release_head()
            except ValueError as err:
                why = f"site {data.site} refuses feature statistics: {err}"
                raise SiteConfigError(why) from None
            _save_dp(run, asks, context, data.site, session)
            meta["noise-std"], meta["epsilon"] = noise * SENSITIVITY, session.epsilon()
            return noise, dp_seed(run, data.site, 0, session)

    stats = site_feature_stats(run, msg, data, release)
    return Message(RecordDict({"stats": stats, "site": meta}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.task import train_site
    from common.personal import personalize_mode

    run, asks = _config(context, msg)
    personalize_mode(run)  # refused before any DP step is taken (see common/personal.py)
    _refuse(require_run_dp, run, context.run_config)
    _refuse(require_state_dir, run, context.node_config)
    data = load_site(run, context.node_config)
    n_train = data.n("train")
    session = None
    if run.dp:
        session = _load_dp(run, asks, context, data.site, n_train)
        if not session.can_train_round():
            log.warning("site %s: privacy budget spent, not training this round", data.site)
            reply = {k: 0 for k in TRAIN_KEYS_DP} | session.metrics()
            reply["dp-budget-exhausted"] = 1
            return _train_reply(msg, msg.content.array_records["arrays"], reply, data.site)
    # context.state keeps the personal entries of personalize=fedbn|ditto; never sent
    arrays, metrics = train_site(run, msg, data, session, context.state)
    if session is not None:
        _save_dp(run, asks, context, data.site, session)
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

    run, asks = _config(context, msg)
    split = eval_split(asks.split)  # never the train split: it is what DP protects
    _refuse(require_run_dp, run, context.run_config)
    data = load_site(run, context.node_config)
    reply = evaluate_received(run, msg, data, split, context.state)
    content = RecordDict(
        {"metrics": MetricRecord(reply), "site": ConfigRecord({"site": data.site})}
    )
    return Message(content, reply_to=msg)
