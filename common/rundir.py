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
or the new one, never a truncated one. It never writes through a symbolic link: not at the
file itself, nor at a run folder's subfolder (``checkpoints/``, ``site-state/``, ...) on
the way to it; each folder is opened relative to the one before without following links.

Checkpoints hold only tensors and plain data (dicts, lists, str, int, float, bool, None),
so :func:`load_checkpoint` reads them with ``torch.load(..., weights_only=True)``: a
checkpoint planted in a run directory cannot run code. Each one stores the run config it
was written under; :func:`check_resume` refuses to continue under a config that changes
the result, unless the user says so (``--force-resume`` / ``force-resume=true``), and the
SHA-256 of the manifest the run trains on: a resume on a changed manifest is refused, with
or without the seal beside it (:func:`check_seal`). Its loop state must fit the loop's
state dataclass: an unknown key is refused with one line naming the file and the key.
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
import stat
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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Folders of a run directory fedskin writes into (and makes itself): never through a link.
RUN_SUBFOLDERS = frozenset({CHECKPOINTS, SITE_STATE, EXTERNAL, BENCH_WRITES})


def link_refused(path: str | Path) -> DataError:
    """The one-line error for a symbolic link where fedskin writes."""
    return DataError(f"refusing to write through a symbolic link: {path}")


def _is_link(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_subfolder(
    dir_fd: int,
    name: str,
    shown: str | Path,
    *,
    mode: int | None = None,
    force_mode: bool = False,
    follow: bool = False,
) -> int:
    """An fd of the folder ``name`` inside the folder ``dir_fd``, made when missing.

    Opened relative to ``dir_fd`` with ``O_DIRECTORY | O_NOFOLLOW``: a symbolic link there
    is refused (:class:`DataError` of one line naming ``shown``), and the fd stays on the
    folder that was checked even if a link is swapped in afterwards. A folder it makes gets
    exactly ``mode`` (made 0700, then ``fchmod``: the umask can neither widen nor narrow
    it) or, ``mode`` None, the usual 0777 less the umask; ``force_mode`` also sets ``mode``
    on a folder that was there already. ``follow``: a link to a folder is followed.
    """
    created = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o777 if mode is None else 0o700, dir_fd=dir_fd)
        created = True
    flags = os.O_RDONLY | _DIRECTORY | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        if not follow and _is_link(name, dir_fd):
            raise link_refused(shown) from None
        raise
    try:
        if mode is not None and (created or force_mode):
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_folder(
    root: str | Path,
    parts: tuple[str, ...] | list[str] = (),
    *,
    follow_root: bool = True,
    mode: int | None = None,
) -> int:
    """An fd of ``root/parts...``, each part opened by :func:`open_subfolder` (made with
    ``mode`` when missing; a link refused, one line naming it). ``root`` is made when
    missing (with its parents) and, ``follow_root`` False, may not be a link itself; the
    folders above it are the user's and are followed."""
    root = Path(root)
    if follow_root:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    else:
        root = root.absolute()
        root.parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(root.parent, os.O_RDONLY | _DIRECTORY)
        try:
            fd = open_subfolder(parent, root.name, root, mode=mode)
        finally:
            os.close(parent)
    shown = root
    for part in parts:
        shown = shown / part
        try:
            sub = open_subfolder(fd, part, shown, mode=mode)
        finally:
            os.close(fd)
        fd = sub
    return fd


def write_at(
    dir_fd: int,
    name: str,
    data: bytes | str | Callable[[IO[bytes]], Any],
    *,
    mode: int | None = None,
    shown: str | Path | None = None,
) -> None:
    """Write the file ``name`` inside the folder ``dir_fd`` atomically (see
    :func:`atomic_write`); ``name`` may not be a symbolic link (one line naming ``shown``).

    The temporary file is created relative to ``dir_fd`` with ``O_CREAT | O_EXCL |
    O_WRONLY | O_NOFOLLOW`` and ``mode`` from the start, and renamed over ``name`` inside the
    same folder: the bytes land in the folder that was checked, whatever is swapped in
    along the path meanwhile.
    """
    shown = name if shown is None else shown
    if _is_link(name, dir_fd):
        raise link_refused(shown)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    fd = os.open(tmp, flags, 0o666 if mode is None else mode, dir_fd=dir_fd)
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
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)  # the rename itself durable (POSIX)


def _guarded_root(path: Path) -> tuple[Path, tuple[str, ...]]:
    """Where the link checks of :func:`atomic_write` start: above the outermost run-folder
    subfolder (:data:`RUN_SUBFOLDERS`, in a folder holding a config.toml) among the file's
    three nearest folders, else at the file's own folder."""
    root, parts = path.parent, ()
    for folder in list(path.parents)[:3]:
        if folder.name in RUN_SUBFOLDERS and (folder.parent / CONFIG).is_file():
            root, parts = folder.parent, path.parent.relative_to(folder.parent).parts
    return root, parts


def atomic_write(
    path: str | Path,
    data: bytes | str | Callable[[IO[bytes]], Any],
    *,
    mode: int | None = None,
    root: str | Path | None = None,
) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole.

    ``data`` is bytes, text (UTF-8) or a function that writes to a binary file object. It
    goes to a uniquely named temporary file beside ``path`` (same file system), which is
    flushed and fsynced, then renamed over ``path`` with ``os.replace``; on any error the
    temporary file is removed and ``path`` is left as it was. Missing parent folders are
    created. The new file gets the usual permissions (0666 less the umask), or exactly
    ``mode`` (a private key: 0600 from its creation, never briefly readable by others). The
    temporary file is opened ``O_EXCL | O_NOFOLLOW``: never an existing file or a link.

    Never through a symbolic link: ``path`` itself may not be one, nor any folder below
    ``root`` on the way to it (each opened relative to the one before, ``O_NOFOLLOW``, so
    a link swapped in after the check is not followed either); a :class:`DataError` of one
    line names it. Without ``root``, the checks start above a run folder's subfolder
    (``checkpoints/``, ``site-state/``, ``external/``, ``bench-writes/`` of a folder with a
    config.toml), else at ``path``'s own folder; the folders above are the user's.
    """
    path = Path(path)
    if root is None:
        start, parts = _guarded_root(path)
    else:
        start = Path(root)
        try:
            parts = path.parent.relative_to(start).parts
        except ValueError:
            raise ValueError(f"{path} is not inside {start}") from None
        if ".." in parts:
            raise ValueError(f"{path} leaves {start}")
    fd = open_folder(start, parts)
    try:
        write_at(fd, path.name, data, mode=mode, shown=path)
    finally:
        os.close(fd)
    return path


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
    manifest = _config_manifest(config)
    if manifest is not None and manifest.is_file():  # the run now knows this manifest
        ckpt["manifest"] = {"path": str(manifest), "sha256": file_sha256(manifest)}
    path = Path(path)
    # checkpoints/ of a run folder: never written through a link in or at it
    root = path.parent.parent if path.parent.name == CHECKPOINTS else None
    return atomic_write(path, lambda f: _torch_save(ckpt, f), root=root)


def _torch_save(obj: Any, f: IO[bytes]) -> None:
    import torch

    torch.save(obj, f)


def _config_manifest(config: Mapping[str, Any] | None) -> Path | None:
    """The manifest file a run config names (``manifest``), or None."""
    value = (config or {}).get("manifest")
    return Path(value).expanduser() if isinstance(value, str) and value else None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# The dataclass whose fields a checkpoint's ``state`` fills (the server loop's LoopState),
# as "module:name": looked up when a checkpoint is loaded, so common/ imports no server code
# at import time and a field added to the loop's state is known here at once.
STATE_CLASS = "server.loop:LoopState"


def _accepted(hint: Any) -> tuple[type, ...]:
    """The runtime types a value annotated ``hint`` may have (``object``: any)."""
    import types
    import typing

    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _accepted(a))
    if origin is float:
        return (float, int)
    if origin is type(None) or hint is None:
        return (type(None),)
    return (origin,) if isinstance(origin, type) and origin is not object else (object,)


def state_fields(
    spec: str | None = None,
) -> tuple[dict[str, tuple[type, ...]], set[str]] | None:
    """``({field: accepted types}, required fields)`` of the loop-state dataclass named by
    ``spec`` (default :data:`STATE_CLASS`); None when it cannot be imported (a state is
    then not checked key by key)."""
    import dataclasses
    import importlib
    import typing

    module, _, name = (spec or STATE_CLASS).partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
    except (ImportError, AttributeError, NameError, TypeError):
        return None
    missing = dataclasses.MISSING
    required = {f.name for f in fields if f.default is missing and f.default_factory is missing}
    return {f.name: _accepted(hints.get(f.name, Any)) for f in fields}, required


def state_error(
    state: Mapping[str, Any], spec: str | None = None, *, complete: bool = False
) -> str | None:
    """Why a checkpoint's ``state`` cannot fill the loop's state dataclass, or None: an
    unknown key, a value of the wrong type, or (``complete``: it is about to) a missing
    required key."""
    spec_fields = state_fields(spec)
    if spec_fields is None:
        return None
    fields, required = spec_fields
    for key in state:
        if key not in fields:
            shown = " ".join(repr(key).split())[:60]
            return f"unknown state key {shown} (known: {', '.join(sorted(fields))})"
    for key in sorted(required - set(state)) if complete else ():
        return f"state key {key!r} is missing"
    for key, value in state.items():
        accepted = fields[key]
        if object in accepted:
            continue
        if isinstance(value, bool) and bool not in accepted:  # True is an int to isinstance
            return f"state key {key!r} holds bool, not {accepted[0].__name__}"
        if not isinstance(value, accepted):
            return f"state key {key!r} holds {type(value).__name__}, not {accepted[0].__name__}"
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint the server loop wrote (see :func:`save_checkpoint`), checked for shape.

    Its ``state`` must fit the loop's state (:data:`STATE_CLASS`): an unknown key, a
    missing required one or a value of the wrong type is a :class:`DataError` of one line
    naming the file and the key, never a TypeError when the loop builds its state.
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
    if "state" in ckpt and (why := state_error(ckpt["state"])):
        raise DataError(f"{path}: refused, {why}; it was not loaded")
    config = ckpt.get("config")
    if config is not None and not isinstance(config, dict):
        raise DataError(f"{path}: not a fedskin checkpoint ('config' is not a dict)")
    manifest = ckpt.get("manifest")
    if manifest is not None and not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("path"), str)
        and isinstance(manifest.get("sha256"), str)
    ):
        raise DataError(f"{path}: not a fedskin checkpoint ('manifest' is not a path and hash)")
    ckpt.setdefault("state", {})
    ckpt.setdefault("strategy", {})
    ckpt.setdefault("config", None)
    ckpt.setdefault("manifest", None)
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
    when there is one. Its state must hold every key the loop's state needs, and the
    manifest the config names must be the one the run trained on
    (:func:`check_known_manifest`); both refused with one line naming the file.
    """
    rd = RunDir(Path(run_dir))
    if not rd.checkpoint("last").is_file():
        return None
    ckpt = load_checkpoint(rd.checkpoint("last"))
    saved = ckpt["config"]
    if saved is None and rd.config.is_file():
        saved = read_toml(rd.config)
    check_resume(saved, config, rd.checkpoint("last"), force)
    if why := state_error(ckpt["state"], complete=True):  # the loop's state is made from it
        raise DataError(f"{rd.checkpoint('last')}: refused, {why}; it was not loaded")
    check_known_manifest(ckpt, config, rd.root)
    return ckpt


def known_manifest(ckpt: Mapping[str, Any] | None, run_dir: str | Path | None = None) -> str | None:
    """The SHA-256 of the manifest a run already trained on, or None when it knows none.

    From its checkpoint (``manifest``, recorded by :func:`save_checkpoint` with every
    round), else from the copy the runner keeps in the run folder (``manifest.csv``) when
    the checkpoint's config names a manifest file.
    """
    recorded = (ckpt or {}).get("manifest")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("sha256"), str):
        return str(recorded["sha256"])
    if run_dir is not None and _config_manifest((ckpt or {}).get("config")) is not None:
        copy = RunDir(Path(run_dir)).manifest
        if copy.is_file() and not copy.is_symlink():
            return file_sha256(copy)
    return None


def check_known_manifest(
    ckpt: Mapping[str, Any], config: Mapping[str, Any], run_dir: str | Path | None = None
) -> None:
    """Refuse to resume on a manifest file other than the one the run trained on.

    When the run config names the same manifest file as the checkpoint's config did (a
    different file is a config change: :func:`check_resume`), its bytes must hash to what
    the run recorded (:func:`known_manifest`), with or without a seal beside it and even
    under force-resume: relabelled, moved or truncated rows would silently change what the
    resumed model learns and is evaluated on.
    """
    current = _config_manifest(config)
    saved = _config_manifest(ckpt.get("config"))
    if current is None or (saved is not None and saved != current) or not current.exists():
        return  # no manifest here (a missing one is refused by whoever reads it)
    expected = known_manifest(ckpt, run_dir)
    if expected is None:
        return
    check_seal(current, None, None, known_sha256=expected)


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


def check_seal(
    manifest: str | Path,
    rows: int | None,
    sites: int | None,
    *,
    known_sha256: str | None = None,
) -> None:
    """Refuse a manifest that no longer matches what was recorded of it.

    Two records are checked:

    * the seal written beside a derived manifest (:func:`seal_path`): its row count
      (``rows``), site count (``sites``; None: not compared) and SHA-256 must match;
    * ``known_sha256``, the hash a run recorded of the manifest it trained on (its
      checkpoint, :func:`known_manifest`): the file must have exactly those bytes.

    The rule: a manifest a run already knows is checked against the run's own record, so
    deleting (or rewriting) the seal beside it does not get a relabelled manifest past the
    resume. A manifest no run knows yet and without a seal (written by hand, or by
    ``fedskin partition``) is accepted as it is: it starts a new run, which records it.
    A seal is no signature: anyone who can rewrite the manifest can rewrite the seal; it
    catches truncation and accidental edits of a derived manifest.
    """
    path = Path(manifest)
    if known_sha256 is not None:
        try:
            sha = file_sha256(path)
        except OSError as err:
            raise DataError(f"{path}: unreadable manifest ({_one_line(err)})") from None
        if sha != known_sha256:
            raise DataError(
                f"{path}: changed since the run trained on it (SHA-256 {sha[:12]}..., the run "
                f"recorded {known_sha256[:12]}...); restore it, or start a new run "
                "(another out-dir) on the changed manifest"
            )
    seal = seal_path(path)
    if not seal.is_file():
        return
    try:
        expected = json.loads(seal.read_text(encoding="utf-8"))
        want_rows, want_sites, want_sha = expected["rows"], expected["sites"], expected["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{seal}: unreadable manifest check file ({_one_line(err)})") from None
    sha = file_sha256(path)
    rows = want_rows if rows is None else rows
    sites = want_sites if sites is None else sites
    if sha != want_sha or rows != want_rows or sites != want_sites:
        raise DataError(
            f"{path}: truncated or changed since it was written ({rows} rows and {sites} "
            f"sites, {want_rows} and {want_sites} expected by {seal.name}); delete both "
            "files to rebuild it"
        )
