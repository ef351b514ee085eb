"""MLflow tracking (``--track``, the run-config key ``tracking-uri``): real tiny runs logged
to a real SQLite MLflow store in a temporary folder, read back with MLflow's own client:
params, each metric's full history, artifacts, parent and child runs, a resume that continues
the same MLflow run, rounds in the store while the run goes on (the real ServerApp in
process, its sites the real ClientApp), and no site that logs."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from typer.testing import CliRunner

from client.client_app import app as client_app
from client.message import message_config
from common.config import ConfigError
from server.server_app import main as server_main
from server.tracking import INSTALL_HINT, PASSWORD_HINT, RECORD, RunTracker, resolve_uri
from simulations.cli import app
from simulations.flower_adapter import task_identity
from tests.helpers import FakeGrid

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
    rounds with the run-config key ``tracking-uri`` alone, no flag (as its tests' state
    between the two: the child's id, params and config)."""
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
        two = TINY.replace("num-server-rounds=1", "num-server-rounds=2")
        two += f" tracking-uri='{uri}'"  # the key, no --track: the same thing
        invoke("simulate", "--run-config", two, "--out", str(child), "--resume")
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


@pytest.mark.parametrize(
    "how", [["--track"], ["--run-config", "tracking-uri='sqlite:///runs/mlflow.db'"]]
)
def test_tracking_without_mlflow_says_how_to_install_before_any_work(
    how: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag and the key alike: one line, before any data is read or folder made."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: import fails
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", *how, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {INSTALL_HINT}"]
    assert 'pip install -e ".[track]"' in INSTALL_HINT
    assert sorted(tmp_path.iterdir()) == []


def test_a_password_in_the_uri_is_refused_before_any_work(tmp_path: Path) -> None:
    """The run config reaches every site: a password in the URI would too (not echoed)."""
    out = tmp_path / "run"
    uri = "http://alice:s3cret@tracker:5000"
    result = CliRunner().invoke(app, ["simulate", "--tracking-uri", uri, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {PASSWORD_HINT}"]
    assert "s3cret" not in result.output and not out.exists()


@pytest.mark.parametrize("command", [["simulate"], ["compare"], ["sweep", "privacy"]])
def test_the_help_names_the_key_and_the_extra(command: list[str]) -> None:
    """``--help`` as rich renders it (a ``[track]`` markup tag would vanish)."""
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "(fedskin keys tracking)" in result.output
    assert 'pip install -e ".[track]"' in result.output


def test_the_serverapp_without_mlflow_fails_at_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run`` with the key and no MLflow at the server: the run fails before any site
    is asked anything (the grid would record it), with the same line."""
    monkeypatch.setitem(sys.modules, "mlflow", None)
    grid = Sites({}, {})
    run = {"tracking-uri": "sqlite:///x.db", "out-dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=re.escape(INSTALL_HINT)):
        server_main(grid, server_context(run))  # type: ignore[arg-type]
    assert grid.count == 0 and not (tmp_path / "run").exists()


def test_the_default_store_is_sqlite_in_the_runs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_uri("sqlite:///runs/other.db") == f"sqlite:///{tmp_path / 'runs/other.db'}"
    assert resolve_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert resolve_uri() == "http://tracker:5000"


# ------------------------------------------------------------------ the ServerApp, live
class Killed(BaseException):
    """The server process killed mid-run (what a BaseException, not an error, stands for)."""


SITES = 3
LIVE = {
    "model": "test_efficientnet",
    "image-size": 16,
    "builtin-images": 300,
    "batch-size": 32,
    "augment": False,
    "local-steps": 1,
    "num-server-rounds": 3,
    "head-calibration": "none",
    "min-nodes": SITES,
    "wait-for-nodes": 0.0,
}


def server_context(run: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run)


class Sites(FakeGrid):
    """Each node the real ClientApp with its own context (the run config included, so each
    site sees ``tracking-uri`` too), answered in process. ``kill_at``: when the server sends
    that round's training, it is killed, after ``look()`` noted what the store held then."""

    def __init__(self, run: dict, look: dict, kill_at: int = 0) -> None:
        contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": SITES},
                state=RecordDict(),
                run_config=dict(run),
            )
            for i in range(SITES)
        }
        super().__init__(contexts)
        self.look, self.kill_at, self.seen = look, kill_at, None

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN and self.kill_at:
                if message_config(m).get("server-round") == self.kill_at:
                    self.seen = {k: f() for k, f in self.look.items()}
                    raise Killed(f"killed as round {self.kill_at} starts")
        return super().push_messages(messages)

    def answer(self, msg: Message) -> Message:
        try:
            return client_app(msg, self.nodes[msg.metadata.dst_node_id])
        except Exception as err:  # what Flower's runtime sends back for a raising app
            return Message(Error(code=0, reason=str(err)), reply_to=msg)


def test_rounds_are_in_the_store_as_they_end_and_a_killed_run_keeps_them(
    store, tmp_path: Path
) -> None:
    """The real ServerApp with the key alone (as ``flwr run`` starts it): killed as round 3
    starts, the store already holds params and rounds 1-2; the run is FAILED, then resumed
    (``resume=true``) into the same MLflow run, FINISHED with rounds 1-3 and its test results.
    The three sites also had the key: the store gained the server's one run."""
    uri, client = store
    folder = (tmp_path / "live").resolve()
    run = {**LIVE, "tracking-uri": uri, "out-dir": str(folder)}
    exp = client.get_experiment_by_name("fedskin")
    before = len(client.search_runs([exp.experiment_id])) if exp else 0
    look = {
        "history": lambda: history(client, run_id_of(folder), VAL),
        "params": lambda: client.get_run(run_id_of(folder)).data.params,
    }
    grid = Sites(run, look, kill_at=3)
    with task_identity(run_id=1), pytest.raises(Killed):
        server_main(grid, server_context(run))  # type: ignore[arg-type]
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    want = [(r["round"], r["validation"]["global"]["balanced_accuracy"]) for r in rounds]
    assert [r["round"] for r in rounds] == [1, 2]
    assert grid.seen["history"] == want  # in the store before the run ended
    assert grid.seen["params"]["tracking-uri"] == uri
    assert grid.seen["params"]["num-server-rounds"] == "3"
    first = run_id_of(folder)
    assert client.get_run(first).info.status == "FAILED"
    exp_id = client.get_experiment_by_name("fedskin").experiment_id
    assert len(client.search_runs([exp_id])) == before + 1  # the server's; no site's

    resumed = {**run, "resume": True}
    with task_identity(run_id=1):
        server_main(Sites(resumed, {}), server_context(resumed))  # type: ignore[arg-type]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert run_id_of(folder) == first and client.get_run(first).info.status == "FINISHED"
    want = [(r["round"], r["validation"]["global"]["balanced_accuracy"]) for r in metrics["rounds"]]
    assert [s for s, _ in want] == [1, 2, 3] and history(client, first, VAL) == want
    test = metrics["test"]["global"]["balanced_accuracy"]
    assert history(client, first, "test/global/balanced_accuracy") == [(3, test)]
    assert len(client.search_runs([exp_id])) == before + 1


def test_a_run_that_cannot_be_logged_is_still_ended(store, tmp_path: Path) -> None:
    """A malformed metrics.json at the end: a warning, and the MLflow run still FAILED, not
    left RUNNING as if alive."""
    uri, client = store
    tracker = RunTracker.start(uri, tmp_path / "broken", {"seed": 0})
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    tracker.finish("FAILED")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_no_site_module_imports_mlflow_or_the_server_tracking() -> None:
    """A site cannot log: nothing a site runs (client/, common/) imports MLflow or
    server/tracking.py (client/ never imports server/ at all: tests/test_layout.py)."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(import|from)\s+(mlflow|server\.tracking)\b", re.M)
    sources = [*root.glob("client/**/*.py"), *root.glob("common/**/*.py")]
    assert len(sources) > 20
    assert [p.name for p in sources if pattern.search(p.read_text())] == []
    assert pattern.search((root / "server" / "tracking.py").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
