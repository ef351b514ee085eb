"""fedskin's version: the package's, plus the git commit when run from a checkout.

``fedskin --version`` prints it, the ServerApp and each site log it at start, and each site
sends it in its discovery reply, so that the server can name a site that runs other code
(server/discovery.py). Nothing here touches the network.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import urllib.parse
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "fedskin"  # [project] name in pyproject.toml
GIT_TIMEOUT = 2.0  # seconds; a slow or hung git gives the package version alone
ROOT = Path(__file__).resolve().parents[1]  # the folder that holds common/, server/, ...


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), or ``0+unknown``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def git_describe(root: Path = ROOT) -> str | None:
    """``git describe --always --dirty --tags`` of the checkout at ``root``, or None when
    ``root`` is not a git checkout (no ``.git`` there) or git fails, is missing or slow."""
    if not (root / ".git").exists():
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take index.lock from a commit
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=True,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    text = out.stdout.strip()
    return text if text and text.isprintable() and len(text) <= 80 else None


def source_checkout(root: Path = ROOT) -> Path | None:
    """The git checkout this fedskin comes from: ``root`` (the code's own folder) when it is
    one, else the folder the installed distribution was installed from in editable mode
    (``pip install -e``, recorded in its ``direct_url.json``). The second is the case of an
    app Flower runs from an unpacked FAB (the ServerApp): its code is the installed code, so
    it reports the same version as a site that runs the installed ClientApp."""
    if (root / ".git").exists():
        return root
    for dist in metadata.distributions(name=DISTRIBUTION):  # an egg-info beside may come first
        try:
            record = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = urllib.parse.urlparse(str(record.get("url", "")))
        if url.scheme == "file" and record.get("dir_info", {}).get("editable"):
            path = Path(urllib.parse.unquote(url.path))
            return path if (path / ".git").exists() else None
    return None


@functools.cache
def version() -> str:
    """``0.1.0``, or ``0.1.0 (git b52a596-dirty)`` when run from a git checkout (or from an
    editable install of one)."""
    base = package_version()
    checkout = source_checkout()
    described = git_describe(checkout) if checkout else None
    return f"{base} (git {described})" if described else base
