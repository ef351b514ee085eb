"""A restarted SuperNode keeps the privacy budget its site spent (real processes).

One site under sample-level DP, as a hospital would deploy it: ``dp=true``, its own small
``target-epsilon`` and its own ``state-dir`` in the SuperNode's ``--node-config``, behind a
TLS SuperLink with SuperNode authentication (the commands of docs/deployment.md, step 5b:
``--isolation process`` and its ``fedskin site-exec`` launcher, via the helpers of
tests/test_integration_deploy.py). A one-round run spends the whole budget (the noise is
planned for one round); the SuperNode and its launcher are then stopped and new
``flower-supernode`` and ``fedskin site-exec`` processes started with the same node config;
the run is resumed with a second round. The restarted site reads its accountant back from
``state-dir``: it reports the epsilon it had spent (not 0.00) and refuses to train. Every
process is stopped in a ``finally``, also on failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.privacy import DPSession
from tests.deploy_harness import Harness, stop_procs
from tests.test_integration_deploy import (
    RUN_TIMEOUT,
    STARTUP_S,
    copy_project,
    finish,
    launch,
    make_pooled_data,
    register_sites,
    run_config,
    server_log,
    site_node_config,
    start_site,
    start_superlink,
    write_site_data,
)

pytestmark = pytest.mark.integration

SITE = "hospital-a"  # one of make_pooled_data's sites
EPSILON = 1.0  # the site's own budget, spent in full by a one-round run
# One site, one round at a time, as few steps as the app allows.
CONFIG: dict[str, object] = {
    "dp": True,  # the run is built for sample-level DP (a DP site refuses a non-DP run)
    "num-server-rounds": 1,
    "local-epochs": 1,
    "min-nodes": 1,
    "min-train-nodes": 1,
    "run-name": "dp-restart-test",
}


def _accountant(state_dir: Path) -> tuple[Path, DPSession]:
    (path,) = sorted(state_dir.glob(f"{SITE}-*-privacy.json"))  # <site>-<run-tag>-privacy
    return path, DPSession.from_json(path.read_text())


def test_restarted_supernode_keeps_its_spent_privacy_budget(tmp_path: Path) -> None:
    work = tmp_path
    harness = Harness(work)
    try:
        dep = start_superlink(harness, work, [SITE])
        superlink = dep.superlink
        register_sites(dep, [SITE])

        state_dir = dep.site_dir(SITE) / "state"
        node_config = (
            site_node_config(work, SITE, 1.0) + f" dp=true target-epsilon={EPSILON}"
        )  # site_node_config names state-dir=<site>/state
        first = start_site(dep, SITE, node_config, warm=True)
        first_launcher = dep.launchers[SITE]
        write_site_data(dep, make_pooled_data(work / "pooled"))  # while the node starts
        app = copy_project(work / "app")
        superlink.wait_for(r"Activated node_id=", STARTUP_S)

        # Run 1: one round, its noise planned for one round: the budget is spent.
        out = work / "run"
        run_a = launch(dep, app, run_config(out, **CONFIG))
        finish(dep, run_a, RUN_TIMEOUT)
        (round1,) = json.loads((out / "metrics.json").read_text())["rounds"]
        spent = round1["epsilon"][SITE]
        assert round1["aggregated"] and list(round1["train"]) == [SITE], round1
        assert 0.5 * EPSILON < spent <= EPSILON * (1 + 1e-6), round1
        file_before, session = _accountant(state_dir)
        assert session.epsilon() == pytest.approx(spent) and not session.can_train_round()

        # Stop the site's SuperNode, its launcher and everything they started; start new
        # processes, same node config and FLWR_HOME: nothing of the old ones is left in memory.
        stop_procs([first, first_launcher])
        assert first.done() and first_launcher.done(), harness.logs([first, first_launcher])
        # SIGTERM first: the SuperNode deactivates, so its key may activate again at once
        # (after a SIGKILL the SuperLink would keep it online until heartbeats expire).
        superlink.wait_for(r"Deactivated node_id=", 60)
        second = start_site(dep, SITE, node_config, warm=True, name=f"supernode-{SITE}-restarted")
        second_launcher = dep.launchers[SITE]
        assert second.popen.pid != first.popen.pid
        assert second_launcher.popen.pid != first_launcher.popen.pid
        superlink.wait_for(r"Activated node_id=", STARTUP_S, count=2)

        # Run 2: the same run resumed for a second round (same run tag, so the same file).
        run_b = launch(
            dep, app, run_config(out, **{**CONFIG, "num-server-rounds": 2, "resume": True})
        )
        finish(dep, run_b, RUN_TIMEOUT)
        logs = f"{server_log(dep, run_b)}\n{harness.logs()}"
        assert "resuming after round 1" in logs, logs
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1, 2], rounds
        round2 = rounds[1]
        # The restarted site continues from what it had spent, not from 0.00, and refuses.
        assert round2["epsilon"][SITE] == pytest.approx(spent), (spent, round2)
        assert round2["epsilon"][SITE] > 0
        assert round2["rejected"] == {SITE: "privacy budget spent"}, round2
        assert not round2["train"] and not round2["aggregated"] and not round2["failures"]
        # The site's ClientApps (forked by its launcher) say why they did not train.
        said = second_launcher.text()
        assert "privacy budget spent, not training" in said, said
        file_after, session = _accountant(state_dir)
        assert file_after == file_before and session.epsilon() == pytest.approx(spent)
        assert sum(steps for *_, steps in session.accountant.history) == session.steps_per_round
    finally:
        survivors = harness.stop_all()
    assert not survivors, f"processes survived teardown: {survivors}"
