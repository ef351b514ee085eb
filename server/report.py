"""Run-directory outputs: metrics.json, history.csv, PNG plots and a Markdown report.

Written after every round (atomically), so an interrupted run still leaves readable results;
metrics.json is the typed :class:`server.results.RunResults` (its one writer and reader).
The PNG plots are the expensive part (matplotlib layout + PNG encoding: ~0.3 s for the
learning curves on one idle core, more than a whole round of a small simulation), so callers
writing after every round can skip them with ``plots=False`` and draw them at the end; the
plots can always be redrawn from metrics.json: ``write_outputs(run_dir, load_results(run_dir))``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.fedmetrics import format_metric  # noqa: E402
from common.figures import save_figure, styled  # noqa: E402
from common.rundir import RunDir, atomic_write_text  # noqa: E402
from server.results import (  # noqa: E402
    FinalTest,
    HeadCalibration,
    RoundRecord,
    RunResults,
    Scores,
    write_results,
)


def history_frame(rounds: list[RoundRecord]) -> pd.DataFrame:
    """One row per round: pooled validation metrics, per-site balanced accuracy, epsilon."""
    rows = []
    for r in rounds:
        val = r.validation
        row: dict[str, Any] = {
            "round": r.round,
            "seconds": r.seconds,
            "val_balanced_accuracy": val.pooled.balanced_accuracy,
            "val_accuracy": val.pooled.accuracy,
            "val_auroc": val.pooled.auroc,
            "val_mean_site_balanced_accuracy": val.mean_site_balanced_accuracy,
            "sites_trained": len(r.train),
        }
        # Sites under sample-level DP publish no train loss (client/client_app.py)
        losses = [m["train_loss"] for m in r.train.values() if "train_loss" in m]
        row["train_loss"] = float(np.nanmean(losses)) if losses else float("nan")
        for site, m in val.sites.items():
            row[f"val_bacc[{site}]"] = m.balanced_accuracy
        for site, eps in (r.epsilon or {}).items():
            row[f"epsilon[{site}]"] = eps
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(run_dir: Path, results: RunResults, plots: bool = True) -> None:
    """Write metrics.json and history.csv (and report.md once the test is done).

    ``plots`` draws the PNGs (learning curves; the test confusion matrix once the test is
    done). The JSON/CSV cost milliseconds; the plots cost ~0.3-1 s each time, hence
    ``plots=False`` for the per-round writes and ``True`` (the default) for the final one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = RunDir(run_dir)
    write_results(paths.metrics, results)
    hist = history_frame(results.rounds)
    atomic_write_text(paths.history, hist.to_csv(index=False, float_format="%.6g"))
    if plots:
        _draw(paths, results, hist)
    if results.test is not None:
        report = markdown_report(results.run, hist, results.test, results.classes)
        atomic_write_text(paths.report, report)


def _draw(paths: RunDir, results: RunResults, hist: pd.DataFrame) -> list[Path]:
    """The PNGs of one run from its results: the learning curves once a round is done, the
    test confusion once the test is done."""
    written: list[Path] = []
    test = results.test
    head = test.head_calibration if test is not None else None
    if len(hist):
        plot_learning_curves(
            hist,
            paths.learning_curves,
            best_round=results.best_round or None,
            num_classes=len(results.classes) or None,
            loss=results.run.loss,
            head_calibration=head,
        )
        written.append(paths.learning_curves)
    if test is not None:
        plot_confusion(
            np.asarray(test.confusion),
            results.classes,
            paths.confusion,
            round_tested=test.best_round or results.best_round or None,
            head_refit=_refit_point(head) is not None,
        )
        written.append(paths.confusion)
    return written


# What each ``loss`` key trains with, for the loss axis (common/losses.py)
LOSS_NAMES = {
    "ce": "cross-entropy",
    "weighted-ce": "class-weighted cross-entropy",
    "focal": "focal loss",
    "weighted-focal": "class-weighted focal loss",
    "balanced-softmax": "balanced-softmax cross-entropy",
}


def _refit_point(head: HeadCalibration | None) -> float | None:
    """The refitted model's validation score, when the head refit was kept (else None)."""
    if head is None or not head.kept:
        return None
    after = head.validation_after
    return None if after is None or not math.isfinite(float(after)) else float(after)


@styled
def plot_learning_curves(
    hist: pd.DataFrame,
    path: Path,
    *,
    best_round: int | None = None,
    num_classes: int | None = None,
    loss: str = "",
    head_calibration: HeadCalibration | None = None,
) -> Figure:
    """learning_curves.png: validation balanced accuracy per round (pooled and per site)
    and the mean local training loss; returns the (closed) figure.

    Rounds are whole-number ticks. ``best_round`` (the round the test uses) is a vertical
    line, ``num_classes`` K draws chance (1/K) on the balanced-accuracy axis, ``loss`` (the
    run's ``loss`` key) names the training loss, and a kept head refit
    (``head_calibration.kept``) is its own marker after the last round.
    """
    from matplotlib.ticker import MaxNLocator

    rounds = hist["round"].to_numpy()
    last = int(rounds.max()) if len(rounds) else 0
    refit = _refit_point(head_calibration)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(rounds, hist["val_balanced_accuracy"], "k-o", lw=2, label="pooled validation")
    for col in [c for c in hist.columns if c.startswith("val_bacc[")]:
        ax.plot(rounds, hist[col], "--", marker=".", alpha=0.8, label=col[9:-1])
    if num_classes:
        ax.axhline(1 / num_classes, color="grey", ls=":", lw=1, label=f"chance (1/{num_classes})")
    if refit is not None:
        ax.plot([last + 0.5], [refit], "r*", ms=12, ls="none", label="head refit", gid="head-refit")
        ax.annotate(
            "head refit",
            (last + 0.5, refit),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=7,
            color="red",
        )
    ax.set_ylim(0, 1)
    ax.set(xlabel="round", ylabel="balanced accuracy (validation)")
    ax.set_title("Global model, validation")
    ax = axes[1]
    named = LOSS_NAMES.get(loss, loss)
    ylabel = f"train loss ({loss})" if loss else "train loss"
    title = f"Local training: {named}" if loss else "Local training"
    ax.plot(rounds, hist["train_loss"], "b-o", label="mean local train loss")
    if hist["train_loss"].isna().all():
        ax.text(
            0.5,
            0.5,
            "no train loss reported\n(sites under sample-level DP publish none)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="grey",
        )
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    eps_cols = [c for c in hist.columns if c.startswith("epsilon[")]
    if eps_cols:
        ax2 = ax.twinx()
        for col in eps_cols:
            ax2.plot(rounds, hist[col], ":", marker="x", label=f"ε {col[8:-1]}")
        ax2.set_ylabel("cumulative ε per site")
        ax2.legend(fontsize=7, loc="upper right")
    for ax in axes:
        if best_round:
            ax.axvline(
                best_round,
                color="green",
                ls="--",
                lw=1,
                label=f"best round ({best_round})",
                gid="best-round",
            )
            ax.annotate(
                f"best round {best_round}",
                (best_round, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=7,
                color="green",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(rounds):
            ax.set_xlim(min(0.5, rounds.min() - 0.5), last + (0.8 if refit is not None else 0.5))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


@styled
def plot_confusion(
    conf: np.ndarray,
    classes: list[str],
    path: Path,
    title: str | None = None,
    *,
    round_tested: int | None = None,
    head_refit: bool = False,
) -> Figure:
    """A confusion matrix coloured by each true class's share (its recall on the diagonal),
    counts in the cells; the title gives n (and the round of the model tested, if known).
    Returns the (closed) figure."""
    conf = np.asarray(conf)
    rows = conf.sum(axis=1)
    norm = conf / np.maximum(rows[:, None], 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * k, 1.2 + 0.6 * k))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({int(n)})" for c, n in zip(classes, rows, strict=True)])
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                int(conf[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    tested = f"n={int(conf.sum())}"
    if round_tested:
        tested += f", model of round {round_tested}" + (" + head refit" if head_refit else "")
    ax.set_title(f"{title or 'Pooled test confusion'}\n{tested}", fontsize=10)
    ax.set(xlabel="predicted", ylabel="true class (n)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def markdown_report(run: RunConfig, hist: pd.DataFrame, test: FinalTest, classes: list[str]) -> str:
    g = test.pooled
    lines = [
        f"# fedskin run `{run.run_name}`",
        "",
        f"Strategy **{run.strategy}**"
        + (f" with personalisation **{run.personalize}**" if run.personalize else "")
        + f", model **{run.model}** at "
        f"{run.image_size} px, {len(hist)} rounds, data `{run.data_format}` "
        f"scheme `{run.scheme}`, DP {'on' if run.dp else 'off'}.",
        "",
        f"Best round by pooled validation balanced accuracy: {test.best_round}.",
        "",
        *_head_lines(test.head_calibration),
        "## Test (best round)",
        "",
        "| site | n | balanced accuracy | accuracy | AUROC | AUROC mel |",
        "|---|---|---|---|---|---|",
    ]
    for site, m in test.sites.items():
        lines.append(_table_row(site, int(m.num_examples), m))
    mean_site = format_metric(test.mean_site_balanced_accuracy)
    lines += [
        f"| **mean over sites** | | {mean_site} | | | |",
        _table_row("**pooled**", int(g.n), g),
        "",
        "Per-class recall (pooled test): "
        + ", ".join(f"{c} {format_metric(g.metric('recall_' + c))}" for c in classes),
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![confusion](confusion_test.png)",
        "",
    ]
    eps_cols = [c for c in hist.columns if c.startswith("epsilon[")]
    if eps_cols:
        last = hist[eps_cols].ffill().iloc[-1]
        head = test.head_calibration.epsilon if test.head_calibration else {}
        lines += ["## Privacy", "", "| site | cumulative ε |", "|---|---|"]
        lines += [
            f"| {c[8:-1]} | {format_metric(head.get(c[8:-1], float(last[c])))} |" for c in eps_cols
        ]
        if head:
            lines += ["", "(after the rounds and the head refit's noised statistics)"]
    return "\n".join(lines) + "\n"


def _table_row(name: str, n: int, scores: Scores) -> str:
    """One row of the test table: name, n and the four headline metrics."""
    keys = ("balanced_accuracy", "accuracy", "auroc", "auroc_mel")
    return f"| {name} | {n} | " + " | ".join(format_metric(scores.metric(k)) for k in keys) + " |"


def _head_lines(cal: HeadCalibration | None) -> list[str]:
    """What ``head-calibration`` did to the best model, in one sentence (none: no lines)."""
    if cal is None:
        return []
    if not cal.sites:
        return ["Head calibration (LDA): no site sent usable statistics; head kept.", ""]
    verdict = "the refitted head is tested" if cal.kept else "the trained head is kept"
    private = ""
    if eps := cal.epsilon:
        spent = ", ".join(f"{site} {format_metric(e)}" for site, e in eps.items())
        private = (
            f" The statistics were noised (sample-level DP); each site's ε after them: {spent}."
        )
    return [
        f"Head calibration (LDA from the feature statistics of {', '.join(cal.sites)}): "
        f"validation balanced accuracy {format_metric(cal.validation_before)} -> "
        f"{format_metric(cal.validation_after)}; {verdict}.{private}",
        "",
    ]
