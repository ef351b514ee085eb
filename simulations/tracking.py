"""``--track`` and ``--tracking-uri`` on ``simulate``, ``compare`` and ``sweep privacy``.

The flags set the run-config key ``tracking-uri`` (:func:`with_tracking`), the one switch of
MLflow tracking: the ServerApp logs each run to that store, its rounds as they finish
(server/tracking.py, which also says what is logged), under ``flwr run`` and in a deployment
as here. What only the command line adds is here: ``compare`` and ``sweep privacy`` open a
parent run whose children are their runs (compare's pooled and local baselines too, from its
table; a sweep's cells finished before a run with tracking are logged from their folders).
The key set in a config file or ``--run-config`` does the same as the flags.

MLflow is an optional extra (``pip install -e ".[track]"``): without it, tracking says how
to install it before any work (server/tracking.py: ``check_mlflow``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tomli_w
import typer
from rich.console import Console

from common.rundir import RunDir, read_toml
from server.tracking import (
    RECORD,
    RunTracker,
    Store,
    check_mlflow,
    children_of,
    numbers,
    resolve_uri,
)
from simulations.runner import parse_overrides, resolve_run_config

console = Console()

TRACK_HELP = (
    "log to MLflow: config as params, each round's metrics as it ends, report, plots, best "
    "checkpoint; sets the run-config key tracking-uri (fedskin keys tracking) to the store "
    '(needs pip install -e ".\\[track]")'  # \[: a literal [ in the rich-rendered help
)
URI_HELP = (
    "MLflow tracking URI (implies --track; default: MLFLOW_TRACKING_URI, else "
    "sqlite:///runs/mlflow.db); the same as --run-config \"tracking-uri='URI'\""
)
Track = Annotated[bool, typer.Option("--track", help=TRACK_HELP)]
TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help=URI_HELP)]


def with_tracking(
    config: str | Path | None, run_config: str | None, track: bool, uri: str | None
) -> tuple[str | None, str]:
    """``--run-config`` with the key ``--track``/``--tracking-uri`` set (the store
    resolved: MLFLOW_TRACKING_URI, else SQLite in runs/), and the run's store ("" = off,
    also where the key comes from the config or ``--run-config``). Raises a one-line
    ``DataError`` saying how to install MLflow where tracking is on and it is missing."""
    if not (track or uri):
        key = resolve_run_config(config, run_config).tracking_uri
        store = resolve_uri(key) if key else ""
        check_mlflow(store)
        return run_config, store
    store = resolve_uri(uri)
    check_mlflow(store)
    pairs = parse_overrides(run_config) | {"tracking-uri": store}
    text = " ".join(f"{k}={_toml(v)}" for k, v in pairs.items())
    return text, store


def _toml(value: Any) -> str:
    """A value as ``--run-config`` (TOML) writes it: ``"text"``, ``3``, ``true``."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


@dataclass
class Parent:
    """The open parent run of ``compare`` or ``sweep privacy`` and its store."""

    store: Store
    run_id: str


@contextmanager
def parent_run(
    uri: str, folder: Path, params: Mapping[str, Any], resume: bool = False
) -> Iterator[Parent | None]:
    """The parent run of ``compare`` or ``sweep privacy`` in store ``uri`` ("" = off:
    yields None; ``folder``: their output folder): runs started inside are its children;
    with ``resume`` (a sweep, which keeps its finished cells) a re-run continues it. At the
    end, its tables and plots become its artifacts."""
    if not uri:
        yield None
        return
    store = Store.open(uri)
    parent = Parent(store, store.start(folder, params, None, resume))
    status = "FAILED"
    try:
        with children_of(parent.run_id):
            yield parent
        status = "FINISHED"
    finally:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != RECORD:
                store.client.log_artifact(parent.run_id, str(path))
        store.client.set_terminated(parent.run_id, status=status)
    console.print(f"tracked in MLflow: parent run {parent.run_id} ({store.uri})")


def log_children(parent: Parent | None, folders: Iterable[Path]) -> None:
    """Finished run folders not yet in the store (a sweep's cells finished before a run
    with tracking) as children of ``parent``, logged from their folders."""
    if parent is None:
        return
    for folder in folders:
        if not RunDir(folder).metrics.is_file() or parent.store.run_of(folder):
            continue
        cfg = read_toml(RunDir(folder).config)
        with children_of(parent.run_id):
            tracker = RunTracker.start(parent.store.uri, folder, cfg)
        tracker.finish("FINISHED")  # its rounds, test results and artifacts


def log_rows(
    parent: Parent | None, rows: Iterable[Mapping[str, Any]], name: str = "method"
) -> None:
    """Table rows that are no run folder (compare's pooled and local baselines) as children
    of ``parent``: the row's numbers as metrics."""
    if parent is None:
        return
    store = parent.store
    for row in rows:
        tags = {"mlflow.parentRunId": parent.run_id}
        run = store.client.create_run(store.experiment_id, tags=tags, run_name=str(row[name]))
        run_id = run.info.run_id
        store.log_metrics(run_id, [(k, v, 0) for k, v in numbers(row)])
        store.client.set_terminated(run_id, status="FINISHED")


def log_baselines(parent: Parent | None, table: Any, methods: list[str]) -> None:
    """compare's rows before its federated ones (one per method, each logged as its run):
    the pooled and local baselines, as children of ``parent``."""
    rows = table.to_dict(orient="records")
    log_rows(parent, rows[: len(rows) - len(dict.fromkeys(methods))])
