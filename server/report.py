"""Run-directory outputs: metrics.json, history.csv, PNG plots and a Markdown report.

Written after every round (atomically), so an interrupted run still leaves readable results.
The PNG plots are the expensive part (matplotlib layout + PNG encoding: ~0.3 s for the
learning curves on one idle core, more than a whole round of a small simulation), so callers
writing after every round can skip them with ``plots=False`` and draw them at the end; the
plots can always be redrawn from metrics.json with :func:`redraw_plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common.config import RunConfig, run_config_of  # noqa: E402
from common.rundir import RunDir, atomic_savefig, atomic_write_text  # noqa: E402


def history_frame(rounds: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per round: pooled validation metrics, per-site balanced accuracy, epsilon."""
    rows = []
    for r in rounds:
        g = r["validation"]["global"]
        row: dict[str, Any] = {
            "round": r["round"],
            "seconds": r.get("seconds", float("nan")),
            "val_balanced_accuracy": g.get("balanced_accuracy"),
            "val_accuracy": g.get("accuracy"),
            "val_auroc": g.get("auroc"),
            "val_mean_site_balanced_accuracy": r["validation"].get("mean_site_balanced_accuracy"),
            "sites_trained": len(r.get("train", {})),
        }
        # Sites under sample-level DP publish no train loss (client/client_app.py)
        losses = [m["train_loss"] for m in r.get("train", {}).values() if "train_loss" in m]
        row["train_loss"] = float(np.nanmean(losses)) if losses else float("nan")
        for site, m in r["validation"]["sites"].items():
            row[f"val_bacc[{site}]"] = m.get("balanced_accuracy")
        for site, eps in (r.get("epsilon") or {}).items():
            row[f"epsilon[{site}]"] = eps
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(
    run_dir: Path,
    cfg: dict[str, Any],
    classes: list[str],
    rounds: list[dict[str, Any]],
    test: dict[str, Any] | None,
    best_round: int,
    plots: bool = True,
) -> None:
    """Write metrics.json and history.csv (and report.md once ``test`` is known).

    ``plots`` draws the PNGs (learning curves; the test confusion matrix once ``test`` is
    known). The JSON/CSV cost milliseconds; the plots cost ~0.3-1 s each time, hence
    ``plots=False`` for the per-round writes and ``True`` (the default) for the final one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"config": cfg, "classes": classes, "rounds": rounds, "best_round": best_round}
    if test is not None:
        metrics["test"] = test
    paths = RunDir(run_dir)
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=1, default=_json_default))
    hist = history_frame(rounds)
    atomic_write_text(paths.history, hist.to_csv(index=False, float_format="%.6g"))
    if plots and len(hist):
        plot_learning_curves(hist, paths.learning_curves)
    if test is not None:
        if plots:
            plot_confusion(np.asarray(test["confusion"]), classes, paths.confusion)
        atomic_write_text(paths.report, markdown_report(cfg, hist, test, classes))


def redraw_plots(run_dir: Path) -> list[Path]:
    """Draw the PNGs of a run directory from its metrics.json (e.g. after an interrupted run).

    Returns the files written.
    """
    paths = RunDir(run_dir)
    metrics = json.loads(paths.metrics.read_text())
    written: list[Path] = []
    hist = history_frame(metrics["rounds"])
    if len(hist):
        plot_learning_curves(hist, paths.learning_curves)
        written.append(paths.learning_curves)
    if "test" in metrics:
        path = paths.confusion
        plot_confusion(np.asarray(metrics["test"]["confusion"]), metrics["classes"], path)
        written.append(path)
    return written


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def plot_learning_curves(hist: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(hist["round"], hist["val_balanced_accuracy"], "k-o", lw=2, label="pooled validation")
    for col in [c for c in hist.columns if c.startswith("val_bacc[")]:
        ax.plot(hist["round"], hist[col], "--", marker=".", label=col[9:-1])
    ax.set(xlabel="round", ylabel="balanced accuracy", title="Global model, validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(hist["round"], hist["train_loss"], "b-o", label="mean local train loss")
    ax.set(xlabel="round", ylabel="loss", title="Local training")
    ax.grid(alpha=0.3)
    eps_cols = [c for c in hist.columns if c.startswith("epsilon[")]
    if eps_cols:
        ax2 = ax.twinx()
        for col in eps_cols:
            ax2.plot(hist["round"], hist[col], ":", marker="x", label=f"ε {col[8:-1]}")
        ax2.set_ylabel("cumulative ε per site")
        ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_confusion(
    conf: np.ndarray,
    classes: list[str],
    path: Path,
    title: str = "Pooled test confusion (best round)",
) -> None:
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                int(conf[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown_report(
    cfg: RunConfig | Mapping[str, Any],
    hist: pd.DataFrame,
    test: dict[str, Any],
    classes: list[str],
) -> str:
    run, g = run_config_of(cfg), test["global"]
    lines = [
        f"# fedskin run `{run.run_name}`",
        "",
        f"Strategy **{run.strategy}**"
        + (f" with personalisation **{run.personalize}**" if run.personalize else "")
        + f", model **{run.model}** at "
        f"{run.image_size} px, {len(hist)} rounds, data `{run.data_format}` "
        f"scheme `{run.scheme}`, DP {'on' if run.dp else 'off'}.",
        "",
        f"Best round by pooled validation balanced accuracy: {test.get('best_round')}.",
        "",
        *_head_lines(test.get("head_calibration")),
        "## Test (best round)",
        "",
        "| site | n | balanced accuracy | accuracy | AUROC | AUROC mel |",
        "|---|---|---|---|---|---|",
    ]
    for site, m in test["sites"].items():
        lines.append(
            f"| {site} | {int(m.get('num-examples', 0))} | {_fmt(m.get('balanced_accuracy'))} | "
            f"{_fmt(m.get('accuracy'))} | {_fmt(m.get('auroc'))} | {_fmt(m.get('auroc_mel'))} |"
        )
    lines += [
        f"| **mean over sites** | | {_fmt(test.get('mean_site_balanced_accuracy'))} | | | |",
        f"| **pooled** | {int(g.get('n', 0))} | {_fmt(g.get('balanced_accuracy'))} | "
        f"{_fmt(g.get('accuracy'))} | {_fmt(g.get('auroc'))} | {_fmt(g.get('auroc_mel'))} |",
        "",
        "Per-class recall (pooled test): "
        + ", ".join(f"{c} {_fmt(g.get('recall_' + c))}" for c in classes),
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![confusion](confusion_test.png)",
        "",
    ]
    eps_cols = [c for c in hist.columns if c.startswith("epsilon[")]
    if eps_cols:
        last = hist[eps_cols].ffill().iloc[-1]
        head = (test.get("head_calibration") or {}).get("epsilon", {})
        lines += ["## Privacy", "", "| site | cumulative ε |", "|---|---|"]
        lines += [f"| {c[8:-1]} | {_fmt(head.get(c[8:-1], float(last[c])))} |" for c in eps_cols]
        if head:
            lines += ["", "(after the rounds and the head refit's noised statistics)"]
    return "\n".join(lines) + "\n"


def _head_lines(cal: dict[str, Any] | None) -> list[str]:
    """What ``head-calibration`` did to the best model, in one sentence (none: no lines)."""
    if not cal:
        return []
    if not cal.get("sites"):
        return ["Head calibration (LDA): no site sent usable statistics; head kept.", ""]
    verdict = "the refitted head is tested" if cal.get("kept") else "the trained head is kept"
    private = ""
    if eps := cal.get("epsilon"):
        spent = ", ".join(f"{site} {_fmt(e)}" for site, e in eps.items())
        private = (
            f" The statistics were noised (sample-level DP); each site's ε after them: {spent}."
        )
    return [
        f"Head calibration (LDA from the feature statistics of {', '.join(cal['sites'])}): "
        f"validation balanced accuracy {_fmt(cal.get('validation_before'))} -> "
        f"{_fmt(cal.get('validation_after'))}; {verdict}.{private}",
        "",
    ]
