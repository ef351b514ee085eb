"""What runs at a site: a task's FAB checked against the installed project (client/warm_exec.py).

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
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import client

DEFAULT_CLIENTAPP = "client.client_app:app"
FAB_METADATA_DIR = ".info/"
MAX_FAB_UNPACKED = 512 << 20  # bytes: a FAB that unpacks to more is refused unread


def sha256(data: bytes) -> str:
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
        return cls(Path(client.__file__).resolve().parent.parent)

    def packages(self) -> tuple[str, ...]:
        """The project's top-level package patterns (pyproject's setuptools ``include``);
        none without an installed pyproject.toml (then only --allow-fab-hash admits a FAB)."""
        tool = (self.pyproject() or {}).get("tool", {})
        return tuple(
            tool.get("setuptools", {}).get("packages", {}).get("find", {}).get("include", ())
        )

    def snapshot_imports(self) -> None:
        """Remember the content of every module imported from the project's own packages so
        far: the children run these, whatever the files on disk say later. Third-party
        modules are not the project's, even when their environment sits in the checkout
        (``.venv``): hashing torch's libraries cost a launcher 15-25 CPU-s at start."""
        patterns = self.packages()
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not path:
                continue
            try:
                rel = Path(path).resolve().relative_to(self.root)
            except ValueError:
                continue
            if not any(fnmatch(rel.parts[0], pattern) for pattern in patterns):
                continue
            try:
                self.imported[rel.as_posix()] = sha256(Path(path).read_bytes())
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

    def filesha256(self, rel: str) -> str | None:
        if rel in self.imported:
            return self.imported[rel]
        path = self.root / rel
        if path.is_symlink() or not path.is_file():
            return None
        try:
            return sha256(path.read_bytes())
        except OSError:
            return None


@dataclass(frozen=True)
class FabPolicy:
    """Which FABs a site serves (with its installed ClientApp): see the module docstring."""

    installed: InstalledApp
    allow_hashes: frozenset[str] = frozenset()

    def refusal(self, content: bytes) -> str | None:
        """None if the FAB ``content`` is accepted, else why not (one line)."""
        if sha256(content) in self.allow_hashes:
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
            installed = self.installed.filesha256(rel)
            if installed is None:
                return f"{rel} is in the FAB but not installed in {self.installed.root}"
            if installed != sha256(files[rel]):
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


class FabRefused(Exception):
    """The task's FAB is not the installed app."""
