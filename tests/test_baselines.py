"""Pooled and local baselines run through the same data path, training and metrics."""

from __future__ import annotations

import pandas as pd
import pytest

from server.results import FinalTest
from simulations.baselines import (
    POOLED_TEST,
    SECONDS,
    compare,
    federated_row,
    markdown_table,
    run_baselines,
)
from simulations.evaluate import evaluate_checkpoint
from simulations.runner import prepare_data, resolve_run_config

SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
EXTRA = (POOLED_TEST, SECONDS)


def test_pooled_and_local_table():
    cfg, _ = prepare_data(
        resolve_run_config(
            None,
            {"builtin-images": 600, "image-size": 16, "num-server-rounds": 2, "local-epochs": 2},
        )
    )
    table = run_baselines(cfg)
    assert list(table["method"]) == ["pooled"] + [f"local ({s})" for s in SITES]
    assert sorted(c for c in table.columns if c not in ("method", "mean", *EXTRA)) == SITES
    values = table[SITES].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    # the mean column is the mean over the sites' test splits, as FLamby reports it
    assert (abs(table[SITES].mean(axis=1) - table["mean"]) < 1e-12).all()
    # the pooled model has seen every site and learns beyond chance (1/7) on average
    assert table.loc[table["method"] == "pooled", "mean"].item() > 1 / 7
    # the pooled test column scores on every site's test images at once
    assert ((table[POOLED_TEST] >= 0) & (table[POOLED_TEST] <= 1)).all()
    assert (table[SECONDS] > 0).all()
    fed = federated_row(
        FinalTest.model_validate({"sites": {s: {"balanced_accuracy": 0.5} for s in SITES}}),
        "fedavg",
    )
    md = markdown_table(pd.concat([table, pd.DataFrame([{**fed, "mean": 0.5}])]))
    assert "| fedavg |" in md and md.count("\n") == 2 + len(SITES) + 2


def test_baseline_keeps_its_best_validation_round(monkeypatch, capsys):
    """Like the federation's best round: the model returned is the round validation liked."""
    import torch

    import simulations.baselines as baselines
    from simulations.baselines import fit_baseline, load_all_sites

    cfg, _ = prepare_data(
        resolve_run_config(
            None,
            {"builtin-images": 300, "image-size": 16, "num-server-rounds": 3, "local-steps": 2},
        )
    )
    sites = load_all_sites(cfg)
    scores, states = iter([0.5, 0.9, 0.1]), []

    def fake_score(model, *args):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(baselines, "_score", fake_score)
    model = fit_baseline(cfg, sites[:1], "local")
    assert len(states) == 3 and not torch.equal(
        states[1]["conv_stem.weight"], states[2]["conv_stem.weight"]
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[1][k]), k
    # A log file (no live progress bar) still shows each round: its score and time to go.
    out = capsys.readouterr().out
    assert "local: round 2/3, validation balanced accuracy 0.900" in out
    assert "local: round 3/3" in out and "s to go" in out


def test_baseline_head_refit_is_the_federations_and_kept_only_if_validation_improves(capsys):
    """With head-calibration = lda a baseline gets the server's refit (LDA on its own
    training features), kept only when validation improves; too few images keep the head."""
    import numpy as np
    import torch

    from common.headfit import feature_stats
    from common.models import build_model
    from server.lda import lda_head
    from simulations.baselines import load_all_sites, refit_baseline_head

    cfg, _ = prepare_data(resolve_run_config(None, {"builtin-images": 300, "image-size": 16}))
    sites = load_all_sites(cfg)
    classes = sites[0].classes
    x = np.concatenate([s.images["train"] for s in sites])
    y = np.concatenate([s.labels["train"] for s in sites])
    vx = np.concatenate([s.images["validation"] for s in sites])
    vy = np.concatenate([s.labels["validation"] for s in sites])
    torch.manual_seed(0)
    model = build_model("test_efficientnet", len(classes))
    kept = refit_baseline_head(model, (x, y), (vx, vy), -1.0, classes, "pooled")
    weight, bias = lda_head([feature_stats(model, torch.from_numpy(x), y, len(classes))])
    head = kept.get_classifier()
    assert kept is not model and np.allclose(head.weight.detach().numpy(), weight, atol=1e-5)
    assert np.allclose(head.bias.detach().numpy(), bias, rtol=1e-5)
    said = capsys.readouterr().out
    assert "pooled: head refit (LDA), validation balanced accuracy -1.000 ->" in said
    assert refit_baseline_head(model, (x, y), (vx, vy), 2.0, classes, "pooled") is model  # no gain
    assert "previous head kept" in capsys.readouterr().out
    one = refit_baseline_head(model, (x[:1], y[:1]), (vx, vy), -1.0, classes, "local a")
    assert one is model and "not possible (too few images" in capsys.readouterr().out


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_compare_finetune_reuses_the_fedavg_rounds(tmp_path):
    """finetune trains as FedAvg does: compare starts it from the FedAvg run (same rounds,
    not trained again) and only the test differs, by the sites' fine-tuning."""
    import json

    overrides = (
        "builtin-images=300 image-size=16 num-server-rounds=2 local-steps=2 finetune-steps=5"
    )
    table = compare(None, overrides, ["finetune", "fedavg"], tmp_path, local=False)
    assert list(table["method"]) == ["pooled", "fedavg", "finetune"]
    fed = json.loads((tmp_path / "fedavg" / "metrics.json").read_text())
    ft = json.loads((tmp_path / "finetune" / "metrics.json").read_text())
    assert ft["rounds"] == fed["rounds"]  # copied, seconds included: not trained again
    assert ft["test"]["best_round"] == fed["test"]["best_round"]
    fed_sites = {s: m["balanced_accuracy"] for s, m in fed["test"]["sites"].items()}
    ft_sites = {s: m["balanced_accuracy"] for s, m in ft["test"]["sites"].items()}
    assert sorted(ft_sites) == SITES and ft_sites != fed_sites  # fine-tuned at the test
    for site, figures in ft["test"]["sites"].items():  # its fine-tuned model, kept at the site
        m = evaluate_checkpoint(tmp_path / "finetune", split="test", site=site, out=tmp_path / site)
        assert m["personal"].endswith(f"{site}-personal.pt") and "note" not in m
        assert m["balanced_accuracy"] == pytest.approx(figures["balanced_accuracy"], abs=1e-3)
        assert m["auroc"] == pytest.approx(figures["auroc"], abs=1e-3)


@pytest.mark.usefixtures("shared_ray")
def test_compare_labels_the_refitted_head_and_leaves_personal_methods_without_it(tmp_path):
    """With head-calibration = lda the FedAvg row says so ("fedavg+lda") and its test used
    the refit; FedBN, scored with the sites' own normalisation layers, runs without it
    (the config refuses the pair) instead of failing the comparison."""
    import json

    overrides = (
        "builtin-images=300 image-size=16 num-server-rounds=2 local-steps=2 head-calibration='lda'"
    )
    table = compare(None, overrides, ["fedavg", "fedbn"], tmp_path, local=False)
    assert list(table["method"]) == ["pooled+lda", "fedavg+lda", "fedbn"]
    fed = json.loads((tmp_path / "fedavg" / "metrics.json").read_text())
    assert fed["test"]["head_calibration"]["sites"] == SITES
    fedbn = json.loads((tmp_path / "fedbn" / "metrics.json").read_text())
    assert fedbn["config"]["head-calibration"] == "none" and "head_calibration" not in fedbn["test"]
