"""Atomic file writes, confined paths and the manifest seal: the file I/O under everything.

Every file fedskin writes goes through :func:`atomic_write` (a temporary file in the same
folder, flushed and fsynced, then ``os.replace``): a crash mid-write leaves the old file
or the new one, never a truncated one. It never writes through a symbolic link: not at the
file itself, nor at a run folder's subfolder (``checkpoints/``, ``site-state/``, ...) on
the way to it; each folder is opened relative to the one before without following links.

A leaf of ``common``: it imports only :mod:`common.errors`, so the data pipeline
(common/data/) writes its cache and manifests without importing the run directory's
module (common/rundir.py, which imports the run config) and both share one writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from common.errors import DataError, SiteConfigError

# The run directory's config file and the subfolders fedskin writes into (common/rundir.py
# names every path of a run directory; these are the ones atomic_write's link checks need).
CONFIG = "config.toml"
CHECKPOINTS = "checkpoints"
SITE_STATE = "site-state"
EXTERNAL = "external"
BENCH_WRITES = "bench-writes"


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


def json_safe(obj: Any) -> Any:
    """NaN (an undefined metric, e.g. AUROC with one class present) becomes null, in nested
    dicts and lists too, so the JSON written is standard JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, **dumps)`` written atomically."""
    return atomic_write(path, json.dumps(obj, **dumps))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a (small) file atomically: ``dst`` is never seen half-copied."""
    return atomic_write(dst, Path(src).read_bytes())


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically."""
    import torch  # lazily: torch is heavy and most writers never need it

    return atomic_write(path, lambda f: torch.save(obj, f))


def one_line(err: BaseException) -> str:
    """The first sentence of an error message, on one line."""
    text = " ".join(str(err).split()).split(". ")[0]
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- confined paths


def confined(folder: str | Path, name: str) -> Path:
    """``folder / name``, refused unless it resolves to an entry directly in ``folder``."""
    base = Path(folder).expanduser().resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise SiteConfigError(f"{name!r} would leave the folder {base}")
    return path


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
      checkpoint, server/resume.py: ``known_manifest``): the file must have exactly those bytes.

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
            raise DataError(f"{path}: unreadable manifest ({one_line(err)})") from None
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
        raise DataError(f"{seal}: unreadable manifest check file ({one_line(err)})") from None
    sha = file_sha256(path)
    rows = want_rows if rows is None else rows
    sites = want_sites if sites is None else sites
    if sha != want_sha or rows != want_rows or sites != want_sites:
        raise DataError(
            f"{path}: truncated or changed since it was written ({rows} rows and {sites} "
            f"sites, {want_rows} and {want_sites} expected by {seal.name}); delete both "
            "files to rebuild it"
        )
