"""What `fedskin evaluate` writes and prints: metrics.json, confusion.png, report.md and the
console table (the scoring itself: simulations/evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.fedmetrics import format_metric
from common.fileio import json_safe
from common.rundir import METRICS, REPORT, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console


def summarize(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], info: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json content: what was scored, and the pooled metrics of compute_metrics."""
    import numpy as np

    from common.metrics import compute_metrics  # lazily: sklearn is heavy

    m = compute_metrics(labels, probs, classes)
    counts = np.bincount(labels, minlength=len(classes))
    return {
        **info,
        "classes": list(classes),
        "n": len(labels),
        "balanced_accuracy": json_safe(m["balanced_accuracy"]),
        "accuracy": json_safe(m["accuracy"]),
        "auroc": json_safe(m["auroc"]),
        "auroc_mel": json_safe(m["auroc_mel"]),
        "per_class_recall": {c: json_safe(m[f"recall_{c}"]) for c in classes},
        "per_class_auroc": {c: json_safe(m[f"auroc_{c}"]) for c in classes},
        "class_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "confusion": m["confusion"],
    }


def _heading(metrics: dict[str, Any]) -> str:
    own = metrics.get("split_of") == "the run's manifest"
    return "The run's own data" if own else "External validation"


def markdown(metrics: dict[str, Any]) -> str:
    lines = [
        f"# {_heading(metrics)} on `{metrics['data_format']}`",
        "",
        f"Checkpoint `{metrics['checkpoint']}` (model **{metrics['model']}**, trained on "
        f"`{metrics['trained_on']}`), scored at {metrics['image_size']} px on "
        f"{metrics['n']} images of `{metrics['data_path']}` (split {metrics['split']} of "
        f"{metrics.get('split_of', 'the publisher')}), without any training.",
        "",
        "| balanced accuracy | accuracy | AUROC | AUROC mel |",
        "|---|---|---|---|",
        "| "
        + " | ".join(
            format_metric(metrics[k], "n/a")
            for k in ("balanced_accuracy", "accuracy", "auroc", "auroc_mel")
        )
        + " |",
        "",
        "| class | n | recall |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c} | {metrics['class_counts'][c]} | {format_metric(r, 'n/a')} |"
        for c, r in metrics["per_class_recall"].items()
    ]
    lines += ["", "n/a: undefined (no image of that class).", "", "![confusion](confusion.png)", ""]
    return "\n".join(lines)


def write_results(out: Path, metrics: dict[str, Any]) -> list[Path]:
    """metrics.json, confusion.png (the run report's plot) and report.md under ``out``."""
    import numpy as np

    from server.report import plot_confusion  # lazily: matplotlib is heavy

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / METRICS, metrics, indent=1)
    title = f"{_heading(metrics)}: {metrics.get('data_format', '')} {metrics.get('split', '')}"
    plot_confusion(
        np.asarray(metrics["confusion"]), metrics["classes"], out / "confusion.png", title
    )
    atomic_write_text(out / REPORT, markdown(metrics))
    return [out / METRICS, out / "confusion.png", out / REPORT]


def print_table(console: Console, metrics: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(
        title=f"{metrics['model']} on {metrics['data_format']} "
        f"({metrics['n']} images, split {metrics['split']})"
    )
    table.add_column("metric")
    table.add_column("n", justify="right")
    table.add_column("value", justify="right")
    for key in ("balanced_accuracy", "accuracy", "auroc"):
        table.add_row(key.replace("_", " "), str(metrics["n"]), format_metric(metrics[key], "n/a"))
    for c, r in metrics["per_class_recall"].items():
        table.add_row(f"recall {c}", str(metrics["class_counts"][c]), format_metric(r, "n/a"))
    console.print(table)
    if metrics.get("note"):
        console.print(f"note: {metrics['note']}", markup=False)
    console.print(f"results: {out} (metrics.json, confusion.png, report.md)")
