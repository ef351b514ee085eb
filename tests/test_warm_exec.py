"""The warm ClientApp launcher (``fedskin site-exec``, client/warm_exec.py) on real processes.

The deployment-overhead benchmark's warm federation (simulations/deploy_overhead.py), here
one SuperNode in ``--isolation process`` served by its launcher that signs with a SuperExec
auth secret, runs one round of the real fedskin app: every message is handled by a child
forked from the warm launcher (no ``flwr-clientapp`` process is started), the site trains
and is evaluated, and nothing outlives teardown. (Three warm sites, as the deployment guide
starts them: tests/test_integration_deploy.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulations.deploy_overhead import copy_project, make_site_data, run_mode

pytestmark = pytest.mark.integration

SITES = ["site-a"]  # one: the guide's federation runs three (test_integration_deploy)
# One query, one train, one validation and one test message per site.
MESSAGES_PER_SITE = 4


def test_warm_launcher_runs_every_message_in_a_forked_child(tmp_path: Path) -> None:
    make_site_data(tmp_path, [*SITES, "site-b"], n_images=200)  # a partition has 2+ sites
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


# --------------------------------------------------------------------------------------
# Only the SuperNode is served, and only the installed ClientApp runs (a fake Runtime API
# on a loopback port, tests/fake_runtime.py, plays the impostor of the security audit).

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Impostor:
    """A fake Runtime API (its own process) serving a FAB whose ClientApp writes ``marker``."""

    popen: subprocess.Popen[bytes]
    address: str
    record: Path
    marker: Path

    def requests(self) -> list[dict]:
        text = self.record.read_text() if self.record.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def fabs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A FAB built by Flower's own build code from a copy of the installed project whose
    client/client_app.py writes a marker file when imported."""
    from tests.fake_runtime import copy_app, malicious_fab

    work = tmp_path_factory.mktemp("fabs")
    marker = work / "marker"
    evil = malicious_fab(copy_app(REPO, work / "evil"), marker)
    (work / "evil.fab").write_bytes(evil)
    return {
        "evil": evil,
        "evil_path": work / "evil.fab",
        "marker": marker,
    }


@pytest.fixture
def impostor(fabs: dict, tmp_path: Path) -> Iterator[Impostor]:
    from client.peer_check import tcp_listeners
    from tests.deploy_harness import base_env, free_port

    port = free_port()
    record = tmp_path / "impostor.jsonl"
    argv = [sys.executable, "-m", "tests.fake_runtime", "--port", str(port)]
    argv += ["--fab", str(fabs["evil_path"]), "--record", str(record)]
    popen = subprocess.Popen(argv, cwd=REPO, env=base_env(tmp_path / "flwr-home"))
    try:
        deadline = time.monotonic() + 60
        while not tcp_listeners(port):
            assert popen.poll() is None and time.monotonic() < deadline, "fake did not start"
            time.sleep(0.1)
        yield Impostor(popen, f"127.0.0.1:{port}", record, fabs["marker"])
    finally:
        popen.terminate()
        popen.wait(10)
    assert not fabs["marker"].exists(), "the impostor's ClientApp ran"


def test_flowers_own_clientapp_runs_the_impostors_fab(impostor: Impostor, tmp_path) -> None:
    """The audit's finding, reproduced with Flower's stock ``flwr-clientapp`` (what site-exec
    used to fork): given the impostor's task token it installs the FAB and imports its code.
    This makes sure the impostor below is a real attack."""
    from tests.deploy_harness import BIN, base_env

    env = base_env(tmp_path / "flwr-home")
    argv = [str(BIN / "flwr-clientapp"), "--runtime-api-address", impostor.address]
    subprocess.run(
        [*argv, "--token", "evil-token", "--insecure"],
        env=env, cwd=tmp_path, capture_output=True, timeout=180,
    )  # fmt: skip
    assert impostor.marker.exists(), impostor.requests()
    impostor.marker.unlink()  # the fixture checks that nothing else wrote it


def _serve(launcher, seconds: float) -> None:
    stopper = threading.Timer(seconds, lambda: setattr(launcher, "stopping", True))
    stopper.start()
    try:
        launcher.serve()
    finally:
        stopper.cancel()


def test_launcher_refuses_an_impostor_runtime_api(impostor: Impostor, caplog) -> None:
    """Default options (no --parent-pid): the listener must be a flower-supernode process of
    this user. The fake is not: nothing is sent to it (not even the signed AcquireTask),
    nothing is forked, and one log line names it."""
    from client.warm_exec import Launcher

    launcher = Launcher(
        impostor.address,
        insecure=True,
        root_certificates=None,
        auth_secret=b"the-superexec-secret",
        poll_interval=0.1,
    )
    with caplog.at_level(logging.INFO, logger="fedskin.site-exec"):
        _serve(launcher, 3.0)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # once, not once per poll
    assert f"pid {impostor.popen.pid} (uid {os.getuid()}" in refusals[0], refusals
    assert "tests.fake_runtime" in refusals[0], refusals
    assert impostor.requests() == []
    assert not launcher.children


def test_site_exec_cli_refuses_an_impostor_and_names_it(impostor: Impostor, tmp_path) -> None:
    """``fedskin site-exec --parent-pid <SuperNode>`` while another process holds the port:
    refused, with the impostor's pid, uid and command line in one line of its log."""
    from tests.deploy_harness import base_env, site_exec_argv

    supernode = subprocess.Popen(["sleep", "300"])  # stands in for the real SuperNode's pid
    log_path = tmp_path / "site-exec.log"
    try:
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                site_exec_argv(impostor.address, parent_pid=supernode.pid),
                env=base_env(tmp_path / "flwr-home"), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while "refused" not in log_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        supernode.kill()
        supernode.wait()
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if "refused" in line]
    assert len(lines) == 1, text
    assert f"served by pid {impostor.popen.pid} (uid {os.getuid()}" in lines[0], text
    assert f"not by the SuperNode pid {supernode.pid}" in lines[0], text
    assert impostor.requests() == []


def test_a_trusted_peer_still_cannot_run_its_fab(impostor: Impostor, tmp_path) -> None:
    """Told to trust the impostor's pid (say the SuperNode itself were compromised, or the
    SuperLink shipped a changed app), the launcher acquires its task and forks a child:
    the child pulls the task's inputs, refuses the FAB in one logged line, reports the task
    failed with an INVALID_FAB error reply, and runs no code of the FAB."""
    from client.warm_exec import Launcher, log

    child_log = tmp_path / "child.log"
    handler = logging.FileHandler(child_log)  # the forked child writes its lines here too
    log.addHandler(handler)
    try:
        launcher = Launcher(
            impostor.address,
            insecure=True,
            root_certificates=None,
            auth_secret=None,
            poll_interval=0.1,
            supernode_pid=impostor.popen.pid,
        )
        assert launcher.acquire() == ("evil-token", 42)
        pid = launcher.launch("evil-token", 42)
        deadline = time.monotonic() + 120
        while launcher.children and time.monotonic() < deadline:
            launcher.reap()
            time.sleep(0.1)
        assert not launcher.children, f"child {pid} still running"
        launcher.stop()
    finally:
        log.removeHandler(handler)
        handler.close()
    lines = [line for line in child_log.read_text().splitlines() if "refused the FAB" in line]
    assert len(lines) == 1, child_log.read_text()
    assert "client/client_app.py differs from the installed" in lines[0]
    requests = impostor.requests()
    outputs = [r for r in requests if r["path"].endswith("push-task-output")]
    assert len(outputs) == 1 and outputs[0]["sub_status"] == "failed", requests
    assert "site-exec refused the FAB" in outputs[0]["details"]
    errors = [e for r in requests if r["path"].endswith("push-messages") for e in r["errors"]]
    assert [e["code"] for e in errors] == [7], requests  # flwr ErrorCode.INVALID_FAB


def test_fab_policy_accepts_the_installed_app_and_refuses_any_other(fabs, tmp_path) -> None:
    """The decision on real FABs (Flower's build code): the installed project's own FAB
    passes; one changed byte, an extra file or another name is refused, unless the FAB's
    SHA-256 is on the site's allowlist (--allow-fab-hash)."""
    from client.fab_policy import FabPolicy, InstalledApp
    from tests.fake_runtime import build_fab, copy_app

    policy = FabPolicy(InstalledApp.find())
    assert policy.installed.root == REPO
    # Built just now: others may be editing this checkout while the tests run.
    assert policy.refusal(build_fab(copy_app(REPO, tmp_path / "app"))) is None

    def variant(name: str, edit) -> bytes:
        app = copy_app(REPO, tmp_path / name)
        edit(app)
        return build_fab(app)

    def one_byte(app: Path) -> None:
        module = app / "client" / "client_app.py"
        data = bytearray(module.read_bytes())
        data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
        module.write_bytes(bytes(data))

    changed = variant("changed", one_byte)
    reason = policy.refusal(changed)
    assert reason is not None and "client/client_app.py differs" in reason, reason
    extra = variant("extra", lambda app: (app / "client" / "extra.py").write_text("x = 1\n"))
    assert "client/extra.py is in the FAB but not installed" in (policy.refusal(extra) or "")

    def rename(app: Path) -> None:
        toml = app / "pyproject.toml"
        toml.write_text(toml.read_text().replace('name = "fedskin"', 'name = "fedskin2"', 1))

    assert "is not the installed 'fedskin'" in (policy.refusal(variant("renamed", rename)) or "")
    assert policy.refusal(fabs["evil"]) is not None
    assert policy.refusal(b"not a zip") is not None

    allowed = FabPolicy(policy.installed, frozenset({hashlib.sha256(changed).hexdigest()}))
    assert allowed.refusal(changed) is None
    assert allowed.refusal(fabs["evil"]) is not None


def test_the_launcher_snapshots_the_projects_modules_and_no_third_party_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a child runs is the project as imported; a library in an environment inside the
    checkout (``.venv``) is not the project's and is not hashed (torch's were: 15-25 CPU-s)."""
    from client.fab_policy import InstalledApp

    root = tmp_path / "checkout"
    (root / "fedpkg").mkdir(parents=True)
    (root / "fedpkg" / "__init__.py").write_text("X = 1\n")
    site = root / ".venv" / "lib" / "site-packages"
    (site / "thirdlib").mkdir(parents=True)
    (site / "thirdlib" / "__init__.py").write_text("Y = 2\n")
    (root / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.setuptools.packages.find]\ninclude = ["fedpkg*"]\n'
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(root))
    __import__("fedpkg")
    __import__("thirdlib")
    try:
        app = InstalledApp(root)
        app.snapshot_imports()
    finally:
        sys.modules.pop("fedpkg", None)
        sys.modules.pop("thirdlib", None)
    digest = hashlib.sha256(b"X = 1\n").hexdigest()
    assert app.imported == {"fedpkg/__init__.py": digest}
