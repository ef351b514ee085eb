"""`fedskin simulate`: one federated experiment on this machine with Flower's Simulation Engine.

The ServerApp and ClientApp are the same objects ``flwr run .`` and a real deployment use.
The runner only prepares what every simulated site would otherwise race to build (the
synthetic data, the manifest, the uint8 image cache), then starts the Simulation Engine in
the current environment (no per-run reinstall) with the resolved run config.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shutil
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console
from rich.logging import RichHandler

from common.config import ConfigError, RunConfig, check_keys
from common.data.schema import DataError, LoadReport
from common.rundir import (
    RunDir,
    atomic_copy,
    atomic_write_text,
    read_toml,
    run_dir_for,
)
from server.results import FinalTest, Scores, load_results
from server.resume import Resume, resume_checkpoint
from server.tracking import check_mlflow, log_after

console = Console()
log = logging.getLogger("fedskin")

APP_DIR = Path(__file__).resolve().parents[1]  # holds pyproject.toml with the Flower app
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def default_config() -> dict[str, Any]:
    """The app's run config defaults (the schema's: common/config.py)."""
    return RunConfig.defaults().to_flat()


# flwr run's own pattern for one ``key=value`` pair (flwr.common.config.parse_config_args)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse ``--run-config "key=value key2='text'"`` exactly as ``flwr run`` does.

    What Flower would refuse with a generic "invalid format" (or silently drop) is a
    one-line :class:`DataError` naming the pair, e.g. an unquoted string:
    ``data-path=/x/y`` -> use ``data-path='/x/y'``.
    """
    if not text:
        return {}
    if not text.strip().endswith(".toml"):  # a file: Flower reads it whole
        _check_pairs(text)
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text]))


def _check_pairs(text: str) -> None:
    """Each ``key=value`` of ``--run-config`` a TOML value, and nothing else in ``text``."""
    if leftover := _PAIR.sub(" ", text).split():
        raise DataError(
            f"--run-config: {leftover[0]!r} is not key=value "
            "(e.g. \"num-server-rounds=10 data-path='/data/ham'\")"
        )
    for key, value in _PAIR.findall(text):
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            quote = '"' if "'" in value else "'"
            raise DataError(
                f"--run-config: {key}={value} is not a number, true/false or quoted string; "
                f"quote a string: {key}={quote}{value}{quote}"
            ) from None


def resolve_config(
    config_path: str | Path | None = None, overrides: str | dict[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`resolve_run_config` as the flat kebab-case dict Flower carries."""
    return resolve_run_config(config_path, overrides).to_flat()


def resolve_run_config(
    config_path: str | Path | None = None, overrides: str | dict[str, Any] | None = None
) -> RunConfig:
    """Defaults, then the experiment file, then command-line overrides, checked once.

    An unknown key names its origin; a bad value (type, range, allowed values) is a
    :class:`ConfigError` naming the key: both are one-line ``DataError``s for the CLI.
    """
    cfg = default_config()
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path:
        path = Path(config_path)
        # a name from simulations/configs, with or without .toml ("-c default")
        for known in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.toml"):
            if not path.is_file() and known.is_file():
                path = known
        if not path.is_file():
            raise DataError(f"config file not found: {config_path}{_config_hint(path)}")
        layers.append((str(path), read_toml(path)))  # malformed: one line naming the file
        cfg.update({"run-name": path.stem})
    if overrides:
        parsed = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        layers.append(("--run-config", parsed))
    for origin, layer in layers:
        try:
            check_keys(layer)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
        cfg.update(layer)
    return RunConfig.from_mapping(cfg)


def shipped_configs() -> list[str]:
    """The names of the experiment files shipped in simulations/configs (``-c NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _config_hint(path: Path) -> str:
    """The shipped config names nearest to a name that was not found (or all of them)."""
    names = shipped_configs()
    stem = path.name.removesuffix(".toml")
    near = difflib.get_close_matches(stem, names, n=3, cutoff=0.6)
    if near:
        return f" (did you mean {' or '.join(near)}?)"
    return f" (shipped: {', '.join(names)})" if names else ""


# The built-in synthetic set leaves some ages and sexes empty on purpose (as HAM10000 does):
# nothing the user can act on, so the console leaves them out (the load report keeps them).
_SYNTHETIC_NOISE = re.compile(r"row\(s\) with empty/unknown (age|sex) ")


def shown_report(report: LoadReport, builtin: bool) -> LoadReport:
    """The load report as the console shows it: without the built-in set's empty age/sex."""
    if not builtin:
        return report
    kept = [w for w in report.warnings if not _SYNTHETIC_NOISE.search(w)]
    return dataclasses.replace(report, warnings=kept)


def prepare_data(run: RunConfig) -> tuple[RunConfig, int]:
    """Synthesize/load the source, write the manifest, fill the uint8 cache: once, here.
    The run with its manifest, and the number of sites the manifest holds."""
    from common.data.site_data import BUILTIN_FORMAT, classes_for, data_pipeline
    from simulations.data_cli import site_table

    classes_for(run.data_format)
    log.info("loading data ...")
    prepared = data_pipeline(run, progress=True)
    source, manifest_path, manifest = prepared.source, prepared.manifest_path, prepared.manifest
    report = shown_report(source.report, run.data_format == BUILTIN_FORMAT)
    if report.n_skipped() or report.warnings:
        console.print(report.summary())
    console.print(site_table(manifest, source.classes))
    resolved = run.with_values({"manifest": str(manifest_path.resolve())})
    return resolved, int(manifest["site"].nunique())


def simulate(
    config_path: str | Path | None = None,
    overrides: str | dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    verbose: bool = False,
    client_app: str | None = None,
    force_resume: bool = False,
) -> dict[str, Any]:
    """Run one experiment end to end; returns the final metrics as metrics.json holds them
    (server/results.py reads them typed), with the audit's when ``audit`` is on.

    ``client_app`` ("module:attr", importable from the project root) swaps the ClientApp,
    which tests use to inject failing sites. ``resume`` continues from the run directory's
    last checkpoint, refused (one line with the difference) when the config changes the
    result (common/rundir.py); ``force_resume`` resumes even then.
    """
    setup_logging(verbose or _verbose)
    run = resolve_run_config(config_path, overrides)
    check_mlflow(run.tracking_uri)  # tracking-uri set, MLflow missing: one line, before any work
    from common.personal import personalize_mode

    try:  # the ServerApp and every site would refuse it too: say so once, before starting
        personalize_mode(run)
    except ValueError as err:
        raise DataError(str(err)) from None
    if run.pretrained:  # the ServerApp loads them: a missing file or failed download, here
        from common.models import pretrained_state

        try:
            pretrained_state(run.model, run.pretrained)
        except (OSError, ValueError) as err:
            raise DataError(str(err).splitlines()[0]) from None
    if out:
        run = run.with_values({"out-dir": str(out)})
    run_dir = run_dir_for(run).expanduser().resolve()  # out-dir, or runs/<run-name>
    paths = RunDir(run_dir)
    changes: dict[str, Any] = {"out-dir": str(run_dir)}
    if resume or force_resume:
        changes["resume"] = True
    if force_resume:
        changes["force-resume"] = True
    run = run.with_values(changes)
    if run_dir.exists() and not run.resume and paths.metrics.exists():
        console.print(f"[yellow]{run_dir} holds an earlier run; its results will be replaced")
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
    if not run.state_dir:
        run = run.with_values({"state-dir": str(paths.site_state)})

    t0 = time.time()
    run, n_sites = prepare_data(run)
    run = run.with_values({"min-nodes": n_sites})
    cfg = run.to_flat()  # what Flower carries and the run directory stores
    checked = None  # the run's one resume check, made here and handed to the ServerApp
    if run.resume:  # a planted, truncated or differently configured checkpoint: here
        checked = Resume(resume_checkpoint(run_dir, cfg, run.force_resume))
    run_dir.mkdir(parents=True, exist_ok=True)  # after the data and config checks: a run
    # refused by them leaves no empty folder behind
    atomic_copy(run.manifest, paths.manifest)
    atomic_write_text(paths.config, tomli_w.dumps(cfg))
    console.print(
        f"[bold]{run.run_name}[/]: {n_sites} sites, strategy {run.strategy}, model "
        f"{run.model} at {run.image_size} px, {run.num_server_rounds} rounds "
        f"-> {run_dir}"
    )
    _run_engine(run, n_sites, client_app, checked)  # the ServerApp logs to MLflow (tracking-uri)
    results = load_results(run_dir)
    if results.test is None:
        raise RuntimeError(f"the run ended without test results; see the log and {run_dir}")
    metrics = results.to_json()
    if run.audit:
        from simulations.audit import audit_run

        metrics["audit"] = audit_run(run_dir)
    if run.tracking_uri:  # server/tracking.py: the audit joins the run's MLflow run
        console.print(f"tracked in MLflow: {log_after(run_dir, metrics.get('audit'))}")
    _print_summary(results.test, time.time() - t0, run_dir)
    return metrics


RAY_ADDRESS_HELP = (
    "run the sites on this existing Ray cluster (its head's host:port, or auto); "
    "default: Ray's own RAY_ADDRESS, else a local Ray started for the run"
)


def use_ray_address(address: str | None) -> None:
    """``--ray-address``: the same as Ray's own ``RAY_ADDRESS`` for this process and its runs."""
    if address and address.strip():
        os.environ["RAY_ADDRESS"] = address.strip()


def ray_address() -> str:
    """The Ray cluster runs join (``RAY_ADDRESS``); "" (or Ray's "local"): start a local one."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return "" if address == "local" else address


def backend_config(n_sites: int, run: RunConfig | None = None) -> dict[str, Any]:
    """Flower's Ray backend settings: each site's resources, and which Ray to run on.

    ``client_resources`` are the run config's ``client-num-cpus``, ``client-num-gpus``
    (-1 = auto: 1/sites of a GPU, at least 0.1, when this machine has CUDA) and
    ``client-memory-mb``; Flower runs as many sites at once as fit on each node. Flower passes
    ``init_args`` to ``ray.init``: a local Ray with this machine's CPUs, or, with an address
    (``--ray-address`` / ``RAY_ADDRESS``), only that address: a cluster's resources are set
    by its own ``ray start``.
    """
    run = RunConfig.defaults() if run is None else run
    num_gpus = run.client_num_gpus
    if num_gpus < 0:
        import torch

        num_gpus = max(1.0 / max(n_sites, 1), 0.1) if torch.cuda.is_available() else 0.0
    resources: dict[str, Any] = {"num_cpus": run.client_num_cpus, "num_gpus": num_gpus}
    if run.client_memory_mb > 0:
        resources["memory"] = run.client_memory_mb * 2**20  # Ray counts bytes
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    address = ray_address()
    if address:
        init_args["address"] = address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": resources, "init_args": init_args}


def _run_engine(
    run: RunConfig,
    n_sites: int,
    client_app: str | None = None,
    checked: Resume | None = None,
) -> None:
    """Start the Simulation Engine with this run config for server and clients alike;
    ``checked``: the resume checked here, which the ServerApp takes instead of checking."""
    from simulations.flower_adapter import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's tip about a future default is noise on the console. The old default is kept on
    # purpose: a site given no GPU (client-num-gpus=0) must not see one.
    warnings.filterwarnings(
        "ignore", message="Tip: In future versions of Ray", category=FutureWarning
    )
    if ray_address():
        console.print(f"sites run on the Ray cluster at {ray_address()}")
    where = "on that cluster" if ray_address() else "on this machine"
    log.info("starting Ray: %d sites %s ...", n_sites, where)
    run_simulation(
        run.to_flat(),
        num_supernodes=n_sites,
        client_app=client_app or "client.client_app:app",
        server_app="server.server_app:app" if checked is None else _resuming(checked),
        backend_config=backend_config(n_sites, run),
        app_dir=str(APP_DIR),
    )


_verbose = False  # --verbose of compare and sweep, for every run they start (use_verbose)


def use_verbose(on: bool) -> None:
    """``-v`` of a command that runs many experiments: each run logs at DEBUG, Flower too."""
    global _verbose
    _verbose = bool(on)
    setup_logging(_verbose)


def setup_logging(verbose: bool) -> None:
    """The console: INFO (one line per round, warnings, errors); ``verbose``: DEBUG (each
    site's reply, each message), Flower's own log included."""
    logger = logging.getLogger("fedskin")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, markup=False))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # each site's reply (server/transport.py): its own level, as the ServerApp sets "fedskin"
    # to INFO when it starts; unset, it follows "fedskin"
    logging.getLogger("fedskin.detail").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    logger.propagate = False
    # Flower's logger sets itself to DEBUG when first imported: import it before setting it.
    # It prints through its own handler; not propagating keeps a root handler (Opacus calls
    # logging.basicConfig when imported) from printing each line again, DEBUG ones included.
    import flwr.common.logger  # noqa: F401

    flower = logging.getLogger("flwr")
    flower.propagate = False
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _print_summary(test: FinalTest, seconds: float, run_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"Test, best round {test.best_round} ({seconds:.0f}s in all)")
    for col in ("site", "n", "balanced acc", "accuracy", "AUROC"):
        table.add_column(col, justify="right" if col != "site" else "left")
    for site, m in test.sites.items():
        table.add_row(site, str(int(m.num_examples)), *_three(m))
    table.add_row("mean over sites", "", f"{test.mean_site_balanced_accuracy:.3f}", "", "")
    # empty when no site could score the model (its failures are logged)
    table.add_row("pooled", str(int(test.pooled.n)), *_three(test.pooled))
    console.print(table)
    console.print(f"run directory: {run_dir} (report.md, metrics.json, history.csv, plots)")


def _three(scores: Scores) -> list[str]:
    """Balanced accuracy, accuracy and AUROC with 3 decimals (nan when not known)."""
    return [f"{v:.3f}" for v in (scores.balanced_accuracy, scores.accuracy, scores.auroc)]


def _resuming(checked: Resume) -> Any:
    """The ServerApp resuming from ``checked``. Imported here, on purpose: the ServerApp
    imports torch and timm (about 5 CPU-s), and every ``fedskin`` command imports this
    module (``partition``, ``keys``, ``deploy`` and ``--help`` too)."""
    from server.server_app import app_resuming

    return app_resuming(checked)
