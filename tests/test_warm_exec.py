"""The warm ClientApp launcher (``fedskin site-exec``, client/warm_exec.py) on real processes.

A loopback federation of two SuperNodes in ``--isolation process``, each served by its own
launcher that signs with a SuperExec auth secret, runs one round of the real fedskin app:
every message is handled by a child forked from the warm launcher (no ``flwr-clientapp``
process is started), every site trains and is evaluated, and nothing outlives teardown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simulations.deploy_overhead import copy_project, make_site_data, run_mode

pytestmark = pytest.mark.integration

SITES = ["site-a", "site-b"]
# One query, one train, one validation and one test message per site.
MESSAGES_PER_SITE = 4


def test_warm_launcher_runs_every_message_in_a_forked_child(tmp_path: Path) -> None:
    make_site_data(tmp_path, SITES, n_images=200)
    app = copy_project(tmp_path / "app", ref=None)  # the checkout as it is
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(b"a-long-random-secret-shared-by-supernode-and-launcher")
    r = run_mode("warm", tmp_path, app, SITES, rounds=1, auth_secret_file=secret)
    logs = {name: Path(path).read_text(errors="replace") for name, path in r["logs"].items()}
    everything = "\n".join(f"===== {n}\n{t[-4000:]}" for n, t in logs.items())

    assert not r["survivors"], r["survivors"]
    metrics = json.loads((Path(r["out"]) / "metrics.json").read_text())
    (round1,) = metrics["rounds"]
    assert sorted(round1["train"]) == SITES, everything
    assert not round1["failures"] and not round1["rejected"], round1
    assert sorted(round1["validation"]["sites"]) == SITES
    assert sorted(metrics["test"]["sites"]) == SITES
    # Every message ran in a child the launcher forked, and each child exited 0.
    for site in SITES:
        text = logs[f"site-exec-{site}"]
        forked = re.findall(r"task \d+: ClientApp pid (\d+)$", text, flags=re.M)
        exits = dict(re.findall(r"ClientApp pid (\d+) exited (-?\d+)", text))
        assert len(forked) == MESSAGES_PER_SITE, text[-4000:]
        assert exits == {pid: "0" for pid in forked}, text[-4000:]
        assert "Start `flwr-clientapp` process" not in logs[f"supernode-{site}"]
    # The benchmark saw each of them under the launchers (/proc, every 0.05 s); it may also
    # catch a short-lived process that one of them started.
    assert r["messages"] >= MESSAGES_PER_SITE * len(SITES), everything
