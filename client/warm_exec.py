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

What it runs, and for whom
--------------------------
*Who answers.* Before any byte goes to the Runtime API on a new TCP connection (the
launcher's polls, each child's task traffic; every reconnect, e.g. after the SuperNode
restarted and something else may have taken its port), the launcher looks up, in
``/proc/net/tcp{,6}`` and ``/proc/<pid>/fd``, the process(es) holding the LISTEN socket(s)
of that port and requires every one of them to be the SuperNode: with ``--parent-pid``,
exactly that process (the same process: its start time is pinned at launch); without it,
a process whose command line is ``flower-supernode``. In both cases the socket and the
process must belong to ``--supernode-uid`` (default: the launcher's own uid). Anything
else (another user's listener, a listener whose owner it cannot see, a process of the
right user that is not the SuperNode) is refused before the request is sent, with one
log line naming who answered (pid, uid, exe, command line); the launcher keeps polling
and serves again once the SuperNode holds the port. The Runtime API address must be a
loopback address.

*What runs.* A task's app bundle (FAB), which the SuperLink ships with every run, is never
installed or imported. The child pulls the task's inputs (Flower's ``PullTaskInput``),
checks the FAB against the installed project and then runs the installed
``[tool.flwr.app.components] clientapp`` (``client.client_app:app``), imported by the
launcher from the installed package. A FAB is accepted iff

* its SHA-256 is one of the site's ``--allow-fab-hash`` values, or
* its ``pyproject.toml`` is the installed project's ``pyproject.toml`` (the same
  ``[project] name`` and, as TOML, the same content less ``[tool.flwr.federations]``,
  which ``flwr build`` drops) and every other file it contains (``.info/`` metadata aside)
  is byte-identical to the installed file at the same relative path (for a module the
  launcher imported: to the file as it was imported). ``flwr run .`` from the same
  checkout/version passes; any other code, an extra file, a changed default, is refused.

A refused FAB is one log line (the run, the FAB's name/version/SHA-256, the first
difference); the task is reported to the SuperNode as failed, with a Flower ``INVALID_FAB``
error reply to the ServerApp, and no ClientApp code runs. An editable install (``pip
install -e .``) is compared with its checkout; a non-editable one has no ``pyproject.toml``
next to its packages, so only ``--allow-fab-hash`` admits a FAB there.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import traceback
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer

log = logging.getLogger("fedskin.site-exec")

# Imported once by the launcher: the heavy libraries, then the installed ClientApp (with
# everything it imports). Each forked child runs that installed ClientApp.
WARM_LIBRARIES = ("torch", "torchvision", "timm", "opacus", "numpy", "pandas", "PIL.Image")
WARM_MODULES = ("client.client_app", "client.task")
DEFAULT_CLIENTAPP = "client.client_app:app"
SUPERNODE_PROGRAM = "flower-supernode"
FAB_METADATA_DIR = ".info/"
MAX_FAB_UNPACKED = 512 << 20  # bytes: a FAB that unpacks to more is refused unread


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


# ------------------------------------------------------------------ who answers: /proc


class PeerRefused(RuntimeError):
    """The Runtime API is not served by the SuperNode; the message names who serves it."""


def _proc_read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), to tell a reused pid apart."""
    stat = _proc_read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def process_uid(pid: int) -> int | None:
    status = _proc_read(f"/proc/{pid}/status")
    for line in (status or "").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def process_cmdline(pid: int) -> list[str]:
    raw = _proc_read(f"/proc/{pid}/cmdline") or ""
    return [a for a in raw.split("\0") if a]


def describe_process(pid: int) -> str:
    """``pid 123 (uid 1000, exe /usr/bin/python3.11, cmdline 'python fake.py')``."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = "?"
    cmdline = " ".join(process_cmdline(pid))
    if len(cmdline) > 200:
        cmdline = cmdline[:197] + "..."
    uid = process_uid(pid)
    return f"pid {pid} (uid {'?' if uid is None else uid}, exe {exe}, cmdline {cmdline!r})"


def is_supernode_cmdline(argv: list[str]) -> bool:
    """``flower-supernode ...``, or an interpreter running that script (a venv's shebang)."""
    if not argv:
        return False
    if Path(argv[0]).name == SUPERNODE_PROGRAM:
        return True
    return (
        len(argv) > 1
        and Path(argv[0]).name.startswith("python")
        and Path(argv[1]).name == SUPERNODE_PROGRAM
    )


def tcp_listeners(port: int) -> list[tuple[int, int]]:
    """(socket inode, owner uid) of every TCP/TCP6 socket listening on ``port`` (any
    address: each might receive a connection meant for the Runtime API)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = _proc_read(table)
        for line in (text or "").splitlines()[1:]:
            f = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(f) < 10 or f[3] != "0A":  # 0A = TCP_LISTEN
                continue
            if int(f[1].rsplit(":", 1)[1], 16) == port:
                found.append((int(f[9]), int(f[7])))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets among ``pid``'s open files (empty if not readable)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def socket_holders(inodes: set[int]) -> dict[int, set[int]]:
    """inode -> pids (of those this user may inspect) that hold it open."""
    holders: dict[int, set[int]] = {i: set() for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        held = socket_inodes(int(entry)) & inodes
        for inode in held:
            holders[inode].add(int(entry))
    return holders


def parse_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:9094`` / ``[::1]:9094`` / ``localhost:9094`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class PeerCheck:
    """Require the Runtime API's listener to be the SuperNode (see the module docstring).

    ``expected_pid``: that process exactly (its start time is pinned on creation);
    ``None``: any ``flower-supernode`` process. Both: of ``expected_uid``."""

    port: int
    expected_pid: int | None = None
    expected_uid: int = field(default_factory=os.getuid)
    _expected_start: int | None = field(default=None, init=False)
    # The last verdict: (listener inodes, ((pid, start time), ...), None or the refusal).
    _cache: tuple[frozenset[int], tuple[tuple[int, int | None], ...], str | None] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not Path("/proc/net/tcp").exists():
            raise RuntimeError("site-exec verifies the Runtime API's process via /proc: Linux only")
        if self.expected_pid is not None:
            self._expected_start = start_time(self.expected_pid)
            if self._expected_start is None:
                raise ValueError(f"--parent-pid {self.expected_pid}: no such process")

    def expected(self) -> str:
        if self.expected_pid is not None:
            return f"the SuperNode pid {self.expected_pid} of uid {self.expected_uid}"
        return f"a {SUPERNODE_PROGRAM} process of uid {self.expected_uid}"

    def _acceptable(self, pid: int) -> bool:
        if process_uid(pid) != self.expected_uid:
            return False
        if self.expected_pid is not None:
            return pid == self.expected_pid and start_time(pid) == self._expected_start
        return is_supernode_cmdline(process_cmdline(pid))

    def verify(self) -> str:
        """Who serves the port, if it is the SuperNode; raise :class:`PeerRefused` if not."""
        listeners = tcp_listeners(self.port)
        where = f"the Runtime API port {self.port}"
        if not listeners:
            raise PeerRefused(f"refused {where}: nothing listens on it")
        for inode, uid in listeners:
            if uid != self.expected_uid:
                raise PeerRefused(
                    f"refused {where}: its listening socket (inode {inode}) belongs to uid "
                    f"{uid}, not to {self.expected()}"
                )
        inodes = frozenset(i for i, _ in listeners)
        if self._cache is not None and self._cache[0] == inodes:
            _, pids, verdict = self._cache
            if all(start_time(pid) == start for pid, start in pids) and all(
                inodes <= socket_inodes(pid) for pid, _ in pids
            ):
                if verdict is not None:
                    raise PeerRefused(verdict)
                return ", ".join(describe_process(pid) for pid, _ in pids)
        holders = socket_holders(set(inodes))
        pids = sorted(set().union(*holders.values()))
        verdict = None
        if not all(holders.values()):
            hidden = sorted(i for i, p in holders.items() if not p)
            verdict = (
                f"refused {where}: its listening socket (inode {hidden[0]}, uid "
                f"{self.expected_uid}) is held by no process this user can inspect, "
                f"not by {self.expected()}"
            )
        else:
            others = [pid for pid in pids if not self._acceptable(pid)]
            if others:
                verdict = (
                    f"refused {where}: it is served by "
                    + ", ".join(describe_process(pid) for pid in others)
                    + f", not by {self.expected()}"
                )
        self._cache = (inodes, tuple((pid, start_time(pid)) for pid in pids), verdict)
        if verdict is not None:
            raise PeerRefused(verdict)
        return ", ".join(describe_process(pid) for pid in pids)

    def verify_socket(self, sock: Any) -> None:
        """A freshly connected socket: its peer must be loopback:port, served by the
        SuperNode. Called before anything is sent on it."""
        if sock is None:
            raise PeerRefused("refused the Runtime API connection: no socket to inspect")
        peer = sock.getpeername()
        host, port = str(peer[0]), int(peer[1])
        if not is_loopback(host) or port != self.port:
            raise PeerRefused(f"refused the Runtime API connection to {host}:{port}")
        self.verify()


class _VerifyingBackend:
    """An httpcore network backend that checks every new connection's peer (the TCP
    connect is done, nothing is sent yet) and closes it if it is not the SuperNode."""

    def __init__(self, inner: Any, check: PeerCheck) -> None:
        self._inner = inner
        self._check = check

    def connect_tcp(self, host: str, port: int, **kwargs: Any) -> Any:
        stream = self._inner.connect_tcp(host, port, **kwargs)
        try:
            self._check.verify_socket(stream.get_extra_info("socket"))
        except BaseException:
            stream.close()
            raise
        return stream

    def connect_unix_socket(self, path: str, **kwargs: Any) -> Any:
        raise PeerRefused(f"refused the Runtime API at unix socket {path}: not checked")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def runtime_client(
    address: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    interceptors: list,
    retry_invoker: Any,
    check: PeerCheck,
) -> Any:
    """Flower's ``RuntimeHttpClient``, whose every new connection passes ``check`` first."""
    import httpcore
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=retry_invoker,
    )
    pool = getattr(getattr(getattr(client, "_client", None), "_transport", None), "_pool", None)
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("cannot hook the Runtime API client's connections (httpx changed?)")
    pool._network_backend = _VerifyingBackend(pool._network_backend, check)
    return client


# ------------------------------------------------------------------ what runs: the FAB


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fab_config(pyproject: dict) -> dict:
    """pyproject.toml as ``flwr build`` puts it in a FAB: less ``[tool.flwr.federations]``."""
    pyproject = {**pyproject}
    tool = pyproject.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("flwr"), dict):
        flwr = {k: v for k, v in tool["flwr"].items() if k != "federations"}
        pyproject["tool"] = {**tool, "flwr": flwr}
    return pyproject


@dataclass
class InstalledApp:
    """The installed fedskin project: the folder holding its packages (an editable install:
    the checkout) and what the launcher imported from it."""

    root: Path
    imported: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    @classmethod
    def find(cls) -> InstalledApp:
        import client

        return cls(Path(client.__file__).resolve().parent.parent)

    def snapshot_imports(self) -> None:
        """Remember the content of every module imported from the project so far: the
        children run these, whatever the files on disk say later."""
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not path:
                continue
            try:
                rel = Path(path).resolve().relative_to(self.root)
            except ValueError:
                continue
            try:
                self.imported[rel.as_posix()] = _sha256(Path(path).read_bytes())
            except OSError:
                pass

    def pyproject(self) -> dict | None:
        try:
            return tomllib.loads((self.root / "pyproject.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None

    def clientapp_ref(self) -> str:
        pyproject = self.pyproject() or {}
        ref = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
        return str(ref.get("clientapp") or DEFAULT_CLIENTAPP)

    def file_sha256(self, rel: str) -> str | None:
        if rel in self.imported:
            return self.imported[rel]
        path = self.root / rel
        if path.is_symlink() or not path.is_file():
            return None
        try:
            return _sha256(path.read_bytes())
        except OSError:
            return None


@dataclass(frozen=True)
class FabPolicy:
    """Which FABs a site serves (with its installed ClientApp): see the module docstring."""

    installed: InstalledApp
    allow_hashes: frozenset[str] = frozenset()

    def refusal(self, content: bytes) -> str | None:
        """None if the FAB ``content`` is accepted, else why not (one line)."""
        if _sha256(content) in self.allow_hashes:
            return None
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as zf:
                infos = [info for info in zf.infolist() if not info.is_dir()]
                if sum(info.file_size for info in infos) > MAX_FAB_UNPACKED:
                    return f"the FAB unpacks to more than {MAX_FAB_UNPACKED >> 20} MiB"
                files = {info.filename: zf.read(info) for info in infos}
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"not a readable FAB ({err})"
        if "pyproject.toml" not in files:
            return "the FAB has no pyproject.toml"
        try:
            theirs = tomllib.loads(files["pyproject.toml"].decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            return f"the FAB's pyproject.toml is not TOML ({err})"
        ours = self.installed.pyproject()
        if ours is None:
            return f"no installed pyproject.toml in {self.installed.root} to compare with"
        name = theirs.get("project", {}).get("name")
        if name != ours.get("project", {}).get("name"):
            return f"project {name!r} is not the installed {ours.get('project', {}).get('name')!r}"
        if _fab_config(theirs) != _fab_config(ours):
            return f"pyproject.toml differs from the installed {self.installed.root}/pyproject.toml"
        for rel in sorted(files):
            if rel == "pyproject.toml" or rel.startswith(FAB_METADATA_DIR):
                continue
            parts = PurePosixPath(rel).parts
            if rel.startswith("/") or ".." in parts or "\\" in rel:
                return f"unsafe path {rel!r} in the FAB"
            installed = self.installed.file_sha256(rel)
            if installed is None:
                return f"{rel} is in the FAB but not installed in {self.installed.root}"
            if installed != _sha256(files[rel]):
                return f"{rel} differs from the installed {self.installed.root / rel}"
        return None


def load_installed_clientapp(ref: str) -> Any:
    """The installed ``module:attribute`` ClientApp (already imported by the warm-up)."""
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError

    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in (attr or "app").split("."):
            obj = getattr(obj, part)
    except Exception as err:
        raise LoadClientAppError(f"cannot load the installed ClientApp {ref}: {err}") from err
    if not isinstance(obj, ClientApp):
        raise LoadClientAppError(f"{ref} is not a ClientApp")
    return obj


# ------------------------------------------------------------------ one task, in a child


class FabRefused(Exception):
    """The task's FAB is not the installed app."""


def run_task(
    address: str,
    token: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    check: PeerCheck,
    policy: FabPolicy,
    parent_pid: int | None,
) -> None:
    """Flower's ``run_clientapp`` (flwr/supernode/runtime/run_clientapp.py) for one task,
    except that the FAB is checked by ``policy`` and never installed: the installed
    ClientApp runs. Ends with Flower's ``flwr_exit`` (``SystemExit``)."""
    from flwr.app import Context, Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType, event
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    event(EventType.FLWR_CLIENTAPP_RUN_ENTER)
    retry_invoker = make_simple_http_retry_invoker()
    client = runtime_client(
        address,
        insecure=insecure,
        certificates=certificates,
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
        check=check,
    )
    heartbeat_sender = None
    message = None
    reply_message = None
    context: Context | None = None
    sub_status = SubStatus.FAILED
    details = "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        try:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        except PeerRefused as err:
            log.error("%s; the task's status was not sent", err)
        if heartbeat_sender is not None and heartbeat_sender.is_running:
            heartbeat_sender.stop()
        client.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
        exit_message="Task stopped.",
        exit_handlers=[on_exit],
    )

    def pull_message() -> Message:
        """As Flower's ``pull_task_input`` does, after the Context/Run/FAB."""
        res = client.PullMessages(PullAppMessagesRequest())
        if not res.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = res.message_object_trees[0]
        msg = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
        )
        msg.metadata.__dict__["_message_id"] = tree.object_id
        return msg

    try:
        heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat_sender.start()
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        reason = policy.refusal(fab.content)
        if reason is not None:
            log.error(
                "task %d: refused the FAB of run %d (%s %s, sha256 %s): %s; no ClientApp code ran",
                res.task_id,
                run.run_id,
                run.fab_id or "?",
                run.fab_version or "?",
                _sha256(fab.content),
                reason,
            )
            try:  # the message, for an error reply to the ServerApp
                message = pull_message()
            except Exception as err:  # noqa: BLE001
                log.debug("task %d: no message to reply to (%s)", res.task_id, err)
            raise FabRefused(f"site-exec refused the FAB: {reason}")
        message = pull_message()
        client_app = load_installed_clientapp(policy.installed.clientapp_ref())
        reply_message = client_app(message=message, context=context)
        sub_status = SubStatus.COMPLETED
        details = ""
    except Exception as ex:  # noqa: BLE001 - as run_clientapp: report, reply with an Error
        e_code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        if isinstance(ex, FabRefused):
            e_code, reason = ErrorCode.INVALID_FAB, str(ex)
        else:
            if isinstance(ex, LoadClientAppError):
                e_code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception", exc_info=ex)
        sub_status = SubStatus.FAILED
        details = reason
        if message:
            reply_message = Message(Error(code=e_code, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
        if isinstance(ex, ImportError):
            exit_code = ExitCode.COMMON_APP_IMPORT_ERROR
    finally:
        if reply_message and context:
            try:
                push_message(client, reply_message, context)
            except Exception as ex:  # noqa: BLE001
                log.error("Failed to push reply message", exc_info=ex)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


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
