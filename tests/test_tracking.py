"""MLflow tracking (``--track``): real tiny runs logged to a real SQLite MLflow store in a
temporary folder, read back with MLflow's own client: params, each metric's full history,
artifacts, parent and child runs, and a resume that continues the same MLflow run."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from typer.testing import CliRunner

from simulations.cli import app
from simulations.tracking import RECORD, tracking_uri, use_tracking

if TYPE_CHECKING:  # the optional extra (pip install -e ".[track]"): its tests skip without it
    from mlflow import MlflowClient
    from mlflow.entities import Run

TINY = (
    "model='test_efficientnet' image-size=16 num-server-rounds=1 builtin-images=300 "
    "batch-size=32 augment=false local-steps=2"
)
VAL = "validation/global/balanced_accuracy"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    """One SQLite store for the module (creating its tables takes seconds)."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


@pytest.fixture(autouse=True)
def tracking_off() -> Iterator[None]:
    """``--track`` holds for the process (as a CLI run): off again after each test."""
    yield
    use_tracking(False)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_id_of(folder: Path) -> str:
    return json.loads((folder / RECORD).read_text())["run_id"]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def children(client: MlflowClient, parent: str) -> dict[str, Run]:
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.info.run_name: r for r in runs}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


@pytest.fixture(scope="module")
def compared(store, tmp_path_factory, ray_head) -> dict:
    """One ``compare --track`` (a parent run; its federated child is a whole tracked
    ``simulate`` run of one round), then ``simulate --resume`` of that child's folder to two
    rounds (as its tests' state between the two: the child's id, params and config)."""
    uri, client = store
    out = tmp_path_factory.mktemp("compare") / "compare"
    with pytest.MonkeyPatch.context() as mp:
        if ray_head:  # the session's Ray head node (conftest.py)
            mp.setenv("RAY_ADDRESS", ray_head)
        args = ["compare", "--strategies", "fedavg", "--no-local", "--run-config", TINY]
        printed = invoke(*args, "--out", str(out), "--tracking-uri", uri)
        child = out / "fedavg"
        first = run_id_of(child)
        state = {
            "printed": printed,
            "first": first,
            "params": client.get_run(first).data.params,
            "config": tomllib.loads((child / "config.toml").read_text()),
            "history": history(client, first, VAL),
            "metrics": json.loads((child / "metrics.json").read_text()),
        }
        use_tracking(False)
        two = TINY.replace("num-server-rounds=1", "num-server-rounds=2")
        args = ["simulate", "--run-config", two, "--out", str(child), "--tracking-uri", uri]
        invoke(*args, "--resume")
        use_tracking(False)
    return {"out": out, "child": child, **state}


def test_simulate_logs_config_metrics_and_artifacts(compared, store) -> None:
    _, client = store
    first = compared["first"]
    assert f"tracked in MLflow: run {first}" in compared["printed"]
    assert compared["params"] == {k: str(v) for k, v in compared["config"].items()}
    rounds = compared["metrics"]["rounds"]
    assert compared["history"] == [
        (r["round"], r["validation"]["global"]["balanced_accuracy"]) for r in rounds
    ]
    site = sorted(rounds[0]["validation"]["sites"])[0]
    per_site = history(client, first, f"validation/sites/{site}/balanced_accuracy")
    assert per_site[0] == (1, rounds[0]["validation"]["sites"][site]["balanced_accuracy"])
    found = artifact_paths(client, first)
    for name in ("report.md", "metrics.json", "history.csv", "config.toml"):
        assert name in found, found
    assert {"plots/learning_curves.png", "plots/confusion_test.png"} <= found
    local = client.download_artifacts(first, "checkpoints/best.pt")
    best = compared["child"] / "checkpoints" / "best.pt"
    assert _sha(Path(local)) == _sha(best)  # the final best checkpoint, as on disk


def test_resume_continues_the_same_mlflow_run(compared, store) -> None:
    _, client = store
    child, first = compared["child"], compared["first"]
    assert run_id_of(child) == first
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    rounds = json.loads((child / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    want = [(r["round"], r["validation"]["global"]["balanced_accuracy"]) for r in rounds]
    assert history(client, first, VAL) == want  # round 1 once, round 2 added
    assert run.data.params["num-server-rounds"] == "1"  # MLflow's params cannot change:
    assert run.data.tags["changed.num-server-rounds"] == "2"  # the new value is a tag
    exp = run.info.experiment_id
    assert len(client.search_runs([exp], filter_string="attributes.run_name = 'fedavg'")) == 1


def test_compare_is_a_parent_with_one_child_per_row(compared, store) -> None:
    _, client = store
    out = compared["out"]
    parent = run_id_of(out)
    kids = children(client, parent)
    table = pd.read_csv(out / "comparison.csv")
    assert sorted(kids) == sorted(table["method"]) == ["fedavg", "pooled"]
    assert kids["fedavg"].info.run_id == run_id_of(compared["child"])  # the run folder's run
    pooled = table.set_index("method").loc["pooled"]
    got = kids["pooled"].data.metrics
    assert got["pooled test"] == pytest.approx(pooled["pooled test"], abs=1e-4)  # csv: 4 digits
    assert {"comparison.csv", "comparison.md"} <= artifact_paths(client, parent)
    assert client.get_run(parent).data.params["strategies"] == "fedavg"


@pytest.mark.usefixtures("shared_ray")
def test_sweep_is_a_parent_with_one_child_per_cell(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DP cell: each site's epsilon per round is its metric's history; a second sweep
    (nothing left to run) continues the same parent and adds no child, though --out is a
    relative path (the runner names the cell's folder by its absolute path)."""
    uri, client = store
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    args = ["sweep", "privacy", "--epsilons", "3", "--seeds", "0", "--out", "sweep"]
    args += ["--run-config", TINY, "--tracking-uri", uri]
    invoke(*args)
    parent = run_id_of(out)
    kids = children(client, parent)
    assert sorted(kids) == ["fedavg_eps3_seed0"]
    cell = out / "cells" / "fedavg_eps3_seed0"
    kid = kids["fedavg_eps3_seed0"].info.run_id
    assert kid == run_id_of(cell)
    rounds = json.loads((cell / "metrics.json").read_text())["rounds"]
    sites = sorted(rounds[0]["epsilon"])
    assert len(sites) >= 2
    for site in sites:
        want = [(r["round"], r["epsilon"][site]) for r in rounds]
        assert history(client, kid, f"epsilon/{site}") == want
        assert 0 < want[-1][1] <= 3.0 * (1 + 1e-6)
    assert {"sweep.csv", "sweep.md", "privacy_utility.png"} <= artifact_paths(client, parent)
    invoke(*args)  # finished: nothing runs, the parent goes on, no second child
    assert run_id_of(out) == parent and sorted(children(client, parent)) == ["fedavg_eps3_seed0"]


def test_track_without_mlflow_says_how_to_install_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: import fails
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--track", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --track needs MLflow, an optional extra: pip install -e ".[track]"'
    ]
    assert not out.exists()


def test_the_default_store_is_sqlite_in_the_runs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking_uri("sqlite:///runs/other.db") == f"sqlite:///{tmp_path / 'runs/other.db'}"
    assert tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri() == "http://tracker:5000"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
