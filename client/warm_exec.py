"""A site's warm ClientApp launcher: torch, timm and Flower imported once, not per message.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives (``flower-superexec`` launches one per task, in ``--isolation subprocess`` and
in ``--isolation process`` alike), and that process imports torch, timm, Opacus and the
project before it can train: 7-10 s per message on a 2-core machine, paid twice per round
by every site (train, then evaluate). Flower's own warm executor pools serve only its
agent/model/connector tasks on Kubernetes, not ClientApps.

This launcher takes the place of ``flower-superexec`` next to a SuperNode started with
``--isolation process``. It imports the heavy libraries and the *installed* fedskin
ClientApp once, then for each ClientApp task it acquires from the SuperNode's Runtime API
it ``fork()``s a child that runs that task: every message still runs in a fresh process (a
crash, a leak or leftover state cannot reach the next message, as with Flower's launcher);
only the imports are inherited.

    flower-supernode --isolation process --port 9094 ...     # as before, plus the flag
    fedskin site-exec --runtime-api-address 127.0.0.1:9094 --parent-pid <SuperNode's pid>

Linux only (``fork`` and ``/proc``). The Runtime API stays on 127.0.0.1 (or ::1). After
upgrading fedskin, restart the launcher: until then it refuses the new version's FABs (its
children run the code it imported).

What it runs, and for whom: *who answers* (the SuperNode only, checked in ``/proc``
before any byte is sent): :mod:`client.peer_check`. *What runs* (the installed ClientApp;
a task's FAB is checked, never installed): :mod:`client.fab_policy`; one task in its
child: :mod:`client.warm_task`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from client.fab_policy import FabPolicy, InstalledApp
from client.peer_check import (
    PeerCheck,
    PeerRefused,
    is_loopback,
    parse_address,
    runtime_client,
    tcp_listeners,
)
from client.warm_task import run_task

log = logging.getLogger("fedskin.site-exec")

# Imported once by the launcher: the heavy libraries, then the installed ClientApp (with
# everything it imports). Each forked child runs that installed ClientApp.
WARM_LIBRARIES = ("torch", "torchvision", "timm", "opacus", "numpy", "pandas", "PIL.Image")
WARM_MODULES = ("client.client_app", "client.task")


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> float:
    """Import the heavy libraries and the installed ``modules`` (with everything they import);
    the forked ClientApps inherit them. Returns the seconds it took."""
    t0 = time.perf_counter()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - Flower's ClientApp runtime

    for name in WARM_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("warm-up: %s not installed", name)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a warm-up: the ClientApp reports errors
            log.warning("warm-up: importing %s failed (%s); it is imported per message", name, err)
    return time.perf_counter() - t0


def _run_child(launcher: Launcher, token: str) -> None:
    """In the forked child: one task, then exit (never return into the launcher's loop)."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        run_task(
            launcher.address,
            token,
            insecure=launcher.insecure,
            certificates=launcher.certificates,
            check=launcher.check,
            policy=launcher.policy,
            parent_pid=os.getppid(),  # the child ends if the launcher is gone
        )
        code = 0
    except SystemExit as err:  # flwr_exit ends every task with sys.exit
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and exit, never return into the loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------ the launcher


class Launcher:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and fork one child each.

    ``supernode_pid``/``supernode_uid``: who must serve the Runtime API (:class:`PeerCheck`);
    ``policy``: which FABs are served (default: the installed app, no extra hashes)."""

    def __init__(
        self,
        address: str,
        *,
        insecure: bool,
        root_certificates: Path | None,
        auth_secret: bytes | None,
        poll_interval: float,
        supernode_pid: int | None = None,
        supernode_uid: int | None = None,
        policy: FabPolicy | None = None,
    ) -> None:
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        host, port = parse_address(address)
        if not is_loopback(host):
            raise ValueError(
                f"--runtime-api-address {address}: site-exec serves only a SuperNode on this "
                "machine, whose Runtime API listens on a loopback address"
            )
        self.address = address
        self.insecure = insecure
        self.check = PeerCheck(
            port,
            expected_pid=supernode_pid,
            expected_uid=os.getuid() if supernode_uid is None else supernode_uid,
        )
        self.policy = policy or FabPolicy(InstalledApp.find())
        self.certificates = validate_and_resolve_root_certificates(
            str(root_certificates) if root_certificates else None, insecure
        )
        self.poll_interval = poll_interval
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=auth_secret,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        self.client = runtime_client(
            address,
            insecure=insecure,
            certificates=self.certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
            check=self.check,
        )
        self.children: dict[int, float] = {}  # pid -> fork time
        self.stopping = False
        self.last_refusal: str | None = None

    def acquire(self) -> tuple[str, int] | None:
        """One ClientApp task's token (and id), or None if none is waiting. Raises
        :class:`PeerRefused` (nothing sent) if the Runtime API is not the SuperNode's."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if res.HasField("task") and res.token:
            return res.token, int(res.task.task_id)
        return None

    def refused(self, err: PeerRefused) -> None:
        if str(err) != self.last_refusal:  # one line per impostor, not one per poll
            log.error("%s; nothing was sent to it", err)
            self.last_refusal = str(err)

    def precheck(self) -> None:
        """Say at once (before the warm-up) if something other than the SuperNode holds the
        Runtime API's port; nothing listening yet is fine (the SuperNode is starting)."""
        if tcp_listeners(self.check.port):
            try:
                self.check.verify()
            except PeerRefused as err:
                self.refused(err)

    def launch(self, token: str, task_id: int) -> int:
        if threading.active_count() > 1:  # fork copies only this thread: say so if unsafe
            log.warning("forking with %d threads alive", threading.active_count())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(self, token)
        self.children[pid] = time.monotonic()
        log.info("task %d: ClientApp pid %d", task_id, pid)
        return pid

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                seconds = time.monotonic() - self.children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                log.info("ClientApp pid %d exited %d after %.1f s", pid, code, seconds)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every running ClientApp (they push their status), SIGKILL after ``grace``."""
        self.stopping = True
        for pid in self.children:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.1)
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)
        self.reap()
        self.client.close()

    def serve(self, parent_pid: int | None = None) -> None:
        while not self.stopping:
            self.reap()
            if parent_pid is not None and not _alive(parent_pid):
                log.info("SuperNode pid %d is gone: stopping", parent_pid)
                break
            try:
                task = self.acquire()
            except PeerRefused as err:
                self.refused(err)
                time.sleep(max(self.poll_interval, 1.0))
                continue
            if self.last_refusal is not None:
                log.info("the Runtime API is the SuperNode's again: serving")
                self.last_refusal = None
            if task is not None:
                self.launch(*task)
                continue  # another task may be waiting (train and evaluate of two runs)
            time.sleep(self.poll_interval)
        self.stop()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fab_hashes(values: Iterable[str]) -> frozenset[str]:
    out = set()
    for value in values:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise typer.BadParameter(f"{value!r} is not a SHA-256 (64 hex digits)")
        out.add(value)
    return frozenset(out)


def site_exec_cli(
    runtime_api_address: Annotated[
        str,
        typer.Option(
            help="the SuperNode's Runtime API: a loopback address and its --port (default 9094)"
        ),
    ] = "127.0.0.1:9094",
    root_certificates: Annotated[
        Path | None,
        typer.Option(
            help="CA certificate of the Runtime API, when the SuperNode serves it over TLS "
            "(its --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile); otherwise plain HTTP on "
            "127.0.0.1, as Flower's own launcher"
        ),
    ] = None,
    superexec_auth_secret_file: Annotated[
        Path | None,
        typer.Option(
            help="the file given to flower-supernode --superexec-auth-secret-file (optional)"
        ),
    ] = None,
    parent_pid: Annotated[
        int | None,
        typer.Option(
            help="the SuperNode's pid: only that process may serve the Runtime API, and "
            "site-exec stops when it exits. Without it: any flower-supernode process of "
            "--supernode-uid"
        ),
    ] = None,
    supernode_uid: Annotated[
        int | None,
        typer.Option(
            help="the user the SuperNode runs as; the Runtime API's listening socket and "
            "process must be its (default: site-exec's own uid)"
        ),
    ] = None,
    allow_fab_hash: Annotated[
        list[str] | None,
        typer.Option(
            help="also serve runs whose FAB has this SHA-256 (repeatable); by default only a "
            "FAB whose pyproject.toml and every file equal the installed project's is "
            "served. Either way the installed ClientApp runs, never the FAB's code"
        ),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(help="seconds between polls for a new task")
    ] = 0.2,
) -> None:
    """Run a site's ClientApps from a warm process (next to a SuperNode in process isolation).

    Only a Runtime API served by the SuperNode (--parent-pid, or a flower-supernode
    process of --supernode-uid; checked in /proc on every new connection) is polled, and
    only the installed ClientApp runs: a task's FAB is never installed; it must be the
    installed project (same pyproject.toml, every file byte-identical) or an
    --allow-fab-hash, else the task fails with one logged line.
    """
    handler = logging.StreamHandler(sys.stderr)  # its own lines only: the ClientApps log
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # as Flower's
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    secret = superexec_auth_secret_file.read_bytes() if superexec_auth_secret_file else None
    hashes = _fab_hashes(allow_fab_hash or [])
    installed = InstalledApp.find()
    try:
        launcher = Launcher(
            runtime_api_address,
            insecure=root_certificates is None,
            root_certificates=root_certificates,
            auth_secret=secret,
            poll_interval=poll_interval,
            supernode_pid=parent_pid,
            supernode_uid=supernode_uid,
            policy=FabPolicy(installed, hashes),
        )
    except (ValueError, RuntimeError) as err:
        raise typer.BadParameter(str(err)) from None
    launcher.precheck()
    seconds = warm_up()
    installed.snapshot_imports()  # what the children run: the modules as imported now

    def on_signal(signum: int, _frame: object) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "warm: torch, timm and Flower imported in %.1f s; serving ClientApp tasks of %s "
        "(served by %s), running the installed %s from %s",
        seconds,
        runtime_api_address,
        launcher.check.expected(),
        installed.clientapp_ref(),
        installed.root,
    )
    launcher.serve(parent_pid)
