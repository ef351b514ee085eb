"""The Flower internals simulations/flower_adapter.py uses still exist, as pinned.

This is the test that fails on a Flower upgrade: it names what changed (a module, a name, a
parameter, a field) instead of letting a simulation fail deep inside Flower.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import tomllib
from pathlib import Path

import flwr
import pytest
from packaging.requirements import Requirement

from simulations import flower_adapter as adapter

ROOT = Path(__file__).resolve().parents[1]


def _flwr_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    (flwr_req,) = [r for r in reqs if r.name == "flwr"]
    return flwr_req


def test_installed_flower_is_the_pinned_version():
    req = _flwr_requirement()
    assert req.specifier, "pyproject.toml must pin flwr: the adapter uses its internals"
    assert req.specifier.contains(flwr.__version__), (
        f"flwr {flwr.__version__} is installed but pyproject.toml pins {req}: re-check "
        "simulations/flower_adapter.py against this Flower, then update the pin"
    )


@pytest.mark.parametrize(("module", "name"), adapter.INTERNALS)
def test_internal_name_exists(module: str, name: str):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"Flower {flwr.__version__}: {module}.{name} is gone"


def test_run_simulation_takes_the_arguments_passed():
    from flwr.simulation.run_simulation import _run_simulation

    params = inspect.signature(_run_simulation).parameters
    missing = [p for p in adapter.RUN_SIMULATION_PARAMS if p not in params]
    assert not missing, f"_run_simulation lost parameter(s) {missing}"
    from flwr.supercore.telemetry import EventType

    assert hasattr(EventType, "PYTHON_API_RUN_SIMULATION_LEAVE")


def test_run_has_the_fields_set():
    from flwr.supercore.run import Run

    fields = {f.name for f in dataclasses.fields(Run)}
    missing = [f for f in adapter.RUN_FIELDS if f not in fields]
    assert not missing, f"flwr Run lost field(s) {missing}"
    run = Run.create_empty(run_id=5)
    assert run.run_id == 5


def test_task_identity_is_set_and_restored():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    before = {n: TaskIdentity.__dict__.get(n) for n in ("_run_id", "_task_id", "_node_id")}
    with adapter.task_identity(run_id=7, task_id=3):
        assert (TaskIdentity.run_id, TaskIdentity.task_id) == (7, 3)
        assert TaskIdentity.node_id == SUPERLINK_NODE_ID
    assert {n: TaskIdentity.__dict__.get(n) for n in before} == before
