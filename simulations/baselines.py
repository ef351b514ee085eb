"""Pooled and local baselines, and the FLamby-style comparison table.

Baselines use the same data path (`load_site`), the same local training (`train_local`) and
the same metrics as the federated clients, so a difference in the table is the federation's,
not the code's. Budget: each baseline model trains as a site does over a whole federated
run (rounds × local epochs, or rounds × local steps), and keeps its best round on
validation, as the federation keeps its best round. With ``head-calibration = "lda"`` a
baseline's best model gets the same classifier refit as the federation's (from its own
training images' features), kept only if validation improves, so the refit is not what
separates the rows.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from common.config import RunConfig
from common.data.partition import read_manifest
from common.data.site_data import SiteData, load_site, site_names
from common.metrics import compute_metrics
from common.models import build_model
from common.rundir import atomic_write_json, atomic_write_text
from common.train import TrainConfig, pick_device, predict, train_local
from server.lda import with_lda_head
from server.results import FinalTest, RunResults

console = Console()


def load_all_sites(run: RunConfig) -> list[SiteData]:
    """Every site of the manifest, in the order simulated partition ids map to them."""
    names = site_names(read_manifest(run.manifest))
    return [load_site(run, {"partition-id": i}) for i in range(len(names))]


def _split(sites: list[SiteData], split: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([s.images[split] for s in sites]),
        np.concatenate([s.labels[split] for s in sites]),
    )


def _score(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, classes) -> float:
    """Balanced accuracy of ``model`` on one split."""
    probs = predict(model, torch.from_numpy(images), device=pick_device())
    return float(compute_metrics(labels, probs, classes)["balanced_accuracy"])


def fit_baseline(run: RunConfig, sites: list[SiteData], label: str) -> torch.nn.Module:
    """A model trained on these sites' train splits with the federation's budget and rules.

    One round's worth of local training at a time (the run's local steps or epochs, a fresh
    optimizer each round, as at a site), ``num-server-rounds`` times, keeping the model that
    scores best on these sites' validation split: the federation picks its best round the
    same way, so the table compares methods, not model selection.
    """
    (x, y), (vx, vy) = _split(sites, "train"), _split(sites, "validation")
    classes, seed, rounds = sites[0].classes, run.seed, run.num_server_rounds
    torch.manual_seed(seed)
    model = build_model(run.model, len(classes), pretrained=run.pretrained)
    best, best_score, t0 = None, -1.0, time.time()
    for r in range(1, rounds + 1):
        train_local(
            model,
            torch.from_numpy(x),
            torch.from_numpy(y),
            TrainConfig.from_run(run, server_round=r),  # the round's rate, as at a site
            num_classes=len(classes),
            device=pick_device(),
            seed=seed + r,  # a new batch order each round
            progress=f"{label}: round {r}/{rounds} ({len(y)} images)",
        )
        score = _score(model, vx, vy, classes) if len(vy) else 0.0
        # One line a round, so a log file (no live bar there) shows progress and the ETA.
        took = time.time() - t0
        console.print(
            f"  {label}: round {r}/{rounds}, validation balanced accuracy {score:.3f}, "
            f"{took:.0f}s, about {took / r * (rounds - r):.0f}s to go"
        )
        if score > best_score:  # NaN (no scorable class) never wins
            best, best_score = copy.deepcopy(model.state_dict()), score
    model.load_state_dict(best)
    if run.head_calibration == "lda":
        return refit_baseline_head(model, (x, y), (vx, vy), best_score, classes, label)
    return model


def refit_baseline_head(
    model: torch.nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    before: float,
    classes,
    label: str,
) -> torch.nn.Module:
    """The federation's head refit (server/lda.py) on the baseline's own training
    images, kept only if it scores higher on validation, as the server keeps it."""
    try:
        refit = with_lda_head(model, torch.from_numpy(train[0]), train[1], len(classes))
    except ValueError as err:
        console.print(f"  {label}: head refit (LDA) not possible ({err}); head kept")
        return model
    after = _score(refit, *validation, classes) if len(validation[1]) else float("nan")
    kept = after > before  # NaN never wins
    console.print(
        f"  {label}: head refit (LDA), validation balanced accuracy {before:.3f} -> "
        f"{after:.3f}, {'refitted head kept' if kept else 'previous head kept'}"
    )
    return refit if kept else model


def score_on_sites(model: torch.nn.Module, sites: list[SiteData]) -> dict[str, float]:
    """Test balanced accuracy of one model on every site's test split."""
    return {s.site: _score(model, s.images["test"], s.labels["test"], s.classes) for s in sites}


def _baseline_row(
    run: RunConfig, fit_on: list[SiteData], sites: list[SiteData], label: str
) -> dict[str, float]:
    """One baseline's row: its test bacc at every site, on the pooled test, and its time."""
    t0 = time.time()
    model = fit_baseline(run, fit_on, label)
    x, y = _split(sites, "test")
    return {
        **score_on_sites(model, sites),
        POOLED_TEST: _score(model, x, y, sites[0].classes),
        SECONDS: time.time() - t0,
    }


def run_baselines(run: RunConfig, local: bool = True) -> pd.DataFrame:
    """Rows: pooled, and one local model per site; columns: per-site test bacc, the mean over
    sites, the pooled test and the seconds it took."""
    sites = load_all_sites(run)
    lda = "+lda" if run.head_calibration == "lda" else ""
    rows = [{"method": f"pooled{lda}", **_baseline_row(run, sites, sites, "pooled baseline")}]
    if local:
        for s in sites:
            row = _baseline_row(run, [s], sites, f"local {s.site}")
            rows.append({"method": f"local{lda} ({s.site})", **row})
    return _with_mean(pd.DataFrame(rows))


POOLED_TEST, SECONDS = "pooled test", "seconds"  # the columns that are not sites


def _with_mean(df: pd.DataFrame) -> pd.DataFrame:
    site_cols = [c for c in df.columns if c not in ("method", POOLED_TEST, SECONDS)]
    df["mean"] = df[site_cols].mean(axis=1)
    return df


def federated_row(test: FinalTest, label: str, seconds: float = float("nan")) -> dict:
    """A federated run's row: each site's and the pooled test balanced accuracy."""
    return {
        "method": label,
        **{s: m.balanced_accuracy for s, m in test.sites.items()},
        POOLED_TEST: test.pooled.balanced_accuracy,
        SECONDS: seconds,
    }


def comparison_table(rows: pd.DataFrame) -> Table:
    table = Table(title="Test balanced accuracy per site (FLamby-style)")
    for col in rows.columns:
        table.add_column(str(col), justify="left" if col == "method" else "right")
    for _, r in rows.iterrows():
        table.add_row(*[_cell(c, r[c]) for c in rows.columns])
    return table


def _cell(column: str, value: Any) -> str:
    if column == "method":
        return str(value)
    return f"{value:.0f}" if column == SECONDS else f"{value:.3f}"


def _reuse_fedavg(fedavg_dir: Path, run_dir: Path) -> bool:
    """``finetune`` trains exactly as FedAvg does (it fine-tunes at the test only): start it
    from the FedAvg run of this comparison, so that only the fine-tuning is paid again."""
    if not (fedavg_dir / "checkpoints" / "last.pt").is_file():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(fedavg_dir, run_dir)
    return True


def compare(
    config: Path | None,
    overrides: str | None,
    strategies: list[str],
    out: Path,
    local: bool = True,
) -> pd.DataFrame:
    """Pooled, local and each federated method on the same manifest: one table.

    A method is a strategy (fedavg, fedprox, ...) or a personalised method (fedbn, finetune,
    ditto: FedAvg with ``personalize=<method>``, scored by the sites' personalised models).
    """
    from common.names import PERSONALIZE
    from simulations.runner import (
        parse_overrides,
        prepare_data,
        resolve_run_config,
        simulate,
    )

    out.mkdir(parents=True, exist_ok=True)
    base = parse_overrides(overrides)
    personal = str(base.get("personalize", ""))
    rows = []
    methods = list(dict.fromkeys(strategies))  # one row per method
    if "finetune" in methods and "fedavg" in methods and not personal:  # FedAvg first: reused
        methods.remove("fedavg")
        methods.insert(methods.index("finetune"), "fedavg")
    for method in methods:
        if method in PERSONALIZE[1:]:
            run, label = {**base, "strategy": "fedavg", "personalize": method}, method
            if method in ("fedbn", "ditto"):  # scored with personal models: no global head
                run["head-calibration"] = "none"
        else:  # a personalize= given in --run-config applies, and shows in the label
            run, label = {**base, "strategy": method}, "+".join(filter(None, [method, personal]))
            if resolve_run_config(config, run).head_calibration == "lda":
                label += "+lda"  # the row's model has the refitted head (server/lda.py)
        t0 = time.time()
        reuse = method == "finetune" and "fedavg" in methods and not personal
        reuse = reuse and _reuse_fedavg(out / "fedavg", out / method)
        if reuse:
            console.print("finetune: FedAvg's rounds reused; the sites fine-tune its best model")
        metrics = simulate(config, run, out=out / method, force_resume=reuse)
        test = RunResults.from_json(metrics, out / method / "metrics.json").finished()
        rows.append(federated_row(test, label, time.time() - t0))
    prepared, _ = prepare_data(resolve_run_config(config, base))
    table = pd.concat([run_baselines(prepared, local=local), _with_mean(pd.DataFrame(rows))])
    extra = ("method", "mean", POOLED_TEST, SECONDS)
    table = table[
        [
            "method",
            *sorted(c for c in table.columns if c not in extra),
            "mean",
            POOLED_TEST,
            SECONDS,
        ]
    ]
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(out / "comparison.md", markdown_table(table))
    atomic_write_json(out / "comparison.json", table.to_dict(orient="records"), indent=1)
    console.print(comparison_table(table))
    return table


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join(
        "| " + " | ".join(_cell(c, v) for c, v in zip(df.columns, r, strict=True)) + " |\n"
        for r in df.itertuples(index=False)
    )
    return head + body
