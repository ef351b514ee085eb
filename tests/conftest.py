"""Shared fixtures: tiny synthetic data sets in each real on-disk format, and a Ray head
node that simulations may share.

The data sets are session-scoped and written once under pytest's tmp folder. Treat them as
read-only: a test that needs to damage files should copy one first
(``tests.helpers.copy_dataset``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.data.synth import synthesize
from tests.helpers import SYNTH_N, SYNTH_SIZE
from tests.ray_harness import RAY_CLI, head_args, ray_env, ray_start, stop_sessions

# ----------------------------------------------------------------- order: the slowest first
# pytest-xdist (three workers, ``--dist loadfile --no-loadscope-reorder`` in pyproject.toml)
# hands out whole files in collection order: the slowest start first, so that no long file
# is left for the end, when the others have nothing left to do. Measured with
# ``pytest --durations=60`` on a fresh clone (2026-12-07); a module not listed keeps its
# place after these. The real deployment tests come first: they partly wait for processes,
# which the other workers' simulations fill.
SLOWEST_FIRST = (
    "test_integration_deploy.py",
    "test_integration_dp_restart.py",
    "test_warm_exec.py",
    "test_simulation.py",
    "test_baselines.py",
    "test_evaluate.py",
    "test_sweep.py",
    "test_privacy.py",
    "test_tracking.py",
    "test_secagg_simulation.py",
    "test_headfit.py",
    "test_ray_cluster.py",
    "test_console.py",
    "test_personal.py",
    "test_central_dp.py",
    "test_secagg.py",
    "test_doc_commands.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files whole


def _make(tmp_path_factory: pytest.TempPathFactory, fmt: str) -> Path:
    out = tmp_path_factory.mktemp("synth") / fmt
    return synthesize(fmt, out, n_images=SYNTH_N[fmt], image_size=SYNTH_SIZE, seed=0)


@pytest.fixture(scope="session")
def synth_ham_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HAM10000 as HF parquet shards (data/{train,validation,test}-*.parquet)."""
    return _make(tmp_path_factory, "ham-hf")


@pytest.fixture(scope="session")
def synth_ham_dataverse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HAM10000 Dataverse layout: HAM10000_metadata.csv + HAM10000_images_part_{1,2}/."""
    return _make(tmp_path_factory, "ham-dataverse")


@pytest.fixture(scope="session")
def synth_isic2020(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SIIM-ISIC 2020 layout: train.csv + train/<image_name>.dcm (RGB, InstitutionName)."""
    return _make(tmp_path_factory, "isic2020")


@pytest.fixture(scope="session")
def synth_fedisic2019(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLamby Fed-ISIC2019 layout: train_test_split + preprocessed JPEGs + metadata CSV."""
    return _make(tmp_path_factory, "fedisic2019")


# ----------------------------------------------------------------- a shared Ray head node
@pytest.fixture(scope="session")
def ray_head() -> Iterator[str | None]:
    """The address of one real Ray head node on this machine (``ray start --head`` with one
    CPU), started at the first use.

    One CPU, so Flower's pool has one actor: each actor process imports torch, timm and
    Opacus (about 10 CPU-s) before its first message, while the tiny test sites train in
    well under a second each. One actor runs them all in the same wall time for about 14
    CPU-s less per run (measured: 39 instead of 53 CPU-s for a 2-round TINY run), which
    the other pytest-xdist worker gets. Runs with several actors at once are still tested
    (tests/test_ray_cluster.py, and the local Ray of runs that do not use this fixture).

    A simulation joins it through ``RAY_ADDRESS`` (what ``--ray-address`` sets; fixture
    ``shared_ray``, or ``tests.ray_harness.on_ray`` in a module-scoped fixture): it still
    starts and stops its own Flower actors, but not a whole Ray of its own (GCS, raylet,
    agents, workers: seconds of CPU per run on 2 cores). None, each run then starting its
    own Ray, without the ``ray`` command or Linux /proc. Its processes are stopped by
    session, by pid, as in tests/test_ray_cluster.py.
    """
    if RAY_CLI is None or not Path("/proc/self/stat").is_file():
        yield None
        return
    # short: Ray's Unix socket paths under the temp dir must stay below 108 characters
    root = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))
    sessions: list[int] = []
    try:
        # No log monitor: the runs join with log_to_driver off (simulations/runner.py), so
        # nothing reads the workers' logs through it, and it polls their files all session
        # (0.28 of the head's 0.95 idle CPU-s per 40 s, measured; one head per xdist worker).
        args = head_args(root / "head", num_cpus=1) + ["--include-log-monitor", "false"]
        sessions.append(ray_start(args, root / "head.log", ray_env()))
        yield (root / "head" / "ray_current_cluster").read_text().strip()
    finally:
        survivors = stop_sessions(sessions, grace=2.0)
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"Ray processes still alive after the session: {survivors}"


@pytest.fixture
def shared_ray(ray_head: str | None, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """This test's simulations run on the session's Ray head node (see ``ray_head``)."""
    if ray_head:
        monkeypatch.setenv("RAY_ADDRESS", ray_head)
    return ray_head
