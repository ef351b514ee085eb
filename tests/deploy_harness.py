"""Start, watch and stop real Flower deployment processes (SuperLink, SuperNodes, ``flwr``).

Used by the integration tests: every process runs in its own session (process group) so
teardown can end it together with the SuperExec / ServerApp / ClientApp children it
spawns; every process logs to its own file so a failing test shows what each one said.
Everything binds 127.0.0.1 on ports picked free at run time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # flower-superlink / flower-supernode / flwr of this venv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a Flower process: own FLWR_HOME, no telemetry, no runtime installs."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            # The ServerApp/ClientApp subprocesses import the app's own modules from the FAB;
            # the repo root makes `common` etc. importable without installing the project.
            "PYTHONPATH": os.pathsep.join(
                p for p in [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")] if p
            ),
        }
    )
    return env


@dataclass
class Proc:
    """A started process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until ``pattern`` appears in the log; fail early if the process died."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            found = rx.search(self.text())
            if found:
                return found
            if not self.alive():
                break
            time.sleep(0.2)
        found = rx.search(self.text())
        if found:
            return found
        state = "exited %s" % self.popen.returncode if not self.alive() else "still running"
        raise TimeoutError(
            f"{self.name} ({state}) did not log /{pattern}/ within {timeout}s. Log:\n"
            + tail(self.text())
        )

    def wait_exit(self, timeout: float) -> int | None:
        """Return the exit code, or None if it is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group (its Flower children too), SIGKILL what is left."""
        pgid = self.popen.pid  # start_new_session=True: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # Children may outlive the leader: make sure the whole group is gone.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@dataclass
class Harness:
    """Owns every process a test starts; :meth:`stop_all` is safe to call more than once."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "wb")  # noqa: SIM115 - the child owns it; closed with the process
        try:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd or self.workdir,
                start_new_session=True,
            )
        finally:
            fh.close()
        proc = Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self, procs: Iterable[Proc] | None = None) -> str:
        """All logs, for assertion messages."""
        return "\n".join(
            f"===== {p.name} =====\n{tail(p.text())}" for p in (procs or self.procs)
        )


def write_flwr_config(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None
) -> Path:
    """Write the ``flwr`` CLI config (``$FLWR_HOME/config.toml``) with one connection.

    Format from ``flwr/cli/flower_config.py`` (Flower 1.41): ``[superlink.<name>]`` with
    ``address`` and ``root-certificates`` (or ``insecure = true``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI and return its result (never raises on a non-zero exit)."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def flwr_json(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0
) -> dict[str, object]:
    """Run ``flwr ... --format json`` and parse its output; error with stdout/stderr if not."""
    res = flwr_cli([*args, "--format", "json"], env, cwd, timeout)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError as err:
        raise AssertionError(
            f"flwr {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        ) from err


def wait_run_finished(
    run_id: int, env: dict[str, str], cwd: Path, timeout: float, every: float = 1.0
) -> dict[str, object]:
    """Poll ``flwr ls --run-id`` until the run's status is finished; return that run entry."""
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        last = flwr_json(["ls", "--run-id", str(run_id)], env, cwd)
        runs = last.get("runs") or []
        if runs and str(runs[0].get("status", "")).startswith("finished"):  # type: ignore[union-attr]
            return runs[0]  # type: ignore[return-value]
        time.sleep(every)
    raise TimeoutError(f"run {run_id} not finished after {timeout}s: {last}")
