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
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
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


def site_exec_argv(
    runtime_api_address: str, parent_pid: int | None = None, auth_secret_file: Path | None = None
) -> list[str]:
    """``fedskin site-exec`` (client/warm_exec.py): the warm ClientApp launcher that serves a
    ``flower-supernode --isolation process`` whose Runtime API is ``runtime_api_address``.
    Start it with the SuperNode's environment (same ``FLWR_HOME``); ``parent_pid`` (the
    SuperNode) makes it stop when that process is gone; ``auth_secret_file`` is the
    SuperNode's ``--superexec-auth-secret-file``."""
    argv = [str(BIN / "fedskin"), "site-exec", "--runtime-api-address", runtime_api_address]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    if auth_secret_file is not None:
        argv += ["--superexec-auth-secret-file", str(auth_secret_file)]
    return argv


@dataclass
class Proc:
    """A started process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    children: dict[int, int] = field(default_factory=dict)  # pid -> start time

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Block until ``pattern`` appears ``count`` times in the log; fail early if it died."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        polls = 0
        while time.monotonic() < deadline:
            if polls % 10 == 0:  # a /proc scan every ~2 s is enough to track the tree
                self.remember_children()
            polls += 1
            found = list(rx.finditer(self.text()))
            if len(found) >= count:
                return found
            if not self.alive():
                break
            time.sleep(0.2)
        found = list(rx.finditer(self.text()))
        if len(found) >= count:
            return found
        state = f"exited {self.popen.returncode}" if not self.alive() else "still running"
        raise TimeoutError(
            f"{self.name} ({state}) did not log /{pattern}/ {count}x within {timeout}s. Log:\n"
            + tail(self.text())
        )

    def wait_exit(self, timeout: float) -> int | None:
        """Return the exit code, or None if it is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            self.remember_children()  # its SuperExec child outlives it: keep track to kill
            time.sleep(0.2)
        return self.popen.poll()

    def remember_children(self) -> None:
        """Record the process tree now: SuperExec / app processes start in their own sessions
        and are re-parented when their parent exits, so they are tracked while visible."""
        for pid in descendants(self.popen.pid):
            start = start_time(pid)
            if start is not None:
                self.children.setdefault(pid, start)

    def processes(self, name: str) -> list[int]:
        """Live descendants whose command line contains ``name`` (e.g. ``flwr-clientapp``)."""
        return [pid for pid in descendants(self.popen.pid) if name in cmdline(pid)]

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to the process and every child seen (only if the pid is not reused)."""
        self.remember_children()
        if self.popen.poll() is None:
            _signal(self.popen.pid, None, sig)
        for pid, start in self.children.items():
            _signal(pid, start, sig)

    def done(self) -> bool:
        return self.popen.poll() is not None and not self.leftovers()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process and everything it spawned, SIGKILL whatever is left."""
        stop_procs([self], grace)

    def leftovers(self) -> list[int]:
        """Spawned processes (same pid *and* start time) still running."""
        return [pid for pid, start in self.children.items() if start_time(pid) == start]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the ")" that closes the command name; state is field 3 of stat(5).
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # stat(5) field 22: starttime


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (from /proc, Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive_since(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the live process that started at ``start``."""
    return start_time(pid) == start


def _signal(pid: int, start: int | None, sig: int) -> None:
    """Signal ``pid`` only if it is still the process we saw (pids get reused)."""
    if start is not None and start_time(pid) != start:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_procs(procs: list[Proc], grace: float = 5.0) -> None:
    """SIGTERM all at once (graceful: SuperNodes deactivate), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for proc in procs:
            proc.signal_all(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not all(p.done() for p in procs):
            time.sleep(0.1)
        for proc in procs:
            proc.popen.poll()  # reap
        if all(p.done() for p in procs):
            return


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@dataclass
class Harness:
    """Owns every process a test starts; :meth:`stop_all` is safe to call more than once."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path | None = None,
        priority: int = 0,
    ) -> Proc:
        """Start ``argv`` logging to ``logs/<name>.log``; ``priority`` is its nice value
        (negative needs root, otherwise ignored), inherited by what it starts."""
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
        if priority:
            try:  # before it has imported anything, so before it starts children
                os.setpriority(os.PRIO_PROCESS, popen.pid, priority)
            except OSError:
                pass
        proc = Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 5.0) -> list[str]:
        """Stop everything; return a description of any process that survived."""
        stop_procs(self.procs, grace)
        return [f"{p.name}: pid {pid}" for p in self.procs for pid in p.leftovers()] + [
            f"{p.name}: pid {p.popen.pid}" for p in self.procs if p.alive()
        ]

    def remember_children(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.remember_children()

    def logs(self, procs: Iterable[Proc] | None = None) -> str:
        """All logs, for assertion messages."""
        return "\n".join(f"===== {p.name} =====\n{tail(p.text())}" for p in (procs or self.procs))


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


def poll_until(
    what: str,
    check: Callable[[], object],
    timeout: float,
    every: float = 0.5,
    alive: Callable[[], bool] = lambda: True,
) -> object:
    """Call ``check`` until it returns something truthy; give up early once ``alive`` is false
    (e.g. the SuperLink was stopped in teardown) or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if not alive():
            raise RuntimeError(f"gave up waiting for {what}: the deployment is gone")
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout}s")


# ----------------------------------------------------------------- systemd units and the guide
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # its default
Unit = dict[str, list[tuple[str, str]]]  # [Section] -> (key, value) pairs in order


def read_unit(path: Path) -> Unit:
    """A unit file's ``[Section]`` -> ``(key, value)`` pairs in order (keys may repeat), with
    systemd's syntax: ``#``/``;`` comments, a trailing backslash continues the line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise ValueError(f"{path}: not a unit file line: {line!r}")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def read_environment_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd's ``EnvironmentFile=`` reads them (a value may be
    enclosed in double or single quotes; ``#`` lines are comments)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_command(unit: Unit, env: dict[str, str]) -> list[str]:
    """``ExecStart=`` as systemd runs it: split into words (quotes respected), then ``${VAR}``
    replaced inside a word (one word), a word that is just ``$VAR`` split at whitespace."""
    (line,) = unit_value(unit, "Service", "ExecStart")
    argv: list[str] = []
    for word in shlex.split(line):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            argv += env.get(bare.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def unit_environment(unit: Unit, base: dict[str, str]) -> dict[str, str]:
    """``base`` (what systemd gives every service), then ``Environment=``, then the
    ``EnvironmentFile=`` settings, which override it (systemd.exec(5))."""
    env = dict(base)
    for value in unit_value(unit, "Service", "Environment"):
        env.update(dict(item.split("=", 1) for item in shlex.split(value)))
    for value in unit_value(unit, "Service", "EnvironmentFile"):
        env.update(read_environment_file(Path(value.removeprefix("-"))))
    return env
