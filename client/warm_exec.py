"""A site's warm ClientApp launcher: torch, timm and Flower imported once, not per message.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives (``flower-superexec`` launches one per task, in ``--isolation subprocess`` and
in ``--isolation process`` alike), and that process imports torch, timm, Opacus and the
project before it can train: 7-10 s per message on a 2-core machine, paid twice per round
by every site (train, then evaluate). Flower's own warm executor pools serve only its
agent/model/connector tasks on Kubernetes, not ClientApps.

This launcher takes the place of ``flower-superexec`` next to a SuperNode started with
``--isolation process``. It imports the heavy libraries once, then for each ClientApp task
it acquires from the SuperNode's Runtime API it ``fork()``s a child that runs Flower's own
``flwr-clientapp`` code (:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`) with
that task's token. Every message still runs in a fresh process (a crash, a leak or
leftover state cannot reach the next message, as with Flower's launcher); only the
imports are inherited. The project's own modules (``client``, ``common``, ...) are dropped
after the warm-up so each child imports them from the run's FAB, exactly as
``flwr-clientapp`` does.

    flower-supernode --isolation process --port 9094 ...     # as before, plus the flag
    fedskin site-exec --runtime-api-address 127.0.0.1:9094   # same user, same machine

Linux/macOS only (``fork``). The Runtime API stays on 127.0.0.1.
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
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("fedskin.site-exec")

# Imported once by the launcher: the heavy libraries, then the ClientApp's own modules for
# whatever else they import; the project's packages are imported again per message.
WARM_LIBRARIES = ("torch", "torchvision", "timm", "opacus", "numpy", "pandas", "PIL.Image")
WARM_MODULES = ("client.client_app", "client.task")
PROJECT_PACKAGES = ("client", "common", "server", "simulations", "tests")


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> float:
    """Import the heavy libraries and ``modules`` (with everything they import); then forget
    the project's own modules, so each ClientApp imports them from the run's FAB as
    ``flwr-clientapp`` does. Returns the seconds it took."""
    t0 = time.perf_counter()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - Flower's ClientApp runner

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
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return time.perf_counter() - t0


def _run_child(address: str, token: str, insecure: bool, certificates: bytes | None) -> None:
    """In the forked child: Flower's ``flwr-clientapp`` for one task, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=address,
            token=token,
            insecure=insecure,
            certificates=certificates,
            parent_pid=os.getppid(),  # the child ends if the launcher is gone
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as err:  # flwr_exit ends every run_clientapp with sys.exit
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and exit, never return into the loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launcher:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and fork one child each."""

    def __init__(
        self,
        address: str,
        *,
        insecure: bool,
        root_certificates: Path | None,
        auth_secret: bytes | None,
        poll_interval: float,
    ) -> None:
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.address = address
        self.insecure = insecure
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
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=insecure,
            root_certificates=self.certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.children: dict[int, float] = {}  # pid -> fork time
        self.stopping = False

    def acquire(self) -> tuple[str, int] | None:
        """One ClientApp task's token (and id), or None if none is waiting."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if res.HasField("task") and res.token:
            return res.token, int(res.task.task_id)
        return None

    def launch(self, token: str, task_id: int) -> int:
        if threading.active_count() > 1:  # fork copies only this thread: say so if unsafe
            log.warning("forking with %d threads alive", threading.active_count())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(self.address, token, self.insecure, self.certificates)
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
            task = self.acquire()
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


def site_exec_cli(
    runtime_api_address: Annotated[
        str,
        typer.Option(help="the SuperNode's Runtime API: 127.0.0.1 and its --port (default 9094)"),
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
        typer.Option(help="stop when this process (the SuperNode) exits"),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(help="seconds between polls for a new task")
    ] = 0.2,
) -> None:
    """Run a site's ClientApps from a warm process (next to a SuperNode in process isolation)."""
    handler = logging.StreamHandler(sys.stderr)  # its own lines only: the ClientApps log
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # as Flower's
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    secret = superexec_auth_secret_file.read_bytes() if superexec_auth_secret_file else None
    seconds = warm_up()
    launcher = Launcher(
        runtime_api_address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        auth_secret=secret,
        poll_interval=poll_interval,
    )

    def on_signal(signum: int, _frame: object) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "warm: torch, timm and Flower imported in %.1f s; serving ClientApp tasks of %s",
        seconds,
        runtime_api_address,
    )
    launcher.serve(parent_pid)
