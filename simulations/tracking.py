"""Experiment tracking with MLflow: ``--track`` on ``simulate``, ``compare`` and ``sweep privacy``.

Each run is logged from its run folder once it ends (or fails): the resolved config
(config.toml) as params; every numeric value of every round in metrics.json as a metric at
``step=round``, named by its path there (``validation/global/balanced_accuracy``,
``validation/sites/<site>/accuracy``, ``train/<site>/train_loss``, ``epsilon/<site>``,
``central/epsilon``, ...), the test results at the last round's step (``test/...``);
report.md, metrics.json, history.csv, config.toml, audit.json, the plots and the best
checkpoint as artifacts. ``compare`` and ``sweep privacy`` open a parent run whose children
are their runs (compare's pooled and local baselines too, from its table). The MLflow run
id is kept in the run folder (``mlflow.json``): ``--resume`` continues the same MLflow run
and logs only the rounds it had not logged. Only the runner (the server side) logs, never a
site.

MLflow is an optional extra (``pip install -e ".[track]"``): it is imported inside the
functions that talk to the store, so that fedskin runs, and ``--track`` says how to install
it, where it is not installed. The store: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``,
else a SQLite file ``runs/mlflow.db`` (artifacts beside it in ``runs/mlartifacts``);
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from common.errors import DataError
from common.rundir import DEFAULT_RUNS, RunDir, atomic_write_json, read_toml

if TYPE_CHECKING:  # only for type hints: mlflow is optional
    from mlflow import MlflowClient

console = Console()
log = logging.getLogger("fedskin")

INSTALL_HINT = '--track needs MLflow, an optional extra: pip install -e ".[track]"'
RECORD = "mlflow.json"  # in a run folder: the MLflow store, run id and rounds logged
DEFAULT_EXPERIMENT = "fedskin"  # unless MLFLOW_EXPERIMENT_NAME names another
TRACK_HELP = (
    "log to MLflow: config as params, every round's metrics, report, plots, best checkpoint "
    '(needs pip install -e ".[track]")'
)
URI_HELP = (
    "MLflow tracking URI (implies --track; default: MLFLOW_TRACKING_URI, else "
    "sqlite:///runs/mlflow.db)"
)
Track = Annotated[bool, typer.Option("--track", help=TRACK_HELP)]
TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help=URI_HELP)]
PLOTS = (".png", ".svg", ".pdf")
ROOT_ARTIFACTS = ("report.md", "metrics.json", "history.csv", "config.toml", "audit.json")

_uri: str | None = None  # the store of this process's runs; None: tracking off
_parent: str | None = None  # the open parent run (compare, sweep privacy), if any


# ------------------------------------------------------------------------------ setup
def use_tracking(track: bool, uri: str | None = None) -> None:
    """``--track`` / ``--tracking-uri``: every run this process starts is logged to that store.

    Raises a one-line :class:`DataError` saying how to install MLflow where it is missing,
    before any work.
    """
    global _uri
    if not (track or uri):
        _uri = None
        return
    try:
        import mlflow  # noqa: F401 - optional extra: only checked for here
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    _uri = tracking_uri(uri)


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else SQLite in the runs folder; a relative
    SQLite path made absolute (so that a run folder's record names one store)."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI", "")).strip()
    if not uri:
        return f"sqlite:///{(DEFAULT_RUNS / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@dataclass
class Store:
    """One MLflow store and fedskin's experiment in it."""

    uri: str
    client: MlflowClient
    experiment_id: str

    @classmethod
    def open(cls, uri: str) -> Store:
        from mlflow import MlflowClient  # optional extra, checked by use_tracking

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table set-up lines
        logging.getLogger("alembic").setLevel(logging.WARNING)
        db = _sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return cls(uri, client, experiment.experiment_id)
        # a local store keeps the artifacts beside the database, not in ./mlruns
        where = (db.parent / "mlartifacts").as_uri() if db is not None else None
        return cls(uri, client, client.create_experiment(name, artifact_location=where))

    def run_of(self, folder: Path) -> str | None:
        """The MLflow run this folder was logged to in this store, if it still exists."""
        folder = folder.resolve()  # as the record names it, however the command named it
        record = _record(folder)
        if record.get("tracking_uri") != self.uri or record.get("run_dir") != str(folder):
            return None  # another store, or a folder copied from another run
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(record["run_id"])
        except (MlflowException, KeyError):
            return None
        return str(record["run_id"])

    def start(
        self, folder: Path, params: Mapping[str, Any], parent: str | None, resume: bool
    ) -> str:
        """A new run for ``folder`` (or, with ``resume``, the one it was logged to before)."""
        folder = folder.resolve()
        run_id = self.run_of(folder) if resume else None
        if run_id is None:
            tags = {"fedskin.run_dir": str(folder)}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=folder.name)
            run_id = run.info.run_id
            atomic_write_json(folder / RECORD, _new_record(self.uri, run_id, folder))
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params not yet logged; a value that differs from the logged one (a resume with
        more rounds) is kept as a tag ``changed.<key>``: MLflow's params cannot change."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        changed = [
            RunTag(f"changed.{k}", str(v))
            for k, v in params.items()
            if k in logged and logged[k] != str(v)
        ]
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=new[i : i + 100], tags=changed[i : i + 100])

    def log_metrics(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_name(k), v, now, step) for k, v, step in points]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _name(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / : `` and spaces)."""
    return re.sub(r"[^\w./\- :]", "_", key)


def _record(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _new_record(uri: str, run_id: str, folder: Path) -> dict[str, Any]:
    return {"tracking_uri": uri, "run_id": run_id, "run_dir": str(folder), "rounds_logged": 0}


# ------------------------------------------------------------------------------ what is logged
def numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a nested dict, named by its path (``validation/global/auroc``);
    lists (confusion matrices), strings and booleans are left out."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from numbers(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield prefix, float(tree)


def round_points(rounds: list[dict[str, Any]], after: int = 0) -> list[tuple[str, float, int]]:
    """Each round's numbers (but its round number) at ``step=round``, for rounds > ``after``."""
    points = []
    for record in rounds:
        step = int(record["round"])
        if step > after:
            points += [(k, v, step) for k, v in numbers(record) if k != "round"]
    return points


def final_points(metrics: Mapping[str, Any], audit: Any) -> list[tuple[str, float, int]]:
    """The test results (``test/...``), best round and audit at the last round's step."""
    step = max((int(r["round"]) for r in metrics.get("rounds", [])), default=0)
    values = [*numbers(metrics.get("test", {}), "test"), *numbers(audit or {}, "audit")]
    if metrics.get("best_round") is not None:
        values.append(("best_round", float(metrics["best_round"])))
    return [(k, v, step) for k, v in values]


def artifacts(folder: Path) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of what a run folder holds worth keeping in the store."""
    paths = RunDir(folder)
    found: list[tuple[Path, str | None]] = [
        (folder / name, None) for name in ROOT_ARTIFACTS if (folder / name).is_file()
    ]
    found += [(p, "plots") for p in sorted(folder.iterdir()) if p.suffix in PLOTS]
    if paths.checkpoint("best").is_file():
        found.append((paths.checkpoint("best"), "checkpoints"))
    return found


def log_folder(store: Store, run_id: str, folder: Path) -> None:
    """The run folder's metrics (rounds not logged yet) and artifacts into ``run_id``."""
    paths = RunDir(folder)
    if paths.metrics.is_file():
        metrics = json.loads(paths.metrics.read_text())
        record = _record(folder)
        after = int(record.get("rounds_logged", 0)) if record.get("run_id") == run_id else 0
        rounds = metrics.get("rounds", [])
        audit = json.loads(paths.audit_json.read_text()) if paths.audit_json.is_file() else None
        store.log_metrics(run_id, round_points(rounds, after) + final_points(metrics, audit))
        if record.get("run_id") == run_id:
            last = max((int(r["round"]) for r in rounds), default=after)
            atomic_write_json(folder / RECORD, {**record, "rounds_logged": max(last, after)})
    for path, where in artifacts(folder):
        store.client.log_artifact(run_id, str(path), artifact_path=where)


# ------------------------------------------------------------------------------ hooks
@contextmanager
def tracked_run(folder: Path, cfg: Mapping[str, Any], resume: bool = False) -> Iterator[None]:
    """Log one run (``simulate``) with params ``cfg`` when tracking is on; a child of the
    open parent run, if any. Logged from the run folder when the run ends, failed or not."""
    if _uri is None:
        yield
        return
    store = Store.open(_uri)
    run_id = store.start(folder, cfg, _parent, resume)
    try:
        yield
    except BaseException:
        _close(store, run_id, folder, "FAILED")
        raise
    _close(store, run_id, folder, "FINISHED")
    console.print(f"tracked in MLflow: run {run_id} ({store.uri})")


def _close(store: Store, run_id: str, folder: Path, status: str) -> None:
    """Log the folder and end the run; a store that fails now loses no result on disk."""
    try:
        log_folder(store, run_id, folder)
        store.client.set_terminated(run_id, status=status)
    except Exception as err:  # the run folder is complete: say so and go on
        log.warning("MLflow: could not log %s (%s); it is complete on disk", folder, err)


@contextmanager
def parent_run(
    folder: Path, params: Mapping[str, Any], resume: bool = False
) -> Iterator[str | None]:
    """The parent run of ``compare`` or ``sweep privacy`` (``folder``: their output folder):
    runs started inside are its children; with ``resume`` (a sweep, which keeps its
    finished cells) a re-run continues it. At the end, its tables and plots become its
    artifacts. Yields its id (None: tracking off)."""
    global _parent
    if _uri is None:
        yield None
        return
    store = Store.open(_uri)
    folder.mkdir(parents=True, exist_ok=True)
    _parent = store.start(folder, params, None, resume)
    status = "FAILED"
    try:
        yield _parent
        status = "FINISHED"
    finally:
        parent, _parent = _parent, None
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != RECORD:
                store.client.log_artifact(parent, str(path))
        store.client.set_terminated(parent, status=status)
    console.print(f"tracked in MLflow: parent run {parent} ({store.uri})")


def log_children(parent: str | None, folders: Iterable[Path]) -> None:
    """Finished run folders not yet in the store (a sweep's cells finished before a run
    with ``--track``) as children of ``parent``, logged from their folders."""
    if parent is None or _uri is None:
        return
    store = Store.open(_uri)
    for folder in folders:
        if not RunDir(folder).metrics.is_file() or store.run_of(folder):
            continue
        cfg = read_toml(RunDir(folder).config)
        run_id = store.start(folder, cfg, parent, resume=False)
        _close(store, run_id, folder, "FINISHED")


def log_rows(parent: str | None, rows: Iterable[Mapping[str, Any]], name: str = "method") -> None:
    """Table rows that are no run folder (compare's pooled and local baselines) as children
    of ``parent``: the row's numbers as metrics."""
    if parent is None or _uri is None:
        return
    store = Store.open(_uri)
    for row in rows:
        tags = {"mlflow.parentRunId": parent}
        run = store.client.create_run(store.experiment_id, tags=tags, run_name=str(row[name]))
        run_id = run.info.run_id
        store.log_metrics(run_id, [(k, v, 0) for k, v in numbers(row)])
        store.client.set_terminated(run_id, status="FINISHED")


def log_baselines(parent: str | None, table: Any, methods: list[str]) -> None:
    """compare's rows before its federated ones (one per method, each logged as its run):
    the pooled and local baselines, as children of ``parent``."""
    rows = table.to_dict(orient="records")
    log_rows(parent, rows[: len(rows) - len(dict.fromkeys(methods))])
