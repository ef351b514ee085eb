"""Simulations on an existing Ray cluster: a real two-node cluster on this machine.

``ray start --head`` and a second ``ray start --address`` (its own raylet, temp dir and a
custom resource ``node2`` only it has) make a two-node cluster on the loopback host, each node
with one CPU. A tiny federated run then joins it through ``RAY_ADDRESS`` (what
``--ray-address`` sets) with one CPU per site, so Flower's actor pool holds one actor per
node; ``tests/ray_probe_client.py`` notes the Ray node of every message, and both nodes must
have run site work. Each ``ray start`` runs in a session of its own, and the teardown stops
exactly the processes of those sessions, by pid (never ``ray stop``, which would also stop
any other Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import RunConfig
from simulations.runner import backend_config
from tests.ray_harness import (
    RAY_CLI,
    free_port,
    head_args,
    ray_env,
    ray_start,
    stop_sessions,
)

needs_ray_cli = pytest.mark.skipif(RAY_CLI is None, reason="the `ray` command is not installed")
SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]


# ------------------------------------------------------------------ backend settings
def test_default_is_a_local_ray_with_this_machines_cpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = backend_config(4, RunConfig.from_mapping({"client-num-gpus": 0.0}))
    assert cfg["init_args"]["num_cpus"] == (os.cpu_count() or 1)
    assert "address" not in cfg["init_args"]
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own word for "start one here"
    assert "address" not in backend_config(4)["init_args"]


def test_an_address_joins_that_cluster_with_the_run_configs_resources(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    run = {"client-num-cpus": 0.5, "client-num-gpus": 0.25, "client-memory-mb": 1024}
    cfg = backend_config(96, RunConfig.from_mapping(run))
    # ray.init refuses num_cpus when it joins a cluster: the cluster's `ray start` sets them
    assert cfg["init_args"]["address"] == "10.0.0.1:6379"
    assert "num_cpus" not in cfg["init_args"]
    assert cfg["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25, "memory": 2**30}


def test_ray_address_option_of_simulate_sweep_and_compare(monkeypatch):
    import simulations.baselines as baselines
    import simulations.runner as runner
    import simulations.sweep as sweep
    from simulations.cli import app

    monkeypatch.setenv("RAY_ADDRESS", "local")  # so that the teardown restores what was here
    seen: list[str | None] = []

    def record(*args, **kwargs):
        seen.append(os.environ.get("RAY_ADDRESS"))
        raise runner.DataError("stop here")

    monkeypatch.setattr(runner, "simulate", record)
    monkeypatch.setattr(sweep, "sweep_privacy", record)
    monkeypatch.setattr(baselines, "compare", record)
    for i, cmd in enumerate((["simulate"], ["sweep", "privacy"], ["compare"])):
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        result = CliRunner().invoke(app, [*cmd, "--ray-address", f"head{i}:6379"])
        assert result.exit_code == 2, result.output
    assert seen == ["head0:6379", "head1:6379", "head2:6379"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"client-num-gpus": -0.5}, "client-num-gpus=-0.5: must be -1 (auto) or >= 0"),
        ({"client-num-gpus": 1.5}, "client-num-gpus=1.5: must be below 1 or a whole number"),
        ({"client-num-cpus": 0}, "client-num-cpus=0: must be > 0"),
    ],
)
def test_bad_client_resources_are_one_line(values, message):
    from common.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RunConfig.from_mapping(values)


# ------------------------------------------------------------------ the two-node cluster
@pytest.fixture
def two_node_cluster() -> Iterator[dict]:
    if not Path("/proc/self/stat").is_file():
        pytest.skip("stopping the cluster by session needs Linux /proc")
    # short: Ray's Unix socket paths under the temp dir must stay below 108 characters
    root = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))
    env = ray_env()
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(80 * 2**20)]
    sessions: list[int] = []
    try:
        sessions.append(ray_start(head_args(root / "head") + common, root / "head.log", env))
        address = (root / "head" / "ray_current_cluster").read_text().strip()
        sessions.append(
            ray_start(
                ["--address", address, "--resources", json.dumps({"node2": 1})]
                + ["--dashboard-agent-listen-port", str(free_port())]
                + ["--temp-dir", str(root / "node2"), "--disable-usage-stats", *common],
                root / "node2.log",
                env,
            )
        )
        yield {"address": address, "root": root, "sessions": sessions}
    finally:
        survivors = stop_sessions(sessions)
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"Ray processes still alive after the test: {survivors}"


def _alive_nodes(address: str, want: int, timeout: float = 60.0) -> dict[str, dict]:
    """Node id -> resources of the cluster's live nodes, once ``want`` of them are up."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.time() + timeout
        while True:
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            if len(nodes) >= want or time.time() > deadline:
                return nodes
            time.sleep(0.5)
    finally:
        ray.shutdown()


@needs_ray_cli
def test_sites_run_on_both_nodes_of_a_real_cluster(two_node_cluster, tmp_path, monkeypatch):
    from simulations.runner import simulate
    from tests.helpers import TINY
    from tests.ray_probe_client import NODES_DIR

    address = two_node_cluster["address"]
    nodes = _alive_nodes(address, want=2)
    assert len(nodes) == 2, nodes
    (node2,) = [n for n, res in nodes.items() if res.get("node2")]

    monkeypatch.setenv("RAY_ADDRESS", address)  # what --ray-address sets
    run_dir = tmp_path / "run"
    cfg = dict(TINY, **{"num-server-rounds": 1, "local-epochs": 1, "client-num-cpus": 1.0})
    metrics = simulate(None, cfg, out=run_dir, client_app="tests.ray_probe_client:app")

    assert sorted(metrics["rounds"][0]["train"]) == SITES
    assert sorted(metrics["test"]["sites"]) == SITES
    notes = [
        line.split()
        for f in sorted((run_dir / NODES_DIR).glob("*.txt"))
        for line in f.read_text().splitlines()
    ]
    ran_on = {node for node, _, _ in notes}
    assert ran_on == set(nodes), (ran_on, nodes)  # both nodes ran site work, node2 included
    assert node2 in ran_on
    assert {kind for _, _, kind in notes} >= {"train", "evaluate"}
    assert {int(site) for _, site, _ in notes} == set(range(len(SITES)))
    # one CPU per site and one CPU per node: Flower's pool holds one actor on each node
    assert len(list((run_dir / NODES_DIR).glob("*.txt"))) == 2
