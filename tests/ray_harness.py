"""Start and stop real Ray nodes with ``ray start`` on this machine (loopback), for tests.

Each ``ray start`` runs in a session of its own, and :func:`stop_sessions` stops exactly
the processes of those sessions, by pid (never ``ray stop``, which would also stop any
other Ray on the machine). Used by tests/test_ray_cluster.py (a two-node cluster) and by
conftest.py (one head node that the session's simulations share).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

RAY_CLI = next(
    (str(p) for p in (Path(sys.executable).with_name("ray"),) if p.is_file()),
    shutil.which("ray"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (Linux /proc; the ``ray start`` we began)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_sessions(sids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after ``grace``
    seconds; returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for sid in sids:
            for pid in session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + wait
        while time.time() < deadline and any(session_pids(s) for s in sids):
            time.sleep(0.2)
    return [pid for sid in sids for pid in session_pids(sid)]


def ray_start(args: list[str], log: Path, env: dict[str, str]) -> int:
    """Run ``ray start`` in a new session; returns the session id (its pid)."""
    assert RAY_CLI is not None, "the `ray` command is not installed"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [RAY_CLI, "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        raise RuntimeError(f"ray start {args[0]} failed ({rc}):\n{log.read_text()[-3000:]}")
    return proc.pid


def head_args(temp_dir: Path, num_cpus: int | None = None) -> list[str]:
    """``ray start`` arguments for a head node on 127.0.0.1, every port picked free now."""
    args = ["--head", "--port", str(free_port()), "--node-ip-address", "127.0.0.1"]
    args += ["--include-dashboard", "false", "--dashboard-port", str(free_port())]
    args += ["--ray-client-server-port", str(free_port())]
    args += ["--dashboard-agent-listen-port", str(free_port())]
    args += ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus), "--num-gpus", "0"]
    return args


def ray_env() -> dict[str, str]:
    """The environment for ``ray start``: this one, without RAY_ADDRESS, no usage stats."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@contextmanager
def on_ray(address: str | None) -> Iterator[None]:
    """``RAY_ADDRESS=address`` for the block (unchanged if None): for module-scoped fixtures,
    ``with on_ray(ray_head): simulate(...)`` (conftest.py's ``ray_head``)."""
    with pytest.MonkeyPatch.context() as mp:
        if address:
            mp.setenv("RAY_ADDRESS", address)
        yield
