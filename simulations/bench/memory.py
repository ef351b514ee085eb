"""Memory figures from /proc: this process's peak RSS and a sampler thread for Ray actors."""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path


def vm_kb(field_name: str, pid: int | str = "self") -> float:
    """A ``Vm*`` line of /proc/<pid>/status in kB (NaN where /proc is unavailable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return float(m.group(1)) if m else math.nan


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ``clear_refs`` 5), so the next peak is this phase's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ActorPeaks(threading.Thread):
    """Samples the peak RSS (VmHWM) of this process's own Ray ClientApp actors from /proc.

    Only descendants of this process count, so other jobs' simulations on a shared machine
    are ignored. VmHWM includes shared pages (torch libraries, Ray's object store).
    """

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self._stop_event = threading.Event()
        self._me = os.getpid()

    def _is_descendant(self, pid: int) -> bool:
        for _ in range(16):
            ppid = vm_ppid(pid)
            if ppid is None or ppid <= 1:
                return False
            if ppid == self._me:
                return True
            pid = ppid
        return False

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if not cmd.startswith(b"ray::ClientAppActor") or not self._is_descendant(int(entry)):
                continue
            hwm = vm_kb("VmHWM", entry)
            if math.isfinite(hwm):
                self.peaks[int(entry)] = max(self.peaks.get(int(entry), 0.0), hwm)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def vm_ppid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^PPid:\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None
