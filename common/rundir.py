"""The run directory: every path in it, the checkpoint format, and checked resumes.

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
    audit.json, audit.png  membership-inference audit (simulations/audit.py)
    external/<format>/     ``fedskin evaluate`` results (simulations/evaluate.py)
    bench-writes/          scratch of ``fedskin bench`` (simulations/bench.py)

Every file fedskin writes goes through :func:`atomic_write` (common/fileio.py, imported
here under its old name): a crash mid-write leaves the old file or the new one, never a
truncated one, and it never writes through a symbolic link.

Checkpoints hold only tensors and plain data (dicts, lists, str, int, float, bool, None),
so :func:`load_checkpoint` reads them with ``torch.load(..., weights_only=True)``: a
checkpoint planted in a run directory cannot run code. Each one stores the run config it
was written under and the SHA-256 of the manifest the run trains on, which the resume
policy (server/resume.py) checks. Its loop state must fit the loop's state dataclass: an
unknown key is refused with one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import os  # noqa: F401 - tests patch common.rundir.os.replace (the atomic rename)
import pickle
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common.config import RunConfig
from common.errors import DataError

# The one atomic writer and the manifest seal live in common/fileio.py (the data pipeline
# uses them without this module); imported here by their old names, which callers use.
from common.fileio import BENCH_WRITES as BENCH_WRITES
from common.fileio import CHECKPOINTS as CHECKPOINTS
from common.fileio import CONFIG as CONFIG
from common.fileio import EXTERNAL as EXTERNAL
from common.fileio import RUN_SUBFOLDERS as RUN_SUBFOLDERS
from common.fileio import SITE_STATE as SITE_STATE
from common.fileio import atomic_copy as atomic_copy
from common.fileio import atomic_torch_save as atomic_torch_save
from common.fileio import atomic_write as atomic_write
from common.fileio import atomic_write_json as atomic_write_json
from common.fileio import atomic_write_text as atomic_write_text
from common.fileio import check_seal as check_seal
from common.fileio import file_sha256 as file_sha256
from common.fileio import link_refused as link_refused
from common.fileio import manifest_seal as manifest_seal
from common.fileio import one_line as one_line
from common.fileio import open_folder as open_folder
from common.fileio import open_subfolder as open_subfolder
from common.fileio import seal_path as seal_path
from common.fileio import write_at as write_at

MANIFEST = "manifest.csv"
METRICS = "metrics.json"
HISTORY = "history.csv"
REPORT = "report.md"
LEARNING_CURVES = "learning_curves.png"
CONFUSION = "confusion_test.png"
NETWORK = "network.json"
AUDIT_JSON = "audit.json"
AUDIT_PNG = "audit.png"
DEFAULT_RUNS = Path("runs")

CHECKPOINT_FORMAT = "fedskin-checkpoint/1"


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


def run_dir_for(run: RunConfig) -> Path:
    """``out-dir``, or ``runs/<run-name>`` when it is empty."""
    return Path(run.out_dir).expanduser() if run.out_dir else DEFAULT_RUNS / run.run_name


# ----------------------------------------------------------------------------- config files


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one line naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid TOML {what} ({one_line(err)})") from None


# ----------------------------------------------------------------------------- checkpoints


def _storable(obj: Any, arrays: str = "tensor") -> Any:
    """Plain data and tensors only: numpy scalars become Python ones, numpy arrays tensors
    (``arrays="tensor"``: same dtype and bytes) or nested lists (``arrays="list"``)."""
    import numpy as np  # lazily, as torch: a run directory's paths need neither
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
    manifest = config_manifest(config)
    if manifest is not None and manifest.is_file():  # the run now knows this manifest
        ckpt["manifest"] = {"path": str(manifest), "sha256": file_sha256(manifest)}
    path = Path(path)
    # checkpoints/ of a run folder: never written through a link in or at it
    root = path.parent.parent if path.parent.name == CHECKPOINTS else None
    return atomic_write(path, lambda f: _torch_save(ckpt, f), root=root)


def _torch_save(obj: Any, f: IO[bytes]) -> None:
    import torch  # lazily: heavy, needed only to write a checkpoint

    torch.save(obj, f)


def config_manifest(config: Mapping[str, Any] | None) -> Path | None:
    """The manifest file a run config names (``manifest``), or None."""
    value = (config or {}).get("manifest")
    return Path(value).expanduser() if isinstance(value, str) and value else None


def _numpy_globals() -> list[Any]:
    """What the weights-only unpickler needs for plain numpy arrays and scalars (older
    checkpoints kept FedAdam's moments as numpy arrays); never arbitrary objects."""
    import numpy as np  # lazily: needed only to read an older checkpoint

    core = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: nothing in the file can run code.

    Tensors, plain Python data and plain numpy arrays are read; anything else, a truncated
    file or one that is not a torch checkpoint is a :class:`DataError` of one line naming
    the file.
    """
    import torch  # lazily: heavy, needed only to read a checkpoint

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
            raise DataError(f"{path}: truncated or not a checkpoint ({one_line(err)})") from None
        what = f" ({found[0]})" if found else ""
        raise DataError(
            f"{path}: refused, it holds objects other than weights{what}; it was not loaded "
            "(a checkpoint fedskin wrote holds only tensors and plain data)"
        ) from None
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in many ways inside torch
        raise DataError(
            f"{path}: truncated or not a checkpoint ({one_line(err)}); delete it to start again"
        ) from None


# The dataclass whose fields a checkpoint's ``state`` fills (the server loop's LoopState),
# as "module:name": looked up when a checkpoint is loaded, so common/ imports no server code
# at import time and a field added to the loop's state is known here at once.
STATE_CLASS = "server.loop:LoopState"


def _accepted(hint: Any) -> tuple[type, ...]:
    """The runtime types a value annotated ``hint`` may have (``object``: any)."""
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
    import torch  # lazily: heavy, needed only to read a checkpoint

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
