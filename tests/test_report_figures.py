"""The run report's figures, checked from the figures' own data (server/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest

from server import report
from server.report import LOSS_NAMES, history_frame, plot_confusion, plot_learning_curves
from server.results import HeadCalibration, RunResults, load_results

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SITES = ("rosendahl", "vidir_modern")


def _rounds(n: int, dp: bool = False) -> list[dict[str, Any]]:
    out = []
    for r in range(1, n + 1):
        record: dict[str, Any] = {
            "round": r,
            "seconds": 1.0,
            "validation": {
                "global": {"balanced_accuracy": 0.2 + 0.04 * r, "accuracy": 0.5},
                "mean_site_balanced_accuracy": 0.3,
                "sites": {s: {"balanced_accuracy": 0.15 + 0.03 * r} for s in SITES},
            },
            "train": {s: {} if dp else {"train_loss": 2.0 / r} for s in SITES},
        }
        if dp:
            record["epsilon"] = {s: 0.5 * r for s in SITES}
        out.append(record)
    return out


def _history(n: int, dp: bool = False) -> Any:
    """The history table of ``n`` rounds, from their records as metrics.json holds them."""
    return history_frame(RunResults.of({}, CLASSES, _rounds(n, dp), None, 0).rounds)


def _confusion() -> np.ndarray:
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 30, size=(len(CLASSES), len(CLASSES)))
    np.fill_diagonal(conf, 90)
    conf[3] = 0  # a class without test images: its row stays 0, not NaN
    return conf


def _visible_xticks(ax: Any) -> np.ndarray:
    lo, hi = ax.get_xlim()
    ticks = np.asarray(ax.get_xticks())
    return ticks[(ticks >= lo) & (ticks <= hi)]


def _line(ax: Any, gid: str) -> Any:
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


@pytest.mark.parametrize("n_rounds", [3, 7, 40])
def test_learning_curves_have_integer_round_ticks_best_round_and_chance(tmp_path, n_rounds):
    hist = _history(n_rounds)
    best = max(1, n_rounds - 2)
    fig = plot_learning_curves(
        hist, tmp_path / "lc.png", best_round=best, num_classes=len(CLASSES), loss="focal"
    )
    assert (tmp_path / "lc.png").stat().st_size > 0
    acc, loss = fig.axes[:2]
    for ax in (acc, loss):
        ticks = _visible_xticks(ax)
        assert len(ticks) >= 2
        assert np.array_equal(ticks, np.round(ticks)), ticks
        line = _line(ax, "best-round")
        assert list(line.get_xdata()) == [best, best]
    chance = [line for line in acc.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1
    assert np.allclose(chance[0].get_ydata(), 1 / len(CLASSES))
    assert acc.get_ylim() == (0, 1)
    # the loss axis names the run's loss
    assert "focal" in loss.get_ylabel()
    assert LOSS_NAMES["focal"] in loss.get_title()
    # no head refit kept: no marker
    assert not [line for line in acc.get_lines() if line.get_gid() == "head-refit"]


def test_a_kept_head_refit_is_a_marker_after_the_last_round(tmp_path):
    hist = _history(5)
    kept = {"kept": True, "validation_before": 0.4, "validation_after": 0.47, "sites": ["a"]}
    fig = plot_learning_curves(
        hist,
        tmp_path / "lc.png",
        best_round=5,
        num_classes=7,
        head_calibration=HeadCalibration.model_validate(kept),
    )
    marker = _line(fig.axes[0], "head-refit")
    assert marker.get_label() == "head refit"
    (x,), (y,) = marker.get_xdata(), marker.get_ydata()
    assert 5 < x < 6 and y == pytest.approx(0.47)
    assert x <= fig.axes[0].get_xlim()[1]
    assert 6 not in _visible_xticks(fig.axes[0])  # no round 6 that was never run
    not_kept = HeadCalibration.model_validate({**kept, "kept": False})
    fig = plot_learning_curves(hist, tmp_path / "lc.png", best_round=5, head_calibration=not_kept)
    assert not [line for line in fig.axes[0].get_lines() if line.get_gid() == "head-refit"]


def test_dp_run_without_train_loss_still_draws(tmp_path):
    hist = _history(4, dp=True)
    fig = plot_learning_curves(hist, tmp_path / "lc.png", best_round=2, num_classes=7)
    texts = " ".join(t.get_text() for t in fig.axes[1].texts)
    assert "no train loss" in texts
    assert len(fig.axes) == 3  # the epsilon axis


def test_confusion_colours_by_row_share_with_counts_n_and_round(tmp_path):
    conf = _confusion()
    fig = plot_confusion(conf, CLASSES, tmp_path / "c.png", round_tested=4)
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    expected = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    assert np.allclose(shown, expected)
    assert np.allclose(np.diag(shown)[[0, 1, 2, 4]], np.diag(expected)[[0, 1, 2, 4]])
    assert not np.isnan(shown).any()
    assert fig.axes[1].get_ylabel() == "share of the true class"  # the colourbar
    cells = {(int(t.get_position()[1]), int(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert all(cells[i, j] == str(conf[i, j]) for i in range(7) for j in range(7))
    title = ax.get_title()
    assert f"n={int(conf.sum())}" in title and "round 4" in title
    assert "head refit" not in title
    fig = plot_confusion(conf, CLASSES, tmp_path / "c.png", "External: isic2020 test")
    assert fig.axes[0].get_title().startswith("External: isic2020 test\nn=")


def test_write_outputs_passes_best_round_classes_loss_and_refit(tmp_path, monkeypatch):
    drawn: dict[str, Any] = {}

    def keep(name: str, plot: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            drawn[name] = plot(*args, **kwargs)
            return drawn[name]

        return wrapper

    monkeypatch.setattr(report, "plot_learning_curves", keep("lc", plot_learning_curves))
    monkeypatch.setattr(report, "plot_confusion", keep("conf", plot_confusion))
    conf = _confusion()
    head = {"kept": True, "validation_before": 0.4, "validation_after": 0.5, "sites": ["a"]}
    test = {
        "global": {"n": int(conf.sum()), "balanced_accuracy": 0.5},
        "sites": {"a": {"num-examples": int(conf.sum())}},
        "confusion": conf.tolist(),
        "best_round": 3,
        "head_calibration": head,
    }
    cfg = {"run-name": "t", "loss": "weighted-ce"}
    report.write_outputs(tmp_path, RunResults.of(cfg, CLASSES, _rounds(5), test, 3))
    acc, loss = drawn["lc"].axes[:2]
    assert list(_line(acc, "best-round").get_xdata()) == [3, 3]
    chance = [line for line in acc.get_lines() if line.get_label().startswith("chance")]
    assert np.allclose(chance[0].get_ydata(), 1 / 7)
    assert "weighted-ce" in loss.get_ylabel()
    assert _line(acc, "head-refit").get_ydata()[0] == pytest.approx(0.5)
    title = drawn["conf"].axes[0].get_title()
    assert f"n={int(conf.sum())}" in title and "round 3 + head refit" in title
    # redrawn from metrics.json alone: the same figures
    drawn.clear()
    for png in tmp_path.glob("*.png"):
        png.unlink()
    report.write_outputs(tmp_path, load_results(tmp_path))
    written = sorted(tmp_path.glob("*.png"))
    assert sorted(p.name for p in written) == ["confusion_test.png", "learning_curves.png"]
    assert list(_line(drawn["lc"].axes[0], "best-round").get_xdata()) == [3, 3]
    assert "round 3 + head refit" in drawn["conf"].axes[0].get_title()
    assert all(Path(p).stat().st_size > 0 for p in written)


def _svg_texts(path: Path) -> str:
    """Every text of an SVG (matplotlib writes text as <text> with svg.fonttype none)."""
    root = ElementTree.parse(path).getroot()
    return "\n".join("".join(node.itertext()) for node in root.iterfind(".//{*}text"))


def test_every_figure_has_an_svg_beside_its_png_with_the_same_text(tmp_path):
    conf = _confusion()
    fig = plot_confusion(conf, CLASSES, tmp_path / "c.png", round_tested=4)
    svg = _svg_texts(tmp_path / "c.svg")
    for line in fig.axes[0].get_title().split("\n"):
        assert line in svg, (line, svg[:300])
    assert all(str(conf[i, j]) in svg.split() for i in range(7) for j in range(7))
    fig = plot_learning_curves(_history(4), tmp_path / "lc.png", best_round=2)
    svg = _svg_texts(tmp_path / "lc.svg")
    ticks = [f"{t:g}" for t in _visible_xticks(fig.axes[0])]
    assert ticks and all(t in svg.split() for t in ticks), (ticks, svg)
    assert fig.axes[1].get_ylabel() in svg
    # the same figure, the same bytes: a paper's repository does not churn
    first = (tmp_path / "c.svg").read_bytes()
    plot_confusion(conf, CLASSES, tmp_path / "c.png", round_tested=4)
    assert (tmp_path / "c.svg").read_bytes() == first
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
