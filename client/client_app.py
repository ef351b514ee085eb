"""fedskin ClientApp: one per hospital site, on Flower's Message API.

The same app runs in simulation (the partition id picks a site of the manifest) and in a real
deployment (the SuperNode's ``--node-config`` names the site and its local files). Images
never leave the site: replies carry model weights and aggregate metrics only. The model work
is in :mod:`client.task`, imported only by the handlers that need it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
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

from client.message import ServerAsks, run_values
from client.secagg import answer as secure_answer
from client.secagg import refuse_plaintext, stage_of
from client.siteconfig import (
    SiteConfigError,
    SiteSettings,
    confined,
    eval_split,
    is_simulation,
    require_run_dp,
    require_state_dir,
    run_tag,
    safe_name,
    site_delta,
    site_node,
    site_settings,
)
from common.config import RunConfig, value_of
from common.data.site_data import load_site
from common.protocol import FEATURE_STATS, TRAIN_KEYS, TRAIN_KEYS_DP
from common.rundir import atomic_write_text
from common.version import version

log = logging.getLogger("fedskin")


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Site-level DP with clipping at the site: Flower's clipping mod, when the run asks.

    ``central-dp = client-fixed | client-adaptive`` makes the server wrap its strategy in
    Flower's client-side DP wrapper, which relies on every site clipping its own update
    before it leaves; any other setting passes messages through untouched.
    """
    kind = value_of(context.run_config, "central-dp")  # one key: the site's settings come later
    if msg.metadata.message_type != MessageType.TRAIN or not kind.startswith("client-"):
        return call_next(msg, context)
    mod = fixedclipping_mod if kind == "client-fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[central_dp_mod])


def _config(context: Context, msg: Message | None = None) -> tuple[SiteSettings, ServerAsks]:
    """Run config, the site's node config on top, then the server's per-round config, which
    may not touch the site's own keys (data, privacy budget, state, identity: see
    :mod:`client.siteconfig`): merged and typed once per message, here, with the message's
    own fields (the round, FedProx's mu) apart."""
    settings = site_settings(context.run_config, context.node_config, run_values(msg))
    return settings, ServerAsks.of(msg)


def _data(run: RunConfig, context: Context) -> Any:
    """The site's data, for the merged settings (the node config's data keys are in them)."""
    return load_site(run, site_node(context.node_config))


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


def _load_dp(settings: SiteSettings, asks: ServerAsks, context: Context, site: str, n_train: int):
    """The site's accountant lives across rounds: client state, or a file at the site."""
    from common.privacy import DPConfig, DPSession

    run, state = settings.run, None
    if "dp" in context.state.config_records:
        state = str(context.state.config_records["dp"]["session"])
    path = _dp_state_file(run, site, _dp_tag(asks, context))
    if state is None and path is not None and path.is_file():
        state = path.read_text()
    secure = not is_simulation(context.node_config)  # a deployed site's noise is unseeded
    if state is not None:
        return DPSession.from_json(state, secure=secure)
    steps = run.steps_per_round(n_train)
    # The smaller of the site's delta and the run's; a site's own above 1/n-train: refused.
    delta = _refuse(site_delta, settings, n_train)
    cfg = replace(DPConfig.from_run(run), target_delta=delta)
    return DPSession(cfg, n_train, run.batch_size, steps, secure=secure)


def _save_dp(run: RunConfig, asks: ServerAsks, context: Context, site: str, session: Any) -> None:
    text = session.to_json()
    tag = _dp_tag(asks, context)
    context.state.config_records["dp"] = ConfigRecord({"session": text, "run-tag": tag})
    path = _dp_state_file(run, site, tag)
    if path is not None:
        atomic_write_text(path, text)  # a crash mid-write keeps the previous spending


# ------------------------------------------------------------------- lifetime ledger
# A deployed site's privacy spent over all its runs (client/ledger.py: PrivacyLedger), in
# <state-dir>/<site>-privacy-ledger.json: named by nothing the server sends (the site's name
# is its node config's), so no run tag starts it afresh. Locked from the check to the write,
# so two runs at once cannot both spend the last of it; written before the reply leaves.
def _ledger_file(run: RunConfig, site: str, context: Context) -> Path | None:
    if is_simulation(context.node_config) or not run.state_dir:
        return None  # a simulation's sites are the user's own partitions: per-run budgets
    return confined(run.state_dir, f"{safe_name(site, 'site')}-privacy-ledger.json")


@contextmanager
def _lifetime(run: RunConfig, site: str, context: Context) -> Iterator[Any]:
    """The site's ledger, held locked while this message may spend from it (None: none)."""
    from client.ledger import PrivacyLedger  # lazily: it imports Opacus (heavy)

    path = _ledger_file(run, site, context)
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # the folder: no lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text() if path.is_file() else None
            ledger = PrivacyLedger() if text is None else PrivacyLedger.from_json(text)
        except ValueError as err:
            raise SiteConfigError(f"site {site}: {path}: {err}; refusing DP work") from None
        yield ledger
    finally:
        os.close(lock)  # releases the lock


def _lifetime_allows(ledger: Any, run: RunConfig, site: str, session: Any, spend: list) -> bool:
    """Whether ``spend`` keeps the site's lifetime epsilon within ``site-epsilon-limit``
    (at the run's delta, which is at most the site's own); logs one line when not."""
    if ledger is None:
        return True
    ok, after = ledger.allows(spend, session.delta, run.site_epsilon_limit)
    if not ok:
        log.warning(
            "site %s: lifetime privacy budget spent (epsilon %.3f over all runs > "
            "site-epsilon-limit=%g), refusing",
            site,
            after,
            run.site_epsilon_limit,
        )
    return ok


def _record(
    ledger: Any,
    run: RunConfig,
    site: str,
    asks: ServerAsks,
    context: Context,
    spent: list,
    what: str,
) -> None:
    if ledger is None or not spent:
        return
    ledger.record(spent, _dp_tag(asks, context), what)
    path = _ledger_file(run, site, context)
    atomic_write_text(path, ledger.to_json())  # before the run's own file: never under-counted


# ------------------------------------------------------------------------------ handlers
@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is, the fedskin it runs (also logged: the
    first message of a run) and how much data it holds; with
    ``class-prior = "federation"`` and no DP, also its training class counts (the server
    sums them into the prior every site's loss uses; under DP they are not covered by the
    accountant, so they are never sent)."""
    settings, _ = _config(context, msg)
    run = settings.run
    data = _data(run, context)
    # At a hospital the line goes to the SuperNode's console (Flower's logger); in a
    # simulation every site runs the server's code, and fedskin's logger keeps it quiet.
    say = log.info if is_simulation(context.node_config) else logging.getLogger("flwr").info
    say("site %s: fedskin %s", data.site, version())
    info = ConfigRecord(
        {
            "site": data.site,
            "classes": json.dumps(data.classes),
            "n-train": data.n("train"),
            "n-validation": data.n("validation"),
            "n-test": data.n("test"),
            "version": version(),
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
    aside for it (``dp-head-share``), recorded and saved before anything is sent. Under
    SecAgg+ the stages go to client/secagg.py, which masks what :func:`plain_feature_stats`
    computes at its collect stage."""
    return _secure_or_plain(msg, context, "feature-statistics", plain_feature_stats)


def plain_feature_stats(msg: Message, context: Context) -> Message:
    from client.task import dp_seed, site_feature_stats
    from common.headfit import SENSITIVITY

    settings, asks = _config(context, msg)
    run = settings.run
    if run.head_calibration == "none":
        raise SiteConfigError("site refuses to send feature statistics: head-calibration='none'")
    _refuse(require_run_dp, settings)
    _refuse(require_state_dir, run, context.node_config)
    data = _data(run, context)
    meta, release = ConfigRecord({"site": data.site}), None
    with _lifetime(run, data.site, context) if run.dp else nullcontext() as ledger:
        if run.dp:
            session = _load_dp(settings, asks, context, data.site, data.n("train"))

            def release() -> tuple[float, int]:  # spent and saved before anything leaves
                spend = session.head_release()
                if not _lifetime_allows(ledger, run, data.site, session, spend):
                    why = f"site {data.site} refuses feature statistics: privacy budget spent"
                    raise SiteConfigError(f"{why} (site-epsilon-limit={run.site_epsilon_limit:g})")
                try:
                    noise = session.release_head()
                except ValueError as err:
                    why = f"site {data.site} refuses feature statistics: {err}"
                    raise SiteConfigError(why) from None
                _record(ledger, run, data.site, asks, context, spend, "statistics")
                _save_dp(run, asks, context, data.site, session)
                meta["noise-std"], meta["epsilon"] = noise * SENSITIVITY, session.epsilon()
                return noise, dp_seed(run, data.site, 0, session)

        stats = site_feature_stats(run, msg, data, release)
    return Message(RecordDict({"stats": stats, "site": meta}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training request; SecAgg+ stages go to client/secagg.py, which trains through
    :func:`plain_train` at its collect stage."""
    return _secure_or_plain(msg, context, "train", plain_train)


def _secure_or_plain(
    msg: Message, context: Context, what: str, plain: ClientAppCallable
) -> Message:
    """A SecAgg+ stage to client/secagg.py (which calls ``plain`` at its collect stage); a
    plaintext ``what`` request to ``plain``, unless the site requires SecAgg+."""
    if stage := stage_of(msg):
        return secure_answer(msg, context, stage, plain)
    refuse_plaintext(context, what)
    return plain(msg, context)


def plain_train(msg: Message, context: Context) -> Message:
    from client.task import train_site
    from common.personal import personalize_mode

    settings, asks = _config(context, msg)
    run = settings.run
    personalize_mode(run)  # refused before any DP step is taken (see common/personal.py)
    _refuse(require_run_dp, settings)
    _refuse(require_state_dir, run, context.node_config)
    data = _data(run, context)
    n_train = data.n("train")
    if not run.dp:
        # context.state keeps the personal entries of personalize=fedbn|ditto; never sent
        arrays, metrics = train_site(run, msg, data, None, context.state, asks)
        metrics["num-examples"] = n_train
        return _train_reply(msg, arrays, metrics, data.site)
    with _lifetime(run, data.site, context) as ledger:
        session = _load_dp(settings, asks, context, data.site, n_train)
        if not session.can_train_round():
            log.warning("site %s: privacy budget spent, not training this round", data.site)
            return _exhausted(msg, session, data.site)
        if not _lifetime_allows(ledger, run, data.site, session, session.next_round()):
            return _exhausted(msg, session, data.site)
        before = len(session.accountant.history)
        arrays, metrics = train_site(run, msg, data, session, context.state, asks)
        spent = session.accountant.history[before:]
        _record(ledger, run, data.site, asks, context, spent, "train")
        _save_dp(run, asks, context, data.site, session)
    metrics["dp-budget-exhausted"] = 0
    for key in NOT_UNDER_DP:  # computed on private batches without noise: never sent
        metrics.pop(key, None)
    metrics["num-examples"] = n_train
    return _train_reply(msg, arrays, metrics, data.site)


def _exhausted(msg: Message, session: Any, site: str) -> Message:
    """The reply of a site that does not train: its budget is spent (the received weights
    back, no examples, the accountant's metrics and ``dp-budget-exhausted = 1``)."""
    reply = {k: 0 for k in TRAIN_KEYS_DP} | session.metrics()
    reply["dp-budget-exhausted"] = 1
    return _train_reply(msg, msg.content.array_records["arrays"], reply, site)


def _refuse(check: Any, *args: Any) -> Any:
    """Run a site check; a refusal is one line in the site's log, then the error reply."""
    try:
        return check(*args)
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
    with ``personalize``, the site's personalised model (see :mod:`client.personal`)."""
    from client.task import evaluate_received

    settings, asks = _config(context, msg)
    run = settings.run
    split = eval_split(asks.split)  # never the train split: it is what DP protects
    _refuse(require_run_dp, settings)
    data = _data(run, context)
    reply = evaluate_received(run, msg, data, split, context.state, asks)
    content = RecordDict(
        {"metrics": MetricRecord(reply), "site": ConfigRecord({"site": data.site})}
    )
    return Message(content, reply_to=msg)
