"""Safe reads and writes of federation key material (``fedskin deploy``).

Writing is safe against a hostile neighbour on the same machine: every folder is opened
relative to the one above it without following links (a symbolic link anywhere from the
output folder down is refused, one line naming it, and one swapped in after the check is
not followed either), private keys are created 0600 from the start inside that folder
(``O_CREAT | O_EXCL | O_NOFOLLOW``), folders holding private keys are 0700 and the others
0755 whatever the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.rundir import link_refused, open_folder, open_subfolder, write_at

# Folders holding a private key (and only those) are 0700; the others 0755.
PRIVATE_FOLDERS = ("ca", "superlink")


def folder_mode(rel: tuple[str, ...]) -> tuple[int, bool]:
    """(mode, set even on an existing folder) for a folder ``rel`` below the output folder."""
    private = (len(rel) == 1 and rel[0] in PRIVATE_FOLDERS) or (len(rel) == 2 and rel[0] == "sites")
    return (0o700, True) if private else (0o755, False)


class KeyFolders:
    """The output folder's subfolders, each opened once relative to its parent without
    following links (:func:`common.rundir.open_subfolder`) and made with its mode."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._fds: dict[tuple[str, ...], int] = {}

    def fd(self, rel: tuple[str, ...]) -> int:
        if rel not in self._fds:
            if not rel:
                self._fds[rel] = open_folder(self.out_dir, follow_root=False, mode=0o755)
            else:
                mode, force = folder_mode(rel)
                self._fds[rel] = open_subfolder(
                    self.fd(rel[:-1]),
                    rel[-1],
                    self.out_dir.joinpath(*rel),
                    mode=mode,
                    force_mode=force,
                )
        return self._fds[rel]

    def write(self, path: Path, data: bytes, *, private: bool) -> None:
        """Write a file; private keys are created 0600 so they are never briefly readable.

        The bytes go to a new temporary file (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600
        or 0644 from its creation) inside the folder fd, renamed over ``path`` in that same
        folder: a symbolic link at ``path`` is refused (so is one before the write, by
        :func:`refuse_links`), and no link on the way is ever followed.
        """
        rel = path.parent.relative_to(self.out_dir).parts
        write_at(self.fd(rel), path.name, data, mode=0o600 if private else 0o644, shown=path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def refuse_links(out_dir: Path, targets: list[Path]) -> None:
    """No output file, no folder between ``out_dir`` and it, nor ``out_dir`` itself may
    be a symbolic link: a (dangling) link would put a private key wherever it points.

    Checked before anything is written, so a refusal writes nothing; the writes then open
    each folder without following links, so a link swapped in after this check is refused
    too (:class:`KeyFolders`).
    """
    if out_dir.is_symlink():
        raise link_refused(out_dir)
    for target in targets:
        rel = target.relative_to(out_dir)
        p = out_dir
        for part in rel.parts:
            p = p / part
            if p.is_symlink():
                raise link_refused(p)


def read_regular(path: Path) -> bytes:
    """A file's bytes, refusing a symbolic link (never followed) or anything not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        if path.is_symlink():
            raise link_refused(path) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return f.read()
