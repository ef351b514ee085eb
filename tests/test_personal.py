"""Personalised FL (personalize = fedbn | finetune | ditto): what a site keeps, what it sends."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from client.message import ServerAsks
from client.personal import ditto_step, norm_keys, overwrite
from client.task import (
    PERSONAL_BEST,
    PERSONAL_META,
    evaluate_received,
    keep_personal,
    kept_personal,
    train_site,
)
from common.config import RunConfig
from common.data.schema import HAM_CLASSES
from common.data.site_data import SiteData
from common.models import build_model, get_weights
from common.personal import personalize_mode
from common.train import TrainConfig
from common.wire import layout_of, pack, unpack
from simulations.runner import resolve_run_config, simulate

SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
TINY = {
    "builtin-images": 400,
    "image-size": 16,
    "model": "test_efficientnet",
    "num-server-rounds": 2,
    "local-epochs": 1,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _site(name: str, seed: int, n: int = 24) -> SiteData:
    rng = np.random.default_rng(seed)
    images = {s: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8) for s in ("train", "test")}
    images["validation"] = images["test"]
    labels = {s: rng.integers(0, len(HAM_CLASSES), n) for s in ("train", "test")}
    labels["validation"] = labels["test"]
    return SiteData(name, HAM_CLASSES, images, labels)


def _cfg(**kw) -> RunConfig:
    return resolve_run_config(None, {"local-steps": 2, "batch-size": 8, "augment": False, **kw})


def _msg(state: dict, **config) -> SimpleNamespace:
    """What the site's model code reads of a message: its content (packed weights) and its
    config (the round: a message field, not a run-config key)."""
    config = {"server-round": 1, **config}
    return SimpleNamespace(
        content=RecordDict({"arrays": pack(state), "config": ConfigRecord(config)})
    )


# ------------------------------------------------------------------------------ FedBN
def test_norm_keys_by_module_type():
    """BatchNormAct2d (timm), its DP GroupNormAct, and LayerNorm: all direct entries."""
    bn = build_model("test_efficientnet", 7)
    keys = norm_keys(bn)
    assert keys and "bn1.running_var" in keys and "bn1.num_batches_tracked" in keys
    assert not any("conv" in k or "classifier" in k for k in keys)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert len(keys) == 5 * n_bn  # weight, bias, running_mean, running_var, counter
    gn = build_model("test_efficientnet", 7, dp=True)
    modules = {k.rsplit(".", 1)[0] for k in keys}
    assert {k.rsplit(".", 1)[0] for k in norm_keys(gn)} == modules  # same layers, as GroupNorm
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert norm_keys(ln) == ["1.weight", "1.bias"]


def test_overwrite_replaces_norm_entries_only():
    torch.manual_seed(0)
    a, b = get_weights(build_model("test_efficientnet", 7)), build_model("test_efficientnet", 7)
    kept = {k: v + 1 for k, v in get_weights(b).items() if k in set(norm_keys(b))}
    out = overwrite(a, kept)
    assert list(out) == list(a)
    for k in a:
        assert out[k] is (kept[k] if k in kept else a[k])
    with pytest.raises(ValueError, match="not in the model"):
        overwrite(a, {"nope": torch.zeros(1)})


def test_fedbn_site_keeps_its_norms_and_sends_what_fedavg_sends():
    """Two sites train the same global: each keeps its own norm entries (never in the reply),
    sends its full trained model, and scores the global with its own norms in place."""
    torch.manual_seed(0)
    cfg = _cfg(personalize="fedbn")
    glob = get_weights(build_model("test_efficientnet", 7))
    layout = layout_of(glob)
    states, sent = {}, {}
    for i, name in enumerate(("a", "b")):
        states[name] = RecordDict()
        data = _site(name, i)
        reply, metrics = train_site(cfg, _msg(glob), data, None, states[name])
        sent[name] = unpack(reply, layout)
        assert set(metrics) == set(train_site(_cfg(), _msg(glob), data, None)[1])
    keys = norm_keys(build_model("test_efficientnet", 7))
    kept = {n: kept_personal(s, None) for n, s in states.items()}
    assert all(list(k) == keys for k in kept.values())
    floats = [k for k in keys if "num_batches" not in k]
    assert any(not np.allclose(kept["a"][k], kept["b"][k]) for k in floats)
    for n in kept:  # the reply holds the trained norms too, as FedAvg's would
        assert all(np.array_equal(sent[n][k], kept[n][k]) for k in floats)
    # next round: the site's norms replace the global's, for training and for evaluation
    new = {k: (sent["a"][k] + sent["b"][k]) / 2 for k in glob}
    data = _site("a", 0)
    msg = _msg(
        {k: torch.from_numpy(np.asarray(v, dtype=glob[k].numpy().dtype)) for k, v in new.items()}
    )
    own = evaluate_received(cfg, msg, data, "validation", states["a"])
    plain = evaluate_received(_cfg(), msg, data, "validation")
    assert own != plain


# --------------------------------------------------------------------------- finetune
def test_finetune_changes_the_test_scores_only():
    torch.manual_seed(0)
    glob = get_weights(build_model("test_efficientnet", 7))
    data = _site("a", 0)
    cfg, plain = _cfg(personalize="finetune", **{"finetune-steps": 3}), _cfg()
    for split in ("validation", "test"):
        msg = _msg(glob, split=split, **{"server-round": 3})
        got, ref = (evaluate_received(c, msg, data, split, RecordDict()) for c in (cfg, plain))
        assert (got == ref) == (split == "validation"), split
    # seeded: the same fine-tuned scores twice
    msg = _msg(glob, split="test", **{"server-round": 3})
    assert evaluate_received(cfg, msg, data, "test") == evaluate_received(cfg, msg, data, "test")


def _finetuned(**keys) -> tuple[dict, dict]:
    """The received weights and those a site tests with after ``finetune_at_site``. The
    site's validation labels are the received model's own predictions: it scores 1.0 there,
    so no fine-tuning can improve on it, whatever the CPU's arithmetic."""
    from client.task import finetune_at_site
    from common.train import predict

    torch.manual_seed(0)
    model = build_model("test_efficientnet", 7)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    site = _site("a", 0)
    site.labels["validation"] = predict(model, torch.from_numpy(site.images["validation"])).argmax(
        1
    )
    run = _cfg(personalize="finetune", **{"finetune-steps": 5, **keys})
    finetune_at_site(run, model, site, 3)
    return received, model.state_dict()


def _moved(before: dict, after: dict) -> float:
    """The largest change of a weight (BatchNorm's running statistics move at any rate)."""
    weights = [k for k in before if before[k].is_floating_point() and "running" not in k]
    return max(float((after[k] - before[k]).abs().max()) for k in weights)


def test_finetune_lr_sets_the_fine_tuning_rate():
    """finetune-lr (0: the run's lr) is the rate of the site's fine-tuning steps."""
    tiny = _moved(*_finetuned(**{"finetune-lr": 1e-9}))
    usual = _moved(*_finetuned())
    assert tiny < 1e-5 < usual


def test_finetune_select_keeps_the_received_model_when_validation_does_not_improve():
    """With finetune-select a site drops a fine-tuning that does not beat the received model
    on its validation split (here none can), and keeps it without; a rate of 50 makes sure
    the weights did move."""
    received, kept = _finetuned(**{"finetune-lr": 50.0, "finetune-select": True})
    assert _moved(received, kept) == 0.0
    received, wrecked = _finetuned(**{"finetune-lr": 50.0})
    assert _moved(received, wrecked) > 1.0


def test_personalize_values_and_dp_refusal():
    assert personalize_mode(RunConfig.from_mapping({"personalize": ""})) == ""
    fedbn = RunConfig.from_mapping({"personalize": "fedbn", "dp": True})
    assert personalize_mode(fedbn) == "fedbn"
    with pytest.raises(ValueError, match="^personalize='fedbnn': must be one of '', fedbn,"):
        personalize_mode(RunConfig.from_mapping({"personalize": "fedbnn"}))
    for mode in ("ditto", "finetune"):
        with pytest.raises(ValueError, match=f"personalize={mode} is refused with sample-level"):
            personalize_mode(RunConfig.from_mapping({"personalize": mode, "dp": True}))


# ------------------------------------------------------------------------------ Ditto
def test_ditto_personal_step_is_pulled_to_the_global():
    torch.manual_seed(0)
    w = get_weights(build_model("test_efficientnet", 7))
    data = _site("a", 0, n=32)
    images, labels = torch.from_numpy(data.images["train"]), torch.from_numpy(data.labels["train"])
    cfg = TrainConfig(local_steps=20, batch_size=8, augment=False, lr=0.01)
    names = [n for n, _ in build_model("test_efficientnet", 7).named_parameters()]
    anchor = {n: w[n] for n in names}

    def distance(lam: float) -> float:
        v = build_model("test_efficientnet", 7)
        v.load_state_dict(w)
        ditto_step(v, anchor, lam, images, labels, cfg, num_classes=7, seed=1)
        sd = v.state_dict()
        return float(sum((sd[n] - w[n]).pow(2).sum() for n in names).sqrt())

    free, pulled = distance(0.0), distance(1e4)
    assert pulled < 0.1 * free, (pulled, free)  # about 0.04 with these settings
    # the hooks are gone afterwards: a later plain step is not pulled
    assert distance(0.0) == pytest.approx(free)


def test_personal_snapshot_follows_the_best_round():
    """Test-time scores use the entries a site held at the server's best round."""
    state = RecordDict()

    def entries(x: float) -> dict:
        return {"w": np.full(2, x, np.float32)}

    def at(best: int | None) -> float | None:
        got = kept_personal(state, best)
        return float(got["w"][0]) if got else None

    keep_personal(state, entries(2), ServerAsks(server_round=2, best_round=1))  # not trained in 1
    assert at(None) == 2 and at(1) is None and at(2) == 2
    keep_personal(state, entries(4), ServerAsks(server_round=4, best_round=2))  # best: from r2
    assert at(2) == 2 and at(3) == 2 and at(4) == 4 and at(5) == 4
    keep_personal(state, entries(5), ServerAsks(server_round=5, best_round=3))  # best still 3
    assert at(3) == 2 and at(5) == 5
    meta = dict(state.config_records[PERSONAL_META])
    assert meta == {"since": 5, "best-from": 2, "best-until": 4}
    assert PERSONAL_BEST in state.array_records


# ---------------------------------------------------------------- real simulations
def _record(run_dir: Path, site: str, r: int) -> tuple[dict, dict, dict]:
    stem = run_dir / "site-state" / "record" / f"{site}-r{r}"
    meta = json.loads(Path(f"{stem}.json").read_text())
    sent = dict(np.load(f"{stem}-sent.npz"))
    kept = dict(np.load(f"{stem}-kept.npz")) if Path(f"{stem}-kept.npz").is_file() else {}
    return meta, sent, kept


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_fedbn_run_keeps_norms_at_sites_and_averages_what_was_sent(tmp_path):
    from tests.helpers import check_network_json

    out = tmp_path / "fedbn"
    metrics = simulate(
        None, {**TINY, "personalize": "fedbn"}, out=out, client_app="tests.personal_client:app"
    )
    assert sorted(metrics["test"]["sites"]) == SITES
    check_network_json(out)
    records = {s: _record(out, s, 2) for s in SITES}
    keys = norm_keys(build_model("test_efficientnet", 7))
    for meta, _, kept in records.values():
        assert meta["had-state"] and list(kept) == keys  # kept across rounds: norms only
    w = keys[1]  # a norm layer's bias
    assert len({records[s][2][w].tobytes() for s in SITES}) == len(SITES)
    # the server's global is the plain FedAvg of what the sites sent (the packed floats)
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["arrays"]
    n = np.array([records[s][0]["num-examples"] for s in SITES], np.float64)
    sent = np.stack([records[s][1]["packed/<f4"] for s in SITES]).astype(np.float64)
    mean = (n[:, None] * sent).sum(0) / n.sum()
    np.testing.assert_allclose(pack(final)["packed/<f4"].numpy(), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_ditto_run_scores_every_site_and_sends_no_personal_state(tmp_path):
    from tests.helpers import check_network_json

    out = tmp_path / "ditto"
    metrics = simulate(
        None, {**TINY, "personalize": "ditto"}, out=out, client_app="tests.personal_client:app"
    )
    assert sorted(metrics["test"]["sites"]) == SITES
    assert all(sorted(r["validation"]["sites"]) == SITES for r in metrics["rounds"])
    check_network_json(out)
    for site in SITES:
        meta, sent, kept = _record(out, site, 2)
        assert meta["had-state"] and meta["meta"]["since"] == 2
        # the personal model is a whole model, and not the one that was sent
        assert list(kept) == list(build_model("test_efficientnet", 7).state_dict())
        assert not np.array_equal(pack(kept)["packed/<f4"].numpy(), sent["packed/<f4"])


def test_compare_runs_personalised_methods_as_fedavg_rows(tmp_path, monkeypatch):
    """compare: fedbn/finetune/ditto are FedAvg with personalize=<method>, one row each."""
    import pandas as pd

    import simulations.baselines as baselines
    import simulations.runner as runner

    calls = []

    def fake_simulate(config, run, out, force_resume=False):
        calls.append((run["strategy"], run.get("personalize", ""), Path(out).name))
        return {"test": {"sites": {s: {"balanced_accuracy": 0.5} for s in SITES}}}

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    monkeypatch.setattr(baselines, "run_baselines", lambda cfg, local: pd.DataFrame())
    overrides = "builtin-images=400 image-size=16"
    table = baselines.compare(None, overrides, ["fedavg", "fedbn", "ditto", "fedbn"], tmp_path)
    assert calls == [
        ("fedavg", "", "fedavg"),
        ("fedavg", "fedbn", "fedbn"),
        ("fedavg", "ditto", "ditto"),
    ]
    assert list(table["method"]) == ["fedavg", "fedbn", "ditto"]
