"""The one place that touches Flower internals (names outside Flower's public API).

Flower's public ``run_simulation`` does not pass a run config on to the ServerApp and
ClientApps, so the runner calls the private ``_run_simulation`` with a hand-built ``Run``, as
``run_simulation`` itself does. Tests that drive the ServerApp loop without a running
SuperLink need the process' task identity, which Flower sets inside a run. Everything of that
kind lives here; ``tests/test_flower_adapter.py`` checks that every name and parameter used
below still exists, and that the installed Flower is the version ``pyproject.toml`` pins, so a
Flower upgrade fails there, loudly, instead of deep inside a simulation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

# The Flower internals used below, as (module, attribute): the adapter test imports each.
INTERNALS: tuple[tuple[str, str], ...] = (
    ("flwr.simulation.run_simulation", "_run_simulation"),
    ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes"),
    ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    ("flwr.supercore.run", "Run"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.supercore.telemetry", "EventType"),
)
# Keyword arguments of ``_run_simulation`` and fields of ``Run`` this module relies on.
RUN_SIMULATION_PARAMS: tuple[str, ...] = (
    "num_supernodes",
    "exit_event",
    "client_app_attr",
    "server_app_attr",
    "server_app",
    "is_app",
    "backend_name",
    "backend_config",
    "server_app_context",
    "app_dir",
    "run",
)
RUN_FIELDS: tuple[str, ...] = ("run_id", "primary_task_id", "federation_id", "override_config")


def set_task_identity(run_id: int = 1, task_id: int = 1, node_id: int | None = None) -> None:
    """Give this process the task identity Flower sets inside a run (default: the SuperLink)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id = task_id, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID if node_id is None else node_id


@contextmanager
def task_identity(run_id: int = 1, task_id: int = 1, node_id: int | None = None) -> Iterator[None]:
    """:func:`set_task_identity` for a block; the previous identity (or none) is restored."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    before = {name: TaskIdentity.__dict__.get(name) for name in names}
    set_task_identity(run_id, task_id, node_id)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(TaskIdentity, name, value)


def run_simulation(
    run_config: dict[str, Any],
    *,
    num_supernodes: int,
    client_app: str,
    server_app: str | ServerApp,
    backend_config: dict[str, Any],
    app_dir: str,
) -> None:
    """What flwr's own ``run_simulation`` does, plus the run config it does not pass on.

    Server and clients alike receive ``run_config`` (flat, kebab-case keys); the apps are
    given as ``"module:attr"`` strings importable from ``app_dir`` (the ServerApp may
    also be the object itself: one the runner made for this run, server/server_app.py).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    set_task_identity(run_id=run.run_id)
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app_attr=client_app,
        server_app_attr=server_app if isinstance(server_app, str) else None,
        server_app=None if isinstance(server_app, str) else server_app,
        is_app=True,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=app_dir,
        run=run,
    )
