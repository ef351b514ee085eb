"""The console of ``fedskin simulate``: one line per round by default, details under ``-v``.

A real tiny run (Simulation Engine, ServerApp, ClientApp) at each verbosity, its log lines
captured from the ``fedskin`` logger and its console from stdout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.data.schema import LoadReport
from server.progress import eta_text, round_line
from simulations.runner import console, setup_logging, shown_report, simulate
from tests.helpers import SITES
from tests.ray_harness import on_ray

ROUNDS = 2
SMALL = {  # the console is under test, not learning: two local steps, no augmentation
    "builtin-images": 300,
    "image-size": 16,
    "num-server-rounds": ROUNDS,
    "model": "test_efficientnet",
    "local-steps": 2,
    "augment": False,
}
REFIT = {"head-calibration": "lda"}  # -v: the refit's evaluation is named as such
ROUND_LINE = re.compile(rf"^round (\d+)/{ROUNDS} \|")


class Lines(logging.Handler):
    """Every record the ``fedskin`` logger lets through, as (level, message)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))

    def text(self) -> list[str]:
        return [message for _, message in self.lines]


def _run(
    out: Path, ray_head: str | None, verbose: bool, extra: dict | None = None
) -> tuple[list[str], str, dict]:
    """A tiny run: its log lines, its console, its metrics."""
    logger = logging.getLogger("fedskin")
    lines = Lines()
    logger.addHandler(lines)
    mp = pytest.MonkeyPatch()
    mp.setattr(console, "record", True)  # what the runner's console printed, kept
    console.export_text(clear=True)
    try:
        with on_ray(ray_head):  # the session's Ray head node (conftest.py)
            metrics = simulate(None, SMALL | (extra or {}), out=out, verbose=verbose)
        printed = console.export_text(clear=True)
    finally:
        logger.removeHandler(lines)
        mp.undo()
        setup_logging(False)
    return lines.text(), printed, metrics


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, ray_head) -> Iterator[tuple[list[str], str, dict]]:
    yield _run(tmp_path_factory.mktemp("console") / "quiet", ray_head, verbose=False)


@pytest.fixture(scope="module")
def verbose(tmp_path_factory, ray_head) -> Iterator[tuple[list[str], str, dict]]:
    yield _run(tmp_path_factory.mktemp("console") / "verbose", ray_head, True, REFIT)


def _round_lines(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := ROUND_LINE.match(line))]


def test_default_console_has_one_line_per_round_and_no_reply_lines(quiet):
    lines, console, metrics = quiet
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert _round_lines(lines) == list(range(1, ROUNDS + 1)), lines
    assert not [line for line in lines if "replied" in line], lines
    assert "replied" not in console
    # the named steps before round 1, in order
    steps = ["loading data ...", "starting Ray", "round 1 training on "]
    where = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in steps]
    assert where == sorted(where), lines
    # the built-in set's empty ages and sexes are nothing the user can act on
    assert "empty/unknown age" not in console and "empty/unknown sex" not in console
    assert not [line for line in lines if "held-out splits" in line]
    assert "Test, best round" in console  # the per-site table at the end


def test_verbose_console_adds_each_reply(verbose):
    lines, console, metrics = verbose
    assert _round_lines(lines) == list(range(1, ROUNDS + 1)), lines
    for what in [f"round {r} training" for r in range(1, ROUNDS + 1)] + ["test"]:
        replied = [line for line in lines if line.startswith(f"{what}: ") and "replied" in line]
        assert sorted(line.split(": ")[1].split()[0] for line in replied) == SITES, what
    assert "replied" in console
    # the head refit's evaluation is named as such, not as one more round's validation
    assert metrics["test"]["head_calibration"]["sites"] == SITES
    assert [line for line in lines if line.startswith("head refit validation: ")]
    assert not [line for line in lines if line.startswith(f"round {ROUNDS + 1} ")], lines


def _said(record: dict, num_rounds: int = 10, seconds: tuple[float, ...] = ()) -> str:
    line = round_line(record, num_rounds, seconds or (record["seconds"],))
    assert "\n" not in line
    return line


def test_round_line_names_the_sites_that_failed_or_were_rejected():
    validation = {"global": {"balanced_accuracy": 0.5}, "failures": {"bern": "no reply"}}
    record = {
        "round": 3,
        "seconds": 1.25,
        "validation": validation,
        "train": {"vienna": {}},
        "failures": {"oslo": "boom", "barcelona": "no reply within 60s"},
        "rejected": {"lyon": "non-finite update"},
        "epsilon": {"vienna": 1.5, "oslo": 2.25},
    }
    line = _said(record)
    assert line.startswith("round 3/10 | val bal-acc 0.500"), line
    assert "| failed: barcelona, oslo |" in line and "| rejected: lyon |" in line, line
    assert "| validation failed: bern |" in line and "eps max 2.25" in line, line
    assert "| 1.2s |" in line or "| 1.3s |" in line, line
    assert line.endswith("| ETA 9s"), line  # 7 rounds left at 1.25 s each: 8.75 s
    quiet = _said({"round": 1, "seconds": 2.0, "validation": {"global": {}}})
    assert "failed" not in quiet and "rejected" not in quiet, quiet


def test_built_in_set_hides_empty_age_and_sex_only():
    report = LoadReport(
        "synth",
        warnings=[
            "meta.csv: 8 row(s) with empty/unknown age (normalised to NaN); first ids []",
            "meta.csv: 8 row(s) with empty/unknown sex (normalised to unknown); first ids []",
            "meta.csv: optional column 'localization' absent; filled as unknown",
        ],
    )
    assert shown_report(report, builtin=True).warnings == report.warnings[2:]
    assert shown_report(report, builtin=False).warnings == report.warnings
    assert len(report.warnings) == 3  # the load report itself keeps them


def test_round_line_gives_the_time_left_from_the_mean_round_so_far():
    record = {"round": 2, "seconds": 30.0, "validation": {"global": {}}}
    line = _said(record, num_rounds=6, seconds=(50.0, 30.0))
    assert line.endswith("| 30.0s | ETA 2m00s"), line  # 4 left at 30 s (round 1 warms up)
    line = _said(dict(record, round=3), num_rounds=6, seconds=(50.0, 30.0, 20.0))
    assert line.endswith("| ETA 1m15s"), line  # 3 left at the mean of 30 and 20 s
    last = _said({"round": 6, "seconds": 3.0, "validation": {"global": {}}}, num_rounds=6)
    assert "ETA" not in last and last.endswith("| 3.0s"), last
    assert eta_text([], 3) == "" and eta_text([59.6], 1) == "ETA 1m00s"
