"""fedskin's version: the package's, plus the git commit when run from a checkout.

``fedskin --version`` prints it, the ServerApp and each site log it at start, and each site
sends it in its discovery reply, so that the server can name a site that runs other code
(server/discovery.py). Nothing here touches the network.
"""

from __future__ import annotations

import functools
import os
import subprocess
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


@functools.cache
def version() -> str:
    """``0.1.0``, or ``0.1.0 (git b52a596-dirty)`` when run from a git checkout."""
    base = package_version()
    described = git_describe()
    return f"{base} (git {described})" if described else base
