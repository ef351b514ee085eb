"""Who answers the Runtime API: the launcher talks only to its SuperNode (client/warm_exec.py).

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
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERNODE_PROGRAM = "flower-supernode"


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
