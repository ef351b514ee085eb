"""MLflow tracking of a run, logged by the server as it goes: the run config's ``tracking-uri``.

With ``tracking-uri`` set (``fedskin simulate --track`` sets it; ``flwr run`` and a
deployment read it from the run config; "" = off), the ServerApp logs its run to that MLflow
store: the resolved config as params when the run starts; each round's numbers as metrics at
``step=round`` as soon as the loop records the round (named by their path in metrics.json:
``validation/global/balanced_accuracy``, ``validation/sites/<site>/accuracy``,
``train/<site>/train_loss``, ``epsilon/<site>``, ``central/epsilon``, ...), so ``mlflow ui``
shows a curve grow and a run that crashes keeps its rounds; when the run ends, the test
results (``test/...`` at the last round's step) and report.md, metrics.json, history.csv,
config.toml, the plots and the best checkpoint as artifacts. The MLflow run id is kept in the
run folder (``mlflow.json``): a resumed run continues the same MLflow run. Only the server
logs: no site module imports this one (tests/test_layout.py) or MLflow.

MLflow is an optional extra (``pip install -e ".[track]"``): it is imported inside the
functions that talk to the store, so that fedskin, and every site, runs without it; a run
with ``tracking-uri`` set where it is missing fails at its start with one line saying how to
install it (:func:`check_mlflow`). The store of a relative ``sqlite:///`` URI is made
absolute (:func:`resolve_uri`), so that a run folder's record names one store.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers as num
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from common.config import ConfigError, RunConfig
from common.rundir import DEFAULT_RUNS, RunDir, atomic_write_json
from server.results import RunResults, load_results

if TYPE_CHECKING:  # only for type hints: mlflow is optional
    from mlflow import MlflowClient

log = logging.getLogger("fedskin")

INSTALL_HINT = 'tracking-uri (--track) needs MLflow, an optional extra: pip install -e ".[track]"'
PASSWORD_HINT = (
    "tracking-uri holds a password, which the run config would carry to every site: set "
    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD at the server instead"
)
RECORD = "mlflow.json"  # in a run folder: the MLflow store, run id and rounds logged
DEFAULT_EXPERIMENT = "fedskin"  # unless MLFLOW_EXPERIMENT_NAME names another
PLOTS = (".png", ".svg", ".pdf")
ROOT_ARTIFACTS = ("report.md", "metrics.json", "history.csv", "config.toml", "audit.json")
RoundHook = Callable[[dict[str, Any]], None]  # server/loop.py calls it with each round's record

_parent: str | None = None  # the open parent run (compare, sweep privacy), if any


# ------------------------------------------------------------------------------ setup
def check_mlflow(uri: str) -> None:
    """What tracking to ``uri`` needs before a run starts, as a one-line :class:`ConfigError`:
    MLflow installed (found without importing it: that takes seconds), and no password in
    the URI: the run config reaches every site (the URI is not echoed)."""
    if not uri:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(INSTALL_HINT)
    if urlsplit(uri).password is not None:
        raise ConfigError(PASSWORD_HINT)


def resolve_uri(uri: str | None = None) -> str:
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


@contextmanager
def children_of(parent: str | None) -> Iterator[None]:
    """Runs started in this process inside the block (the ServerApp runs in the runner's
    process under the Simulation Engine) are children of MLflow run ``parent``."""
    global _parent
    before, _parent = _parent, parent
    try:
        yield
    finally:
        _parent = before


@dataclass
class Store:
    """One MLflow store and fedskin's experiment in it."""

    uri: str
    client: MlflowClient
    experiment_id: str

    @classmethod
    def open(cls, uri: str) -> Store:
        from mlflow import MlflowClient  # optional extra, checked by check_mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table set-up lines
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # SQLAlchemy's deprecation notes about MLflow's own code: nothing a user can act on
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
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
        record = read_record(folder)
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
            record = {"tracking_uri": self.uri, "run_id": run_id, "run_dir": str(folder)}
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / RECORD, {**record, "rounds_logged": 0})
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


def read_record(folder: Path) -> dict[str, Any]:
    """The run folder's ``mlflow.json`` (store, run id, rounds logged); {} if none."""
    try:
        return dict(json.loads((folder / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


# ------------------------------------------------------------------------------ what is logged
def numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a nested dict, named by its path (``validation/global/auroc``);
    lists (confusion matrices), strings and booleans are left out."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from numbers(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, num.Real) and not isinstance(tree, bool):  # numpy's too
        yield prefix, float(tree)


def round_points(
    rounds: Iterable[Mapping[str, Any]], after: int = 0
) -> list[tuple[str, float, int]]:
    """Each round's numbers (but its round number) at ``step=round``, for rounds > ``after``."""
    points = []
    for record in rounds:
        step = int(record["round"])
        if step > after:
            points += [(k, v, step) for k, v in numbers(record) if k != "round"]
    return points


def final_points(results: RunResults, audit: Any) -> list[tuple[str, float, int]]:
    """The test results (``test/...``), best round and audit at the last round's step."""
    step = max((r.round for r in results.rounds), default=0)
    test = results.test.to_json() if results.test is not None else {}
    values = [*numbers(test, "test"), *numbers(audit or {}, "audit")]
    if "best_round" in results.model_fields_set:  # as metrics.json holds it
        values.append(("best_round", float(results.best_round)))
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


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _results(folder: Path) -> RunResults:
    """The folder's metrics.json (server/results.py); none yet: no rounds, no test."""
    return load_results(folder) if RunDir(folder).metrics.is_file() else RunResults()


# ------------------------------------------------------------------------------ one run
@dataclass
class RunTracker:
    """One run folder's MLflow run: its rounds logged as they come, the rest at the end."""

    store: Store
    run_id: str
    folder: Path
    logged: int = 0  # the last round in the store

    @classmethod
    def start(
        cls, uri: str, folder: Path, params: Mapping[str, Any], resume: bool = False
    ) -> RunTracker:
        """A new MLflow run for ``folder`` (a child of the open parent, if any), or with
        ``resume`` the one it was logged to, its rounds on disk not yet logged added."""
        store = Store.open(uri)
        folder = folder.resolve()
        run_id = store.start(folder, params, _parent, resume)
        tracker = cls(store, run_id, folder, int(read_record(folder).get("rounds_logged", 0)))
        if resume:
            tracker.catch_up()
        return tracker

    def catch_up(self) -> None:
        """The folder's rounds (metrics.json) the store does not hold yet."""
        for record in _results(self.folder).rounds:
            self.round(record.to_json())

    def round(self, record: Mapping[str, Any]) -> None:
        """One round's numbers, unless logged already; a store that fails now costs a
        warning, never the run (the round is on disk, and logged at the end)."""
        step = int(record["round"])
        if step <= self.logged:
            return
        try:
            self.store.log_metrics(self.run_id, round_points([record], self.logged))
        except Exception as err:  # the store is down: say so, train on
            log.warning("MLflow: round %d not logged (%s); it is on disk", step, err)
            return
        self.logged = step
        atomic_write_json(self.folder / RECORD, {**read_record(self.folder), "rounds_logged": step})

    def finish(self, status: str) -> None:
        """Rounds not logged yet, the test results and the artifacts; the run ended with
        ``status``. A store that fails now loses no result on disk."""
        try:
            self.catch_up()
            audit = _json(RunDir(self.folder).audit_json)
            self.store.log_metrics(self.run_id, final_points(_results(self.folder), audit))
            for path, where in artifacts(self.folder):
                self.store.client.log_artifact(self.run_id, str(path), artifact_path=where)
        except Exception as err:  # the run folder is complete: say so and go on
            log.warning("MLflow: could not log %s (%s); it is complete on disk", self.folder, err)
        try:  # ended either way: a run left RUNNING would look alive in `mlflow ui`
            self.store.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            log.warning("MLflow: run %s not marked %s (%s)", self.run_id, status, err)


@contextmanager
def tracked(run: RunConfig, folder: Path) -> Iterator[RoundHook | None]:
    """The ServerApp's run logged to ``run.tracking_uri`` ("" = off: yields None), its
    config as params; yields the per-round hook the loop calls (server/loop.py); the MLflow
    run ends FAILED if the block raises, FINISHED if not."""
    if not run.tracking_uri:
        yield None
        return
    check_mlflow(run.tracking_uri)
    uri, params = resolve_uri(run.tracking_uri), run.to_flat()
    tracker = RunTracker.start(uri, folder, params, run.resume)
    log.info("tracking in MLflow: run %s (%s)", tracker.run_id, tracker.store.uri)
    try:
        yield tracker.round
    except BaseException:  # a crash or a kill: the rounds so far stay logged
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def log_after(folder: Path, audit: Mapping[str, Any] | None) -> str:
    """What the runner adds once the ServerApp has closed the run (the audit: its numbers
    and audit.json); returns ``run <id> (<store>)`` to say where it is."""
    record = read_record(folder.resolve())
    store = Store.open(record["tracking_uri"])
    if audit:
        step = int(record.get("rounds_logged", 0))  # the last round's, as the test's
        store.log_metrics(record["run_id"], [(k, v, step) for k, v in numbers(audit, "audit")])
        audit_json = RunDir(folder).audit_json
        if audit_json.is_file():
            store.client.log_artifact(record["run_id"], str(audit_json))
    return f"run {record['run_id']} ({store.uri})"
