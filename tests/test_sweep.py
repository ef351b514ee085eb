"""Privacy sweep: grid parsing, results table/plot from metrics.json files, resume, and one
real tiny sweep through the Simulation Engine (3 ``simulate`` calls in all: two cells, then
the grid grows by one cell, which alone runs)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from common.data.schema import DataError
from server.results import RunResults
from simulations.sweep import (
    LEVELS,
    cell_name,
    cell_overrides,
    cell_row,
    collect,
    is_finished,
    parse_epsilons,
    parse_list,
    sweep_cli,
    sweep_privacy,
    write_outputs,
)

SITES = ["alpha", "beta"]


def fake_metrics(strategy: str, eps: float | None, seed: int, bacc: float) -> dict:
    """A metrics.json as the runner writes it (only the fields the sweep reads)."""
    dp = eps is not None
    cfg = {"strategy": strategy, "seed": seed, "dp": dp, "target-epsilon": eps or 8.0}
    rounds = []
    for r in (1, 2):
        train = {s: {"train_loss": 1.0} for s in SITES}
        epsilon = {}
        if dp:
            for i, s in enumerate(SITES):
                epsilon[s] = eps * r / 2 * (0.9 + 0.05 * i)
                train[s].update(epsilon=epsilon[s], delta=1e-3 * (i + 1), noise_multiplier=1 + i)
        rounds.append(
            {"round": r, "train": train, "epsilon": epsilon, "rejected": {}, "seconds": 1.5}
        )
    sites = {s: {"balanced_accuracy": bacc + 0.01 * i} for i, s in enumerate(SITES)}
    test = {
        "global": {"balanced_accuracy": bacc, "accuracy": 0.7, "auroc": 0.8},
        "sites": sites,
        "mean_site_balanced_accuracy": bacc + 0.005,
    }
    return {"config": cfg, "rounds": rounds, "best_round": 2, "test": test}


def fake_sweep(out: Path, epsilons, strategies, seeds) -> list[tuple[str, Path]]:
    cells = []
    for s in strategies:
        for e in epsilons:
            for k in seeds:
                bacc = 0.3 + 0.1 * math.log10(e if e else 100) + 0.01 * k
                run_dir = out / "cells" / cell_name(s, e, k)
                run_dir.mkdir(parents=True)
                (run_dir / "metrics.json").write_text(json.dumps(fake_metrics(s, e, k, bacc)))
                cells.append((cell_name(s, e, k), run_dir))
    return cells


def test_parse_grid() -> None:
    assert parse_epsilons("1, 3,8,inf,none") == [1.0, 3.0, 8.0, None, None]
    for bad in ("0", "-1", "abc", " , "):
        with pytest.raises(DataError, match="epsilons"):
            parse_epsilons(bad)
    assert parse_list("0,1", "seeds", int) == [0, 1]
    with pytest.raises(DataError, match="seeds"):
        parse_list("0,x", "seeds", int)
    assert cell_name("fedavg", 3.0, 1) == "fedavg_eps3_seed1"
    assert cell_name("fedprox", None, 0) == "fedprox_nodp_seed0"
    over = cell_overrides({"model": "m"}, "fedprox", 0.5, 2)
    assert over == {
        "model": "m",
        "strategy": "fedprox",
        "seed": 2,
        "dp": True,
        "target-epsilon": 0.5,
        "noise-multiplier": 0.0,
        "run-name": "fedprox_eps0.5_seed2",
    }
    # A config that refits the head (the real-image recipe) sweeps with the refit at every
    # sample-level point (from noised statistics under DP); site-level DP refuses it by name.
    from simulations.runner import resolve_config

    cell = resolve_config("ham_natural_cpu", cell_overrides({}, "fedavg", 8.0, 0))
    assert cell["dp"] is True and cell["head-calibration"] == "lda"
    with pytest.raises(DataError, match="not covered by site-level DP"):
        resolve_config("ham_natural_cpu", cell_overrides({}, "fedavg", 8.0, 0, "site"))
    assert cell_overrides({}, "fedavg", None, 0)["dp"] is False
    site = cell_overrides({"central-dp": "server-fixed"}, "fedavg", 8.0, 0, "site")
    assert site["dp"] is False and site["central-epsilon"] == 8.0
    assert site["central-dp"] == "server-fixed" and site["run-name"] == "fedavg_site-eps8_seed0"
    assert cell_overrides({}, "fedavg", 8.0, 0, "site")["central-dp"] == "client-fixed"
    assert cell_overrides({"central-dp": "client-fixed"}, "fedavg", None, 0)["central-dp"] == ""


def test_table_csv_and_plot_from_metrics(tmp_path: Path) -> None:
    cells = fake_sweep(tmp_path, [1.0, 8.0, None], ["fedavg", "fedprox"], [0, 1])
    unfinished = tmp_path / "cells" / "fedavg_eps3_seed0"  # interrupted: no test results
    unfinished.mkdir()
    (unfinished / "metrics.json").write_text(json.dumps({"rounds": []}))
    df = collect([*cells, ("fedavg_eps3_seed0", unfinished)], audit=False)
    assert len(df) == 12 and not is_finished(unfinished)
    table = write_outputs(df, tmp_path)

    csv = pd.read_csv(tmp_path / "sweep.csv")
    for col in (
        "strategy",
        "seed",
        "target_epsilon",
        "epsilon_max",
        "epsilon[alpha]",
        "epsilon[beta]",
        "delta_max",
        "noise_multiplier_min",
        "test_balanced_accuracy",
        "test_mean_site_balanced_accuracy",
        "test_auroc",
        "bacc[alpha]",
        "bacc[beta]",
    ):
        assert col in csv.columns, col
    row = csv[(csv.cell == "fedavg_eps8_seed1")].iloc[0]
    assert row.epsilon_max == pytest.approx(8 * 0.95) and row["epsilon[alpha]"] == pytest.approx(
        7.2
    )
    assert row.delta_max == pytest.approx(2e-3) and row.noise_multiplier_min == 1
    nodp = csv[csv.cell == "fedprox_nodp_seed0"].iloc[0]
    assert math.isinf(nodp.target_epsilon) and not nodp.dp and math.isinf(nodp.epsilon_max)

    lines = table.splitlines()
    assert len(lines) == 2 + 6  # header, rule, 2 strategies x 3 epsilons
    assert (tmp_path / "sweep.md").read_text().count("\n|") == 8
    fedavg1 = next(line for line in lines if line.startswith("| fedavg | sample | 1 |"))
    # bacc 0.30 and 0.31 over the two seeds -> mean 0.305, sd 0.007
    assert "0.305 ± 0.007" in fedavg1 and "| 2 |" in fedavg1
    assert any(line.startswith("| fedprox | - | no DP | 2 | ∞ |") for line in lines)
    assert (tmp_path / "privacy_utility.png").stat().st_size > 10_000


def test_a_cell_whose_metrics_json_is_malformed_is_not_finished(tmp_path: Path) -> None:
    """A metrics.json the typed reader refuses (server/results.py) is not a finished cell:
    the sweep leaves it out of the table and runs it again, instead of failing the table."""
    cells = fake_sweep(tmp_path, [None], ["fedavg"], [0])
    bad = tmp_path / "cells" / "fedavg_eps3_seed0"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps({"rounds": [], "test": "all good"}))
    assert not is_finished(bad) and is_finished(cells[0][1])
    assert list(collect([*cells, ("fedavg_eps3_seed0", bad)], audit=False)["cell"]) == [
        "fedavg_nodp_seed0"
    ]


def test_finished_cells_are_not_rerun(tmp_path: Path) -> None:
    """A complete grid re-run only re-collects: no simulate call (it would start Ray)."""
    cells = fake_sweep(tmp_path, [2.0, None], ["fedavg"], [0])
    before = {name: (d / "metrics.json").stat().st_mtime_ns for name, d in cells}
    df = sweep_privacy(None, [2.0, None], ["fedavg"], [0], tmp_path)
    assert list(df.cell) == ["fedavg_eps2_seed0", "fedavg_nodp_seed0"]
    assert {n: (d / "metrics.json").stat().st_mtime_ns for n, d in cells} == before
    assert (tmp_path / "sweep.csv").is_file()


def test_bad_sweep_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown strategies"):
        sweep_privacy(None, [1.0], ["fedsgd"], [0], tmp_path)
    with pytest.raises(DataError, match="varies"):
        sweep_privacy(None, [1.0], ["fedavg"], [0], tmp_path, overrides="seed=3")
    with pytest.raises(DataError, match="no-such-key=1: unknown key"):
        sweep_privacy(None, [1.0], ["fedavg"], [0], tmp_path, overrides="no-such-key=1")


TINY = (
    "model='test_efficientnet' image-size=16 num-server-rounds=1 local-epochs=1 "
    "builtin-images=300 batch-size=32 augment=false"
)


@pytest.mark.usefixtures("shared_ray")  # a run on the session's Ray head (conftest.py)
def test_tiny_sweep_end_to_end(tmp_path: Path) -> None:
    """Real runs: DP at epsilon 3 and no DP, with the audit; then the same sweep with the
    site level too: the finished cells are kept, only the missing one runs."""
    torch.set_num_threads(1)
    app = typer.Typer()
    app.command()(sweep_cli)
    out = tmp_path / "sweep"
    args = [
        "--epsilons",
        "3,inf",
        "--strategies",
        "fedavg",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--run-config",
        TINY,
        "--audit",
        "--levels",
        "sample",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "fedavg" in result.output and "no DP" in result.output

    df = pd.read_csv(out / "sweep.csv")
    assert list(df.cell) == ["fedavg_eps3_seed0", "fedavg_nodp_seed0"]
    dp_row, nodp_row = df.iloc[0], df.iloc[1]
    site_eps = [c for c in df.columns if c.startswith("epsilon[")]
    assert len(site_eps) >= 2
    assert 0 < dp_row.epsilon_max <= 3.0 * (1 + 1e-6)
    assert all(0 < dp_row[c] <= 3.0 * (1 + 1e-6) for c in site_eps)
    assert 0 < dp_row.delta_max < 0.1 and dp_row.noise_multiplier_min > 0
    assert not nodp_row.dp and math.isinf(nodp_row.epsilon_max)
    for row in (dp_row, nodp_row):
        assert 0 <= row.test_balanced_accuracy <= 1 and 0 <= row.mia_auc_max <= 1
    assert any(c.startswith("mia_auc[") for c in df.columns)
    assert np.allclose(df.chance, 1 / 7, rtol=1e-5)  # the plot's floor: 7 HAM classes
    assert (out / "privacy_utility.png").is_file() and (out / "sweep.md").is_file()
    assert (out / "cells" / "fedavg_eps3_seed0" / "audit.png").is_file()

    # The grid grows by the site level (as after an interrupted sweep, a cell is missing):
    # the finished cells are not run again, only the missing one runs.
    kept = [out / "cells" / c / "metrics.json" for c in ("fedavg_eps3_seed0", "fedavg_nodp_seed0")]
    kept_mtimes = [k.stat().st_mtime_ns for k in kept]
    t_rerun = time.time_ns()
    df2 = sweep_privacy(
        None, [3.0, None], ["fedavg"], [0], out, overrides=TINY, audit=True, levels=LEVELS
    )
    assert [k.stat().st_mtime_ns for k in kept] == kept_mtimes
    redone = out / "cells" / "fedavg_site-eps3_seed0" / "metrics.json"
    assert redone.stat().st_mtime_ns >= t_rerun
    assert (out / "cells" / "fedavg_site-eps3_seed0" / "audit.json").is_file()
    df = pd.read_csv(out / "sweep.csv")
    assert list(df.cell) == list(df2.cell)
    assert list(df.cell) == ["fedavg_eps3_seed0", "fedavg_nodp_seed0", "fedavg_site-eps3_seed0"]
    site_row = df.iloc[2]
    # Site level: one federation-wide epsilon from Flower's accountant, spent to the target.
    assert site_row.level == "site" and site_row.dp
    assert 3.0 * 0.99 <= site_row.epsilon_max <= 3.0 * (1 + 1e-6)
    assert site_row.delta_max == 1e-3 and site_row.noise_multiplier_min > 0
    assert "| fedavg | site | 3 | 1 |" in (out / "sweep.md").read_text()


def test_the_head_refits_release_ends_each_sites_epsilon() -> None:
    """Under DP with head-calibration = lda the sites release noised statistics after the
    last round: their epsilon then (metrics' head_calibration) is the run's total."""
    metrics = fake_metrics("fedavg", 8.0, 0, 0.3)
    last = metrics["rounds"][-1]["epsilon"]
    metrics["test"]["head_calibration"] = {"epsilon": {s: 7.99 for s in SITES}}
    row = cell_row(RunResults.from_json(metrics))
    assert max(last.values()) < 7.99 and row["epsilon_max"] == 7.99
    assert all(row[f"epsilon[{s}]"] == 7.99 for s in SITES)
