"""The run directory: every path in it, the checkpoint format, and the one atomic writer.

A run directory (``runs/<run-name>`` unless ``out-dir`` names another) holds::

    config.toml            the resolved run config (simulations/runner.py)
    manifest.csv           a copy of the site/split manifest the sites used
    metrics.json           config, per-round records, best round, test results (server/report.py)
    history.csv            one row per round
    report.md              the Markdown report, once the test is known
    learning_curves.png    validation curves
    confusion_test.png     pooled test confusion matrix
    network.json           record names and keys that reached the server (server/loop.py)
    checkpoints/best.pt    the best round's global model (validation balanced accuracy)
    checkpoints/last.pt    the last completed round: model, loop state, strategy state, config
    site-state/            the simulated sites' privacy accountants (``state-dir``)
    audit.json, audit.png  membership-inference audit (common/audit.py)
    external/<format>/     ``fedskin evaluate`` results (simulations/evaluate.py)
    bench-writes/          scratch of ``fedskin bench`` (simulations/bench.py)

Every file fedskin writes goes through :func:`atomic_write` (a temporary file in the same
folder, flushed and fsynced, then ``os.replace``): a crash mid-write leaves the old file
or the new one, never a truncated one.

Checkpoints hold only tensors and plain data (dicts, lists, str, int, float, bool, None),
so :func:`load_checkpoint` reads them with ``torch.load(..., weights_only=True)``: a
checkpoint planted in a run directory cannot run code. Each one stores the run config it
was written under; :func:`check_resume` refuses to continue under a config that changes
the result, unless the user says so (``--force-resume`` / ``force-resume=true``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from common.data.schema import DataError

if TYPE_CHECKING:
    from common.config import RunConfig

log = logging.getLogger("fedskin")

CONFIG = "config.toml"
MANIFEST = "manifest.csv"
METRICS = "metrics.json"
HISTORY = "history.csv"
REPORT = "report.md"
LEARNING_CURVES = "learning_curves.png"
CONFUSION = "confusion_test.png"
NETWORK = "network.json"
CHECKPOINTS = "checkpoints"
SITE_STATE = "site-state"
AUDIT_JSON = "audit.json"
AUDIT_PNG = "audit.png"
EXTERNAL = "external"
BENCH_WRITES = "bench-writes"
DEFAULT_RUNS = Path("runs")

CHECKPOINT_FORMAT = "fedskin-checkpoint/1"
# Run-config keys that may differ between a checkpoint and the run that resumes it: how
# many rounds in all (more, to continue a run), how long to wait and for whom, where the
# outputs go, the post-run audit, and the Ray resources of the simulated sites. Every
# other key can change the model or what is reported about it.
RESUME_MAY_CHANGE = frozenset(
    {
        "num-server-rounds",
        "round-timeout",
        "wait-for-nodes",
        "min-nodes",
        "resume",
        "force-resume",
        "out-dir",
        "run-name",
        "audit",
        "audit-reference",
        "client-num-cpus",
        "client-num-gpus",
        "client-memory-mb",
    }
)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created until something is written)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def history(self) -> Path:
        return self.root / HISTORY

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def learning_curves(self) -> Path:
        return self.root / LEARNING_CURVES

    @property
    def confusion(self) -> Path:
        return self.root / CONFUSION

    @property
    def network(self) -> Path:
        return self.root / NETWORK

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, name: str = "last") -> Path:
        """``checkpoints/<name>.pt``: ``last`` (every round) or ``best``."""
        return self.checkpoints / f"{name}.pt"

    @property
    def site_state(self) -> Path:
        return self.root / SITE_STATE

    @property
    def audit_json(self) -> Path:
        return self.root / AUDIT_JSON

    @property
    def audit_png(self) -> Path:
        return self.root / AUDIT_PNG

    def external(self, data_format: str) -> Path:
        return self.root / EXTERNAL / data_format

    @property
    def bench_writes(self) -> Path:
        return self.root / BENCH_WRITES


def run_dir_for(cfg: RunConfig | Mapping[str, Any]) -> Path:
    """``out-dir``, or ``runs/<run-name>`` when it is empty."""
    from common.config import run_config_of  # common.config's imports use this module

    run = run_config_of(cfg)
    return Path(run.out_dir).expanduser() if run.out_dir else DEFAULT_RUNS / run.run_name


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any], *, mode: int | None = None
) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole.

    ``data`` is bytes, text (UTF-8) or a function that writes to a binary file object. It
    goes to a uniquely named temporary file beside ``path`` (same file system), which is
    flushed and fsynced, then renamed over ``path`` with ``os.replace``; on any error the
    temporary file is removed and ``path`` is left as it was. Missing parent folders are
    created. The new file gets the usual permissions (0666 less the umask), or exactly
    ``mode`` (a private key: 0600 from its creation, never briefly readable by others). The
    temporary file is opened ``O_EXCL | O_NOFOLLOW``: never an existing file or a link.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, data)


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, **dumps)`` written atomically."""
    return atomic_write(path, json.dumps(obj, **dumps))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a (small) file atomically: ``dst`` is never seen half-copied."""
    return atomic_write(dst, Path(src).read_bytes())


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure saved atomically (format from the file name, as savefig does)."""
    buf = io.BytesIO()
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    fig.savefig(buf, **kwargs)
    return atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------- config files


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one line naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid TOML {what} ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    """The first sentence of an error message, on one line."""
    text = " ".join(str(err).split()).split(". ")[0]
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- checkpoints


def _storable(obj: Any, arrays: str = "tensor") -> Any:
    """Plain data and tensors only: numpy scalars become Python ones, numpy arrays tensors
    (``arrays="tensor"``: same dtype and bytes) or nested lists (``arrays="list"``)."""
    import numpy as np
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True)) if arrays == "tensor" else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _storable(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_storable(v, arrays) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_storable(v, arrays) for v in obj)
    return obj


def save_checkpoint(
    path: str | Path,
    arrays: Mapping[str, Any],
    state: Mapping[str, Any],
    strategy: Mapping[str, Any],
    config: Mapping[str, Any],
) -> Path:
    """Write a checkpoint atomically: model ``arrays`` (tensors or numpy arrays), the
    loop's ``state``, the strategy's ``state`` (numpy arrays stored as tensors, which
    :func:`numpy.asarray` turns back into the same bytes) and the run ``config``."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arrays": _storable(dict(arrays)),
        "state": _storable(dict(state), arrays="list"),  # JSON-able, as in metrics.json
        "strategy": _storable(dict(strategy)),
        "config": _storable(dict(config), arrays="list"),
    }
    return atomic_torch_save(path, ckpt)


def _numpy_globals() -> list[Any]:
    """What the weights-only unpickler needs for plain numpy arrays and scalars (older
    checkpoints kept FedAdam's moments as numpy arrays); never arbitrary objects."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: nothing in the file can run code.

    Tensors, plain Python data and plain numpy arrays are read; anything else, a truncated
    file or one that is not a torch checkpoint is a :class:`DataError` of one line naming
    the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "numpy" not in str(err):
                raise
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.findall(r"GLOBAL (\S+)", str(err))
        if not found and "weights_only" not in str(err).lower():
            raise DataError(f"{path}: truncated or not a checkpoint ({_one_line(err)})") from None
        what = f" ({found[0]})" if found else ""
        raise DataError(
            f"{path}: refused, it holds objects other than weights{what}; it was not loaded "
            "(a checkpoint fedskin wrote holds only tensors and plain data)"
        ) from None
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in many ways inside torch
        raise DataError(
            f"{path}: truncated or not a checkpoint ({_one_line(err)}); delete it to start again"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint the server loop wrote (see :func:`save_checkpoint`), checked for shape.

    Older checkpoints (no ``format``/``config`` entry) load too; their ``config`` is None.
    """
    import torch

    path = Path(path)
    ckpt = read_checkpoint(path)
    arrays = ckpt.get("arrays") if isinstance(ckpt, dict) else None
    if not isinstance(arrays, dict) or not all(
        isinstance(v, torch.Tensor) for v in arrays.values()
    ):
        raise DataError(f"{path}: not a fedskin checkpoint (no 'arrays' of tensors)")
    if not isinstance(ckpt.get("state", {}), dict) or not isinstance(
        ckpt.get("strategy", {}), dict
    ):
        raise DataError(f"{path}: not a fedskin checkpoint ('state'/'strategy' are not dicts)")
    ckpt.setdefault("state", {})
    ckpt.setdefault("strategy", {})
    ckpt.setdefault("config", None)
    return ckpt


# ----------------------------------------------------------------------------- resume


def config_changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: frozenset[str] = RESUME_MAY_CHANGE,
) -> list[str]:
    """``key: old -> new`` for every key outside ``may_change`` whose value differs."""
    missing = object()
    changes = []
    for key in sorted((set(saved) | set(current)) - may_change):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            shown = ["(absent)" if v is missing else repr(v) for v in (old, new)]
            changes.append(f"{key}: {shown[0]} -> {shown[1]}")
    return changes


_WARNED: set[tuple[str, str]] = set()  # forced resumes already announced by this process


def check_resume(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    where: str | Path,
    force: bool = False,
) -> list[str]:
    """Refuse to resume from ``where`` under a config that changes the result.

    ``saved`` is the config stored with the checkpoint (None: an older checkpoint, which
    cannot be checked). Returns the changes (accepted when ``force``); otherwise raises a
    one-line :class:`common.config.ConfigError` with the difference.
    """
    from common.config import ConfigError

    if saved is None:
        log.warning("%s stores no run config: the resumed config cannot be checked", where)
        return []
    changes = config_changes(saved, current)
    if not changes:
        return []
    diff = "; ".join(changes)
    if force:
        # The same resume is checked up to three times in one process (runner, ServerApp,
        # loop: each must refuse before it does its work); the user needs the warning once.
        if (str(where), diff) not in _WARNED:
            _WARNED.add((str(where), diff))
            log.warning("resuming from %s with a changed config (force-resume): %s", where, diff)
        return changes
    raise ConfigError(
        f"{where}: resume refused, the run config differs from the checkpoint's ({diff}); "
        "resume with the same config, or add --force-resume (run config force-resume=true)"
    )


def resume_checkpoint(
    run_dir: str | Path, config: Mapping[str, Any], force: bool = False
) -> dict[str, Any] | None:
    """The run directory's last checkpoint, checked against ``config``; None if there is none.

    A checkpoint without a stored config is compared with the run directory's config.toml
    when there is one.
    """
    rd = RunDir(Path(run_dir))
    if not rd.checkpoint("last").is_file():
        return None
    ckpt = load_checkpoint(rd.checkpoint("last"))
    saved = ckpt["config"]
    if saved is None and rd.config.is_file():
        saved = read_toml(rd.config)
    check_resume(saved, config, rd.checkpoint("last"), force)
    return ckpt


# ----------------------------------------------------------------------------- manifest seal


def seal_path(manifest: str | Path) -> Path:
    """``<stem>.check.json`` beside a derived manifest: its row count, sites and SHA-256."""
    path = Path(manifest)
    return path.with_name(f"{path.stem}.check.json")


def manifest_seal(text: str, rows: int, sites: int) -> dict[str, Any]:
    return {
        "rows": rows,
        "sites": sites,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


def check_seal(manifest: str | Path, rows: int, sites: int) -> None:
    """Refuse a manifest that no longer matches the seal written with it (truncated or
    changed since); a manifest without a seal (written by hand or by ``fedskin partition``)
    is not checked."""
    path = Path(manifest)
    seal = seal_path(path)
    if not seal.is_file():
        return
    try:
        expected = json.loads(seal.read_text(encoding="utf-8"))
        want_rows, want_sites, want_sha = expected["rows"], expected["sites"], expected["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{seal}: unreadable manifest check file ({_one_line(err)})") from None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != want_sha or rows != want_rows or sites != want_sites:
        raise DataError(
            f"{path}: truncated or changed since it was written ({rows} rows and {sites} "
            f"sites, {want_rows} and {want_sites} expected by {seal.name}); delete both "
            "files to rebuild it"
        )
