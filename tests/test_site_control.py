"""A site keeps control of its own data and privacy budget, whatever the server sends.

The real ClientApp handlers (``client/client_app.py``) are driven with real Flower
``Message`` and ``Context`` objects, as a SuperNode would call them: a deployed site
(``--node-config`` naming its files, no ``partition-id``) on its own images and manifest.
A fresh ``Context`` stands for a restarted SuperNode (Flower keeps ``context.state`` in
memory only); tests/test_integration_dp_restart.py restarts a real ``flower-supernode``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.client_app import TRAIN_KEYS, TRAIN_KEYS_DP
from client.siteconfig import (
    SiteConfigError,
    confined,
    require_state_dir,
    run_tag,
    safe_name,
    site_config,
)
from common.config import RunConfig
from common.data.site_data import ensure_manifest
from common.models import model_for_run
from simulations.runner import default_config
from tests.helpers import assign_message_id

SITES = ["hospital-a", "hospital-b"]
RUN = {
    "model": "test_efficientnet",
    "image-size": 16,
    "batch-size": 16,
    "local-steps": 2,
    "augment": False,
    "amp": False,
    "channels-last": False,
    "loss": "ce",
    "data-format": "ham-dataverse",
    "num-server-rounds": 2,
}


@pytest.fixture(scope="module")
def sites(synth_ham_dataverse: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two hospitals' manifests over the shared synthetic HAM10000 folder."""
    from common.data.partition import partition, write_manifest
    from common.data.sources import load_source

    root = tmp_path_factory.mktemp("sites")
    source = load_source("ham-dataverse", synth_ham_dataverse)
    manifest = partition(source.meta, "iid", classes=source.classes, num_sites=2, seed=0)
    out = {}
    for name, site in zip(sorted(manifest["site"].astype(str).unique()), SITES, strict=True):
        part = manifest[manifest["site"].astype(str) == name].copy()
        part["site"] = site
        write_manifest(part, root / site / "manifest.csv")
        out[site] = {"rows": part, "data": synth_ham_dataverse, "root": root / site}
    return out


def node_config(sites: dict, site: str, state: Path | None, **extra: object) -> dict:
    """What the hospital writes in ``--node-config``."""
    s = sites[site]
    cfg = {
        "site": site,
        "data-format": "ham-dataverse",
        "data-path": str(s["data"]),
        "manifest": str(s["root"] / "manifest.csv"),
        "cache-dir": str(s["root"] / "cache"),
    }
    if state is not None:
        cfg["state-dir"] = str(state)
    return {**cfg, **extra}


def run_config(**overrides: object) -> dict:
    return {**default_config(), **RUN, **overrides}


def context(node: dict, run: dict) -> Context:
    """A SuperNode's context for one run; a new one is what a restarted SuperNode has."""
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=run)


@pytest.fixture
def task_identity():
    """Replies take their run from the process' task identity, set by Flower in a run."""
    from simulations.flower_adapter import task_identity as identity

    with identity(run_id=7, node_id=1):
        yield


def global_model(run: dict) -> ArrayRecord:
    torch.manual_seed(0)
    model = model_for_run(RunConfig.from_mapping(run), 7, pretrained=False)
    return ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})


def message(kind: str, config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    return assign_message_id(Message(content, dst_node_id=1, message_type=kind), f"m-{kind}")


def metrics_of(reply: Message) -> dict:
    return dict(reply.content.metric_records["metrics"])


# Everything a hostile server might put in its per-round config to take over a site.
HOSTILE = {
    "site": "hospital-b",
    "data-path": "/nonexistent/elsewhere",
    "manifest": "/nonexistent/manifest.csv",
    "cache-dir": "/nonexistent/cache",
    "dp": False,
    "target-epsilon": 1000.0,
    "target-delta": 0.5,
    "noise-multiplier": 0.001,
    "max-grad-norm": 1000.0,
    "dp-head-share": 0.99,
    "partition-id": 1,
    "seed": 99,
}


# ------------------------------------------------------------------ the merge, as a unit
def test_node_config_wins_and_messages_cannot_touch_site_keys(caplog, tmp_path) -> None:
    run = {"dp": False, "target-epsilon": 8.0, "lr": 0.1, "state-dir": "/srv/server-picked"}
    node = {"site": "a", "state-dir": str(tmp_path), "target-epsilon": 4.0}
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        cfg = site_config(run, node, {"state-dir": "/tmp/x", "dp": False, "lr": 0.5})
    assert cfg.state_dir == str(tmp_path.resolve())
    assert cfg.lr == 0.5  # the server's business: training hyperparameters
    assert cfg.target_epsilon == 4.0 and cfg.dp is False
    assert "ignored the server's state-dir='/tmp/x'" in caplog.text
    # The server may ask for more privacy, never less.
    assert site_config({"dp": True}, {"site": "a", "dp": False}).dp is True
    assert site_config({"dp": False}, {"site": "a", "dp": True}).dp is True
    assert site_config({"target-epsilon": 2.0}, {"target-epsilon": 4.0}).target_epsilon == 2.0
    assert site_config({"target-epsilon": 9.0}, {"target-epsilon": 4.0}).target_epsilon == 4.0


def test_node_and_message_values_are_checked_like_the_run_config() -> None:
    """A hospital's node config and the server's message are user input too: typed and
    checked by the run config's rules, refused in one line naming whose value it was."""
    from common.config import ConfigError

    bad_site = r"^the site's node config: target-epsilon='abc': must be a number$"
    with pytest.raises(ConfigError, match=bad_site):
        site_config({}, {"site": "a", "target-epsilon": "abc"})
    with pytest.raises(ConfigError, match=r"^the site's node config: dp=1: must be true or"):
        site_config({}, {"site": "a", "dp": 1})  # not silently truthy
    with pytest.raises(ConfigError, match=r"^the server's message: lr=-1\.0: must be > 0$"):
        site_config({}, {"site": "a"}, {"lr": -1.0})
    assert site_config({}, {"site": "a", "dp": "true"}).dp is True  # the CLI's spelling
    # Keys that are not the run config's (the round, the split) are the message's own.
    assert site_config({}, {"site": "a"}, {"server-round": 3, "split": "test"}).lr > 0


@pytest.mark.usefixtures("task_identity")
def test_the_messages_own_fields_are_typed() -> None:
    from client.message import ServerAsks

    asks = ServerAsks.of(message(MessageType.TRAIN, {"server-round": 3, "proximal-mu": 0}))
    assert asks.server_round == 3 and asks.proximal_mu == 0.0
    for field, value, what in (
        ("server-round", "x", "a number"),
        ("best-round", 1.5, "an integer"),
    ):
        with pytest.raises(ValueError, match=f"^the server's message: {field}=.* is not {what}$"):
            ServerAsks.of(message(MessageType.TRAIN, {field: value}))


def test_deployed_site_paths_never_come_from_the_run_config(caplog, tmp_path) -> None:
    run = {"state-dir": "/srv/server-picked", "cache-dir": "/srv/c", "data-path": "/srv/d"}
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        cfg = site_config(run, {"site": "a"})
    assert cfg.state_dir == cfg.cache_dir == cfg.data_path == ""
    assert "ignored the run config's state-dir='/srv/server-picked'" in caplog.text
    # In simulation the run config is the user's own and names every site's folders.
    sim = site_config(run, {"partition-id": 0, "num-partitions": 2})
    assert sim.state_dir == "/srv/server-picked"


def test_paths_are_confined(tmp_path) -> None:
    for bad in ("../../../tmp/x", "state/../../x"):
        with pytest.raises(SiteConfigError, match=r"^state-dir=.*must not contain '\.\.'"):
            site_config({}, {"site": "a", "state-dir": bad})
    with pytest.raises(SiteConfigError, match="cache-dir"):
        site_config({"cache-dir": "x/../../y"}, {"partition-id": 0, "num-partitions": 1})
    for tag in ("../x", "a/b", "..", "", ".hidden", "x" * 65):
        with pytest.raises(SiteConfigError, match=r"^run-tag="):
            run_tag(tag)
    assert run_tag("3f9a0c1d2e4b") == "3f9a0c1d2e4b"
    for name in ("../a", "a/b", "..", "a\\b"):
        with pytest.raises(SiteConfigError):
            safe_name(name, "site")
    assert confined(tmp_path, "a-b.json") == tmp_path.resolve() / "a-b.json"
    with pytest.raises(SiteConfigError, match="would leave"):
        confined(tmp_path, "../escape.json")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path.parent / "elsewhere.json")
    with pytest.raises(SiteConfigError, match="would leave"):
        confined(tmp_path, "link.json")  # resolved: a link pointing out is refused too


def test_derived_manifest_name_stays_in_the_cache(tmp_path, synth_ham_dataverse) -> None:
    """Run-config values are part of a derived manifest's file name: no '/' may escape."""
    cfg = {
        "data-format": "ham-dataverse",
        "data-path": str(synth_ham_dataverse),
        "cache-dir": str(tmp_path / "cache"),
        "scheme": "natural",
        "institutions": "../../../../escaped",
    }
    with pytest.raises(SiteConfigError, match="would leave the folder"):
        ensure_manifest(RunConfig.from_mapping(cfg))
    assert not list(tmp_path.parent.rglob("escaped*"))


def test_dp_needs_a_state_dir_in_deployment_only() -> None:
    with pytest.raises(SiteConfigError) as err:
        require_state_dir(
            RunConfig.from_mapping({"dp": True, "state-dir": ""}), {"site": "hospital-a"}
        )
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("hospital-a: dp=true needs state-dir")
    sim = {"partition-id": 0, "num-partitions": 4}
    require_state_dir(RunConfig.from_mapping({"dp": True}), sim)  # simulation
    require_state_dir(RunConfig.from_mapping({"dp": False}), {"site": "hospital-a"})


# ----------------------------------------------------------------- the real handlers
@pytest.mark.usefixtures("task_identity")
def test_query_reports_the_sites_own_data_whatever_the_server_sends(sites, caplog) -> None:
    node = node_config(sites, "hospital-a", None)
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        reply = client_app.query(message(MessageType.QUERY, HOSTILE), context(node, run_config()))
    info = reply.content.config_records["info"]
    rows = sites["hospital-a"]["rows"]
    assert info["site"] == "hospital-a"
    assert info["n-train"] == int((rows["split"] == "train").sum())
    for key in ("site", "data-path", "manifest", "cache-dir", "partition-id", "seed"):
        assert f"ignored the server's {key}=" in caplog.text, key


@pytest.mark.usefixtures("task_identity")
def test_server_cannot_change_dp_settings_or_state_dir(sites, tmp_path, caplog) -> None:
    """DP stays on at the site's budget, the accountant goes to the site's state-dir, and the
    reply carries no train loss or accuracy; a restarted SuperNode keeps the spent budget."""
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    node = node_config(sites, "hospital-a", state)
    run = run_config(dp=True, **{"target-epsilon": 3.0})
    arrays = global_model(run)
    sent = {**HOSTILE, "state-dir": str(elsewhere), "run-tag": "run1", "server-round": 1}
    ctx = context(node, run)
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        first = client_app.train(message(MessageType.TRAIN, sent, arrays), ctx)
    m1 = metrics_of(first)
    assert set(m1) == TRAIN_KEYS_DP, sorted(m1)
    assert "train_loss" not in m1 and "train_accuracy" not in m1
    assert 0 < m1["epsilon"] <= 3.0 and m1["dp-budget-exhausted"] == 0
    assert m1["noise_multiplier"] > 0.1  # calibrated to the site's 3.0, not the server's 0.001
    n_train = int((sites["hospital-a"]["rows"]["split"] == "train").sum())
    assert m1["delta"] == pytest.approx(1 / (10 * n_train))  # not the server's 0.5
    assert (state / "hospital-a-run1-privacy.json").is_file()
    assert not elsewhere.exists()
    for key in ("state-dir", "dp", "target-epsilon", "noise-multiplier", "dp-head-share"):
        assert f"ignored the server's {key}=" in caplog.text, key

    # Round 2 in a restarted SuperNode: a new Context, nothing in memory. The accountant
    # comes back from state-dir: epsilon continues from round 1 and the budget is spent.
    sent["server-round"] = 2
    second = client_app.train(message(MessageType.TRAIN, sent, arrays), context(node, run))
    m2 = metrics_of(second)
    assert m2["epsilon"] > m1["epsilon"] and m2["dp-budget-exhausted"] == 0
    sent["server-round"] = 3  # beyond the 2 planned rounds: over budget, after a restart too
    third = client_app.train(message(MessageType.TRAIN, sent, arrays), context(node, run))
    m3 = metrics_of(third)
    assert m3["dp-budget-exhausted"] == 1 and m3["num-examples"] == 0
    assert m3["epsilon"] == pytest.approx(m2["epsilon"])
    assert set(m3) == TRAIN_KEYS_DP  # the same keys as a round that trained


@pytest.mark.usefixtures("task_identity")
def test_one_typed_config_per_train_message(sites, tmp_path, monkeypatch) -> None:
    """Through the ClientApp's own entry (its mods included), a DP train message at a
    deployed site builds one RunConfig: run config, node config and the message's values
    merged and typed once, and the message's own fields read once. The message's proximal-mu
    is FedProx's term for this round only; its lr (a run-config key the server may set) is
    merged."""
    from client.message import ServerAsks
    from client.task import train_config

    built: list[RunConfig] = []
    parsed: list[ServerAsks] = []
    validate, read = RunConfig.model_validate.__func__, ServerAsks.of.__func__

    def counting(cls, *args, **kwargs):
        built.append(validate(cls, *args, **kwargs))
        return built[-1]

    def reading(cls, msg):
        parsed.append(read(cls, msg))
        return parsed[-1]

    node = node_config(sites, "hospital-a", tmp_path / "state")
    node["data-path"] += "/."  # as a hospital may write it: the site resolves it once
    run = run_config(dp=True, **{"target-epsilon": 3.0})
    sent = {"server-round": 1, "run-tag": "count1", "proximal-mu": 0.5, "lr": 0.01}
    msg = message(MessageType.TRAIN, sent, global_model(run))
    monkeypatch.setattr(RunConfig, "model_validate", classmethod(counting))
    monkeypatch.setattr(ServerAsks, "of", classmethod(reading))
    reply = client_app.app(msg, context(node, run))
    assert set(metrics_of(reply)) == TRAIN_KEYS_DP
    assert len(built) == 1 and len(parsed) == 1
    assert built[0].lr == 0.01 and built[0].dp is True
    assert built[0].proximal_mu == run["proximal-mu"] == 0.001  # the run's key, untouched
    assert train_config(built[0], msg).proximal_mu == 0.5  # FedProx's term, from the message


@pytest.mark.usefixtures("task_identity")
def test_without_dp_the_train_metrics_include_loss_and_accuracy(sites) -> None:
    run = run_config()
    node = node_config(sites, "hospital-b", None)
    msg = message(MessageType.TRAIN, {"server-round": 1, "run-tag": "r"}, global_model(run))
    reply = client_app.train(msg, context(node, run))
    assert set(metrics_of(reply)) == TRAIN_KEYS


@pytest.mark.usefixtures("task_identity")
def test_deployed_site_with_dp_and_no_state_dir_refuses_to_train(sites, caplog) -> None:
    run = run_config(dp=True, **{"state-dir": "/srv/server-picked"})  # not the site's choice
    node = node_config(sites, "hospital-a", None)
    msg = message(MessageType.TRAIN, {"server-round": 1, "run-tag": "r"}, global_model(run))
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        with pytest.raises(SiteConfigError, match="dp=true needs state-dir") as err:
            client_app.train(msg, context(node, run))
    assert "\n" not in str(err.value)
    assert "site refuses: hospital-a: dp=true needs state-dir" in caplog.text


@pytest.mark.usefixtures("task_identity")
def test_site_pinned_dp_refuses_a_run_without_dp(sites, tmp_path) -> None:
    run = run_config(dp=False)
    node = node_config(sites, "hospital-a", tmp_path, dp=True)
    msg = message(MessageType.TRAIN, {"server-round": 1, "run-tag": "r"}, global_model(run))
    with pytest.raises(SiteConfigError, match="configured without sample-level DP"):
        client_app.train(msg, context(node, run))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("tag", ["../../escaped", "a/b"])
def test_run_tag_cannot_write_outside_state_dir(sites, tmp_path, tag) -> None:
    state = tmp_path / "site" / "state"
    run = run_config(dp=True)
    node = node_config(sites, "hospital-a", state)
    msg = message(MessageType.TRAIN, {"server-round": 1, "run-tag": tag}, global_model(run))
    with pytest.raises(SiteConfigError, match=r"^run-tag="):
        client_app.train(msg, context(node, run))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.usefixtures("task_identity")
def test_evaluation_only_on_validation_or_test(sites, caplog) -> None:
    run = run_config()
    node = node_config(sites, "hospital-a", None)
    arrays = global_model(run)
    rows = sites["hospital-a"]["rows"]
    for split in ("validation", "test"):
        msg = message(MessageType.EVALUATE, {"split": split, "server-round": 1}, arrays)
        reply = client_app.evaluate(msg, context(node, run))
        assert metrics_of(reply)["num-examples"] == int((rows["split"] == split).sum())
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        for split in ("train", "../train", ""):
            msg = message(MessageType.EVALUATE, {"split": split, "server-round": 1}, arrays)
            with pytest.raises(SiteConfigError, match=r"^split=.*validation or test only$"):
                client_app.evaluate(msg, context(node, run))
    assert "refused the server's split='train'" in caplog.text


# ----------------------------------------------------------------------- fedskin deploy
@pytest.mark.parametrize("where", ["ca/ca.key", "sites/a/supernode.key", "sites/a"])
def test_deploy_refuses_symlinks_at_output_paths(tmp_path, where) -> None:
    from server.deploy import make_federation

    out, outside = tmp_path / "keys", tmp_path / "outside"
    outside.mkdir()
    link = out / where
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "planted")  # dangling: exists() is False, lexists() True
    with pytest.raises(ValueError, match=r"^refusing to write through a symbolic link: "):
        make_federation(out, sites=["a"], days=1)
    with pytest.raises(ValueError, match="symbolic link"):
        make_federation(out, sites=["a"], days=1, overwrite=True)
    assert not list(outside.iterdir())
    assert not [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]


def test_deploy_cli_symlink_is_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from server.deploy_cli import deploy_app

    out = tmp_path / "keys"
    (out / "superlink").mkdir(parents=True)
    (out / "superlink" / "server.key").symlink_to(tmp_path / "stolen.key")
    args = ["init", "--out", str(out), "--site", "a"]
    res = CliRunner().invoke(deploy_app, args, env={"COLUMNS": "300"})
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to write through a symbolic link" in lines[0], lines
    assert not (tmp_path / "stolen.key").exists()


def test_deploy_overwrite_replaces_files_with_fresh_0600_keys(tmp_path) -> None:
    from server.deploy import make_federation

    out = tmp_path / "keys"
    first = make_federation(out, sites=["a"], days=1)
    os.chmod(first.sites["a"].private_key, 0o644)
    old = first.sites["a"].private_key.read_bytes()
    again = make_federation(out, sites=["a"], days=1, overwrite=True)
    key = again.sites["a"].private_key
    assert key.read_bytes() != old and (key.stat().st_mode & 0o777) == 0o600
    assert not list(out.rglob(".*.tmp-*"))  # no temporary file left behind


@pytest.mark.usefixtures("task_identity")
def test_query_reports_training_class_counts_unless_the_site_withholds_them(sites) -> None:
    """class-prior = "federation": the site tells the server its training class counts;
    under DP, or when its own node config says "site", it does not, whatever the server
    sends."""
    import numpy as np

    rows = sites["hospital-a"]["rows"]
    want = np.bincount(rows.loc[rows["split"] == "train", "label"], minlength=7).tolist()
    node = node_config(sites, "hospital-a", None)

    def info(run: dict, node: dict, sent: dict | None = None) -> dict:
        msg = message(MessageType.QUERY, sent or {})
        return dict(client_app.query(msg, context(node, run)).content.config_records["info"])

    fed = {"class-prior": "federation"}
    assert info(run_config(**fed), node)["train-counts"] == want
    assert "train-counts" not in info(run_config(dp=True, **fed), node)
    assert "train-counts" not in info(run_config(), node, fed)  # the default: "site"
    withheld = {**node, "class-prior": "site"}
    assert "train-counts" not in info(run_config(**fed), withheld, fed)


@pytest.mark.usefixtures("task_identity")
def test_sites_train_with_the_federations_counts_only_when_asked(sites) -> None:
    """The counts the server sends set the loss's prior under class-prior = "federation";
    with "site" the site's own images do."""
    from client.task import train_config

    fed = RunConfig.from_mapping(run_config(**{"class-prior": "federation"}))
    own = RunConfig.from_mapping(run_config(**{"class-prior": "site"}))
    sent = message(MessageType.TRAIN, {"server-round": 1, "class-counts": [5, 1, 0, 2, 9, 80, 3]})
    assert train_config(fed, sent).class_counts == (5, 1, 0, 2, 9, 80, 3)
    assert train_config(own, sent).class_counts is None
    plain = message(MessageType.TRAIN, {"server-round": 1})
    assert train_config(fed, plain).class_counts is None
    with pytest.raises(ValueError, match="class-counts=.* is not a list of integers"):
        train_config(fed, message(MessageType.TRAIN, {"class-counts": [0.5, 2.0]}))


@pytest.mark.usefixtures("task_identity")
def test_feature_statistics_only_where_the_site_allows_them(sites) -> None:
    """head-calibration = lda: the site sends its training counts, per-class feature sums and
    second moment (common/headfit.py); never under DP, never when its own node config says
    head-calibration = 'none', whatever the run config asks."""
    run = run_config(**{"head-calibration": "lda"})
    sent = {"run-tag": "run1", "head-calibration": "lda"}
    msg = message("query.feature_stats", sent, global_model(run))
    reply = client_app.feature_stats(msg, context(node_config(sites, "hospital-a", None), run))
    stats = {k: v.numpy() for k, v in reply.content.array_records["stats"].items()}
    n_train = int((sites["hospital-a"]["rows"]["split"] == "train").sum())
    assert stats["counts"].sum() == n_train and stats["sums"].shape[0] == 7
    assert stats["moment"].shape == (stats["sums"].shape[1],) * 2
    refusing = node_config(sites, "hospital-a", None, **{"head-calibration": "none"})
    with pytest.raises(SiteConfigError, match="head-calibration='none'"):
        client_app.feature_stats(msg, context(refusing, run))
    private = node_config(sites, "hospital-a", None, dp=True)
    with pytest.raises(SiteConfigError, match="without sample-level DP"):
        client_app.feature_stats(msg, context(private, run))


@pytest.mark.usefixtures("task_identity")
def test_a_deployed_site_draws_dp_noise_the_server_cannot_replay(sites, tmp_path) -> None:
    """The run config (seed included) is the server's: a deployed site under DP draws its
    Poisson batches and noise from OS entropy, so the same round twice gives two different
    updates; a simulated site stays seeded, so a simulation is reproducible."""
    run = run_config(dp=True, **{"target-epsilon": 3.0})
    arrays = global_model(run)
    sent = {"run-tag": "run1", "server-round": 1}

    def update(node: dict) -> dict:
        reply = client_app.train(message(MessageType.TRAIN, sent, arrays), context(node, run))
        return {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}

    def differ(a: dict, b: dict) -> bool:
        return any(not np.array_equal(a[k], b[k]) for k in a)

    deployed = [node_config(sites, "hospital-a", tmp_path / f"state{i}") for i in (1, 2)]
    assert differ(update(deployed[0]), update(deployed[1]))
    simulated = node_config(sites, "hospital-a", None, **{"partition-id": 0, "num-partitions": 1})
    assert not differ(update(simulated), update(simulated))


@pytest.mark.usefixtures("task_identity")
def test_feature_statistics_under_dp_are_noised_once_on_the_budget_kept(sites, tmp_path) -> None:
    """Under sample-level DP the site sends its statistics through the Gaussian mechanism,
    in the server's projection, once per run: the release is on its accountant (saved in
    its state-dir before the reply) and within target-epsilon; a second query is refused,
    as is a DP query without a projection."""
    from common.headfit import SENSITIVITY

    run = run_config(**{"head-calibration": "lda", "dp": True, "target-epsilon": 4.0})
    node = node_config(sites, "hospital-a", tmp_path / "state", dp=True)
    sent = {"run-tag": "run1"}
    plain = message("query.feature_stats", sent, global_model(run))
    ctx = context(node, run)
    with pytest.raises(ValueError, match="needs a 'projection'"):
        client_app.feature_stats(plain, ctx)  # refused before it spends anything
    dim = model_for_run(RunConfig.from_mapping(run), 7, pretrained=False).num_features
    rng = np.random.default_rng(0)
    msg = message("query.feature_stats", sent, global_model(run))
    msg.content["projection"] = ArrayRecord(
        {"centre": Array(rng.normal(size=dim)), "projection": Array(rng.normal(size=(dim, 5)))}
    )
    reply = client_app.feature_stats(msg, ctx)
    meta = reply.content.config_records["site"]
    stats = {k: v.numpy() for k, v in reply.content.array_records["stats"].items()}
    assert stats["sums"].shape == (7, 5) and stats["moment"].shape == (5, 5)
    np.testing.assert_allclose(stats["moment"], stats["moment"].T)
    n_train = int((sites["hospital-a"]["rows"]["split"] == "train").sum())
    assert stats["counts"].sum() != n_train  # noised
    # no DP-SGD step yet: the release alone costs its share (dp-head-share 0.5 of 4)
    assert abs(meta["epsilon"] - 2.0) < 0.02 and meta["noise-std"] > SENSITIVITY
    saved = json.loads(next((tmp_path / "state").glob("hospital-a-run1-privacy.json")).read_text())
    assert saved["head_released"] is True and saved["history"] == []
    with pytest.raises(SiteConfigError, match="released once in this run already"):
        client_app.feature_stats(msg, ctx)


# --------------------------------------------- a site's privacy settings are the site's
def test_budgets_and_limits_take_the_stricter_of_site_and_run() -> None:
    """target-epsilon, target-delta, site-epsilon-limit and max-image-size: a deployed site's
    own value (its node config, else the packaged default) caps the server-written run
    config's; in a simulation the run config is the user's own and stays as it is."""
    deployed = site_config(
        {"target-epsilon": 50.0, "target-delta": 0.5, "site-epsilon-limit": 1e3}, {"site": "a"}
    )
    assert deployed.target_epsilon == 8.0 and deployed.target_delta == 0.0
    assert deployed.site_epsilon_limit == 24.0
    assert site_config({"max-image-size": 4096}, {"site": "a"}).max_image_size == 512
    assert site_config({"max-image-size": 64}, {"site": "a"}).max_image_size == 64
    node = {"site": "a", "target-delta": 1e-4, "max-image-size": 96}
    assert site_config({"target-delta": 0.5}, node).target_delta == 1e-4
    sim = site_config({"target-epsilon": 50.0}, {"partition-id": 0, "num-partitions": 2})
    assert sim.target_epsilon == 50.0


@pytest.mark.usefixtures("task_identity")
def test_a_server_sent_delta_never_loosens_the_sites(sites, tmp_path, caplog) -> None:
    """The run config (the server's) asks for target-delta = 0.5 at a site whose node config
    is silent: the site trains at its own delta, 1 / (10 n-train), with the noise calibrated
    to it; a site that names its own delta trains at that one."""
    from common.privacy import DPConfig, DPSession

    n_train = int((sites["hospital-a"]["rows"]["split"] == "train").sum())
    run = run_config(dp=True, **{"target-epsilon": 3.0, "target-delta": 0.5})
    arrays = global_model(run)
    sent = {"run-tag": "run1", "server-round": 1, "target-delta": 0.5}

    def trained(node: dict) -> dict:
        msg = message(MessageType.TRAIN, sent, arrays)
        return metrics_of(client_app.train(msg, context(node, run)))

    for own, state in ((0.0, "s0"), (1e-4, "s1")):
        extra = {"target-delta": own} if own else {}
        with caplog.at_level(logging.WARNING, logger="fedskin"):
            m = trained(node_config(sites, "hospital-a", tmp_path / state, **extra))
        delta = own or 1 / (10 * n_train)
        assert m["delta"] == pytest.approx(delta) and m["dp-budget-exhausted"] == 0
        cfg = DPConfig(target_epsilon=3.0, target_delta=delta, total_rounds=2)
        at_site = DPSession(cfg, n_train, 16, 2).noise_multiplier
        loose = DPConfig(target_epsilon=3.0, target_delta=0.5, total_rounds=2)
        at_server = DPSession(loose, n_train, 16, 2).noise_multiplier
        assert m["noise_multiplier"] == pytest.approx(at_site)
        assert m["noise_multiplier"] > at_server  # 0.5 would have added less noise
    assert "ignored the server's target-delta=0.5" in caplog.text


@pytest.mark.usefixtures("task_identity")
def test_a_delta_above_one_over_n_train_is_refused(sites, tmp_path) -> None:
    n_train = int((sites["hospital-a"]["rows"]["split"] == "train").sum())
    run = run_config(dp=True)
    msg = message(MessageType.TRAIN, {"server-round": 1, "run-tag": "r"}, global_model(run))
    node = node_config(sites, "hospital-a", tmp_path / "state", **{"target-delta": 0.2})
    with pytest.raises(SiteConfigError, match=rf"^target-delta=0.2: above 1/n-train = 1/{n_train}"):
        client_app.train(msg, context(node, run))
    simulated = {"partition-id": 0, "num-partitions": 1, **node_config(sites, "hospital-a", None)}
    with pytest.raises(SiteConfigError, match="^target-delta=0.2: ") as err:
        client_app.train(msg, context(simulated, run_config(dp=True, **{"target-delta": 0.2})))
    assert "\n" not in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.usefixtures("task_identity")
def test_a_new_run_tag_does_not_reset_the_sites_lifetime_budget(sites, tmp_path, caplog) -> None:
    """Each run has its own accountant (named by the server's run tag); the site's ledger in
    its state-dir composes all of them and no tag resets it: under a small
    site-epsilon-limit a second run is refused once it would pass the limit, after a restart
    too, whatever the run config or the message say about the limit."""
    from client.ledger import PrivacyLedger

    state = tmp_path / "state"
    node = node_config(sites, "hospital-a", state, **{"site-epsilon-limit": 3.5})
    run = run_config(dp=True, **{"target-epsilon": 3.0, "site-epsilon-limit": 1000.0})
    arrays = global_model(run)

    def train(tag: str, rnd: int, node: dict = node) -> dict:
        sent = {"run-tag": tag, "server-round": rnd, "site-epsilon-limit": 1000.0}
        msg = message(MessageType.TRAIN, sent, arrays)
        return metrics_of(client_app.train(msg, context(node, run)))

    first = [train("runA", 1), train("runA", 2)]  # the whole of run A: epsilon <= 3.0
    assert [m["dp-budget-exhausted"] for m in first] == [0, 0]
    ledger_file = state / "hospital-a-privacy-ledger.json"
    ledger = PrivacyLedger.from_json(ledger_file.read_text())
    assert [e["run-tag"] for e in ledger.entries] == ["runA", "runA"]
    assert ledger.epsilon(first[1]["delta"]) == pytest.approx(first[1]["epsilon"])
    with caplog.at_level(logging.WARNING, logger="fedskin"):
        for tag in ("runB", "runC"):  # each a fresh run, in a restarted SuperNode
            m = train(tag, 1)
            assert m["dp-budget-exhausted"] == 1 and m["num-examples"] == 0, tag
            assert m["epsilon"] == 0  # its own accountant is fresh: the ledger refuses
    assert "lifetime privacy budget spent" in caplog.text
    assert "ignored the server's site-epsilon-limit=1000.0" in caplog.text
    assert PrivacyLedger.from_json(ledger_file.read_text()).entries == ledger.entries
    assert not (state / "hospital-a-runB-privacy.json").exists()
    # The same run B at a site with a fresh ledger trains: it is the lifetime that refuses.
    fresh = node_config(sites, "hospital-a", tmp_path / "fresh", **{"site-epsilon-limit": 3.5})
    assert train("runB", 1, fresh)["dp-budget-exhausted"] == 0


@pytest.mark.usefixtures("task_identity")
def test_an_image_size_above_the_sites_maximum_is_refused(sites, caplog) -> None:
    """image-size sets the size of the cache a site decodes its images into: a server's
    value (run config or message) above the site's max-image-size is refused by name."""
    node = node_config(sites, "hospital-a", None, **{"max-image-size": 64})
    cache = Path(node["cache-dir"])
    before = sorted(cache.rglob("*")) if cache.exists() else []
    for run, sent in (
        (run_config(**{"image-size": 96}), {}),
        (run_config(), {"image-size": 96, "max-image-size": 4096}),
        (run_config(**{"image-size": 96, "max-image-size": 4096}), {}),
    ):
        with pytest.raises(SiteConfigError, match=r"^image-size=96: above this site's max-image-"):
            client_app.query(message(MessageType.QUERY, sent), context(node, run))
    default = node_config(sites, "hospital-a", None)
    with pytest.raises(SiteConfigError, match=r"^image-size=1024: .*max-image-size=512 "):
        client_app.query(
            message(MessageType.QUERY, {}), context(default, run_config(**{"image-size": 1024}))
        )
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before  # nothing built
    reply = client_app.query(
        message(MessageType.QUERY, {"image-size": 32}), context(node, run_config())
    )
    assert reply.content.config_records["info"]["site"] == "hospital-a"


@pytest.mark.usefixtures("task_identity")
def test_the_statistics_release_is_on_the_sites_lifetime_budget(sites, tmp_path) -> None:
    """Under DP the one release of the feature statistics per run is recorded in the site's
    ledger before the reply: a second run (another tag) that would pass site-epsilon-limit
    is refused, and so is a first release that alone would."""
    from client.ledger import PrivacyLedger

    run = run_config(**{"head-calibration": "lda", "dp": True, "target-epsilon": 4.0})
    dim = model_for_run(RunConfig.from_mapping(run), 7, pretrained=False).num_features
    rng = np.random.default_rng(0)
    projection = {"centre": rng.normal(size=dim), "projection": rng.normal(size=(dim, 5))}

    def release(tag: str, node: dict) -> Message:
        msg = message("query.feature_stats", {"run-tag": tag}, global_model(run))
        msg.content["projection"] = ArrayRecord({k: Array(v) for k, v in projection.items()})
        return client_app.feature_stats(msg, context(node, run))

    state = tmp_path / "state"
    node = node_config(sites, "hospital-a", state, dp=True, **{"site-epsilon-limit": 3.0})
    release("runA", node)  # its share: epsilon 2.0 of the site's 3.0
    ledger = PrivacyLedger.from_json((state / "hospital-a-privacy-ledger.json").read_text())
    assert [(e["run-tag"], e["what"]) for e in ledger.entries] == [("runA", "statistics")]
    with pytest.raises(SiteConfigError, match=r"refuses feature statistics: privacy budget spent"):
        release("runB", node)  # 2.0 + 2.0 composed: over 3.0
    assert not (state / "hospital-a-runB-privacy.json").exists()
    small = node_config(
        sites, "hospital-a", tmp_path / "s2", dp=True, **{"site-epsilon-limit": 1.5}
    )
    with pytest.raises(SiteConfigError, match="privacy budget spent"):
        release("runA", small)
    assert not list((tmp_path / "s2").glob("*.json"))


@pytest.mark.usefixtures("task_identity")
def test_ghost_clipping_is_refused_under_dp_at_a_deployed_site(sites) -> None:
    """Ghost clipping never forms per-sample gradients, so a crafted model's non-finite
    gradient of one image could not be zeroed before the clip: a real site refuses it."""
    node = node_config(sites, "hospital-a", None, dp=True)
    for run, sent in (
        (run_config(**{"grad-sample-mode": "ghost"}), {}),
        (run_config(), {"grad-sample-mode": "ghost"}),
    ):
        with pytest.raises(SiteConfigError, match=r"^grad-sample-mode='ghost': refused under DP"):
            client_app.query(message(MessageType.QUERY, sent), context(node, run))
    plain = node_config(sites, "hospital-a", None)  # without DP there is nothing to protect
    reply = client_app.query(
        message(MessageType.QUERY, {"grad-sample-mode": "ghost"}), context(plain, run_config())
    )
    assert reply.content.config_records["info"]["site"] == "hospital-a"
