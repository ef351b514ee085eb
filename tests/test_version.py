"""fedskin's version: ``fedskin --version``, and a site of another version named at discovery
(common/version.py, server/discovery.py, server/replies.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict
from typer.testing import CliRunner

from common.config import RunConfig
from common.version import ROOT, git_describe, source_checkout, version
from server.loop import Federation
from server.replies import MAX_VERSION, discovery_error
from simulations.cli import app
from tests.test_replies import CLASSES, FakeGrid, Site, honest_info, honest_sites


@pytest.fixture(autouse=True, scope="module")
def _task_identity() -> None:
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """The fedskin logger's records (the runner may have stopped its propagation)."""
    out: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = out.append  # type: ignore[method-assign]
    logger = logging.getLogger("fedskin")
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level=: it clears the loggers' caches
    logger.addHandler(handler)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def _with_version(value: Any):
    def tamper(content: RecordDict) -> RecordDict:
        content["info"] = ConfigRecord({**dict(content.config_records["info"]), "version": value})
        return content

    return tamper


def test_version_option_prints_the_version_and_exits_0() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == version()
    assert version().startswith(metadata.version("fedskin"))


def test_version_outside_a_checkout_is_the_package_version(tmp_path: Path) -> None:
    assert git_describe(tmp_path) is None  # no .git: no git run at all


def test_a_site_of_another_version_is_kept_and_named(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    sites = honest_sites()
    sites.append(Site("delta", 30, query=_with_version("0.0.9 (git abc1234)")))
    for site in sites[:3]:
        site.query = _with_version(version())  # same version as the server: no warning
    fed = Federation(FakeGrid(sites), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    kept = fed.discover(expected=4, wait=0)
    assert [s.site for s in kept] == ["alpha", "bravo", "charlie", "delta"]
    assert not fed.discovery_rejected
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == [f"site delta runs fedskin 0.0.9 (git abc1234), the server {version()}"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (7, "version=7 is not a non-empty string"),
        ("", "version='' is not a non-empty string"),
        ("1" * (MAX_VERSION + 1), f"is not a printable string of at most {MAX_VERSION}"),
        ("0.1.0\x1b[2J", f"is not a printable string of at most {MAX_VERSION}"),
    ],
)
def test_a_bad_version_is_rejected_by_name(
    value: Any, reason: str, tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    assert reason in (discovery_error(_with_version(value)(honest_info("a", 3))) or "")
    sites = [*honest_sites(), Site("mallory", 30, query=_with_version(value))]
    fed = Federation(FakeGrid(sites), RunConfig.defaults(), tmp_path, CLASSES)  # type: ignore[arg-type]
    kept = fed.discover(expected=3, wait=0)
    assert [s.site for s in kept] == ["alpha", "bravo", "charlie"]
    (who,) = fed.discovery_rejected
    assert who == "node 103 (site 'mallory')" and reason in fed.discovery_rejected[who]
    assert not any("runs fedskin" in r.getMessage() for r in records)


def test_an_honest_reply_may_carry_a_version_or_none() -> None:
    assert discovery_error(honest_info("a", 3)) is None
    assert discovery_error(_with_version(version())(honest_info("a", 3))) is None
    assert discovery_error(_with_version("1" * MAX_VERSION)(honest_info("a", 3))) is None


def test_an_app_unpacked_elsewhere_reports_the_installed_checkout(tmp_path: Path) -> None:
    """Flower runs the ServerApp from an unpacked FAB, a folder without .git: its version is
    that of the checkout installed with ``pip install -e`` (this one), as the sites'
    installed ClientApp reports it, not the bare package version."""
    if not (ROOT / ".git").exists():
        pytest.skip("not run from a git checkout")
    assert source_checkout(ROOT) == ROOT
    assert source_checkout(tmp_path) == ROOT  # the editable install of this checkout
