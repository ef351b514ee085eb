"""fedskin ServerApp: coordinates the hospital sites for one experiment.

Runs unchanged under the Simulation Engine (``fedskin simulate``, ``flwr run .``) and the
Deployment Engine (a TLS SuperLink with real SuperNodes at the sites).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, RunConfig
from common.data.schema import DataError
from common.data.site_data import classes_for
from common.models import get_weights, model_for_run
from common.personal import personalize_mode
from common.rundir import run_dir_for
from common.version import version
from server.lda import classifier_keys
from server.loop import Federation
from server.results import load_results
from server.resume import Resume, resume_checkpoint
from server.tracking import check_mlflow, tracked

log = logging.getLogger("fedskin")
app = ServerApp()


def initial_model(run: RunConfig, num_classes: int) -> torch.nn.Module:
    """Seeded initial global model, DP-compatible (GroupNorm) when sites train under DP."""
    torch.manual_seed(run.seed)
    return model_for_run(run, num_classes)


def statistics_of(model: torch.nn.Module) -> frozenset[str]:
    """The state-dict names of the model's buffers: normalisation statistics, not weights."""
    return frozenset(name for name, _ in model.named_buffers())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp of ``flwr run``, a deployment and ``fedskin simulate``."""
    serve(grid, context)


def app_resuming(checked: Resume) -> ServerApp:
    """The ServerApp for a run whose resume the runner checked in this same process
    (``fedskin simulate --resume``): it hands that check to the loop, not checking again."""
    resuming = ServerApp()

    @resuming.main()
    def main_resuming(grid: Grid, context: Context) -> None:
        serve(grid, context, checked)

    return resuming


def serve(grid: Grid, context: Context, checked: Resume | None = None) -> None:
    """One run: config checked, resume checked (unless ``checked`` already is), sites found,
    the rounds and the test (server/loop.py)."""
    logger = logging.getLogger("fedskin")
    if logger.getEffectiveLevel() > logging.INFO:  # keep the runner's -v (DEBUG), if set
        logger.setLevel(logging.INFO)
    log.info("fedskin %s", version())
    # Checked before any site is contacted: `flwr run` and a deployment do not go through
    # fedskin's runner. The error propagates so that Flower marks the run as failed (with
    # this one line as its reason); SystemExit would escape Flower's handlers.
    try:
        run = RunConfig.from_mapping(context.run_config)
        check_mlflow(run.tracking_uri)  # tracking-uri set, MLflow not installed
    except ConfigError as err:
        log.error("invalid run config: %s", err)
        raise
    personalize_mode(run)  # ditto/finetune under dp=true: fail now
    classes = classes_for(run.data_format)
    run_dir = run_dir_for(run)
    if run.resume and checked is None:  # a planted, truncated or differently configured
        try:  # checkpoint: before any site is contacted, with one line (server/resume.py)
            checked = Resume(resume_checkpoint(run_dir, run.to_flat(), run.force_resume))
        except DataError as err:
            log.error("cannot resume: %s", err)
            raise
    fed = Federation(grid, run, run_dir, classes)
    sites = fed.discover(expected=run.min_nodes, wait=run.wait_for_nodes)
    log.info("sites: %s", ", ".join(f"{s.site} (train {s.n_train})" for s in sites))
    model = initial_model(run, len(classes))
    with tracked(run, run_dir) as on_round:  # MLflow, live, when tracking-uri is set
        fed.run(
            get_weights(model),
            run.num_server_rounds,
            resume=run.resume,
            statistics=statistics_of(model),
            head=classifier_keys(model) if run.head_calibration != "none" else ("", ""),
            model=lambda: model_for_run(run, len(classes), pretrained=False),
            on_round=on_round,
            checked=checked,  # the loop starts from the checkpoint checked here
        )
    results = load_results(run_dir)  # as the loop wrote them (server/results.py)
    log.info(
        "test (best round %d): pooled balanced accuracy %.3f, mean over sites %.3f -> %s",
        results.best_round,
        results.finished().pooled.balanced_accuracy,
        results.finished().mean_site_balanced_accuracy,
        run_dir,
    )
