"""The one resume policy: a run folder's last checkpoint checked before a run continues from
it (the run folder and the checkpoint format: common/rundir.py).

Each checkpoint stores the run config it was written under; :func:`check_resume` refuses to
continue under a config that changes the result, unless the user says so
(``--force-resume`` / ``force-resume=true``), and the SHA-256 of the manifest the run
trains on: a resume on a changed manifest is refused, with or without the seal beside it
(common/fileio.py: ``check_seal``). Run once per run: by the ServerApp, which hands the
checked checkpoint to the round loop (:class:`Resume`), or by the ``fedskin simulate``
runner before it starts anything, which hands its :class:`Resume` to the ServerApp it starts
in the same process (server/server_app.py: ``app_resuming``). A loop started on its own
(tests) checks for itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError
from common.fileio import check_seal, file_sha256
from common.rundir import RunDir, config_manifest, load_checkpoint, read_toml, state_error

log = logging.getLogger("fedskin")

# Run-config keys that may differ between a checkpoint and the run that resumes it: how
# many rounds in all (more, to continue a run), how long to wait and for whom, where the
# outputs go (and are tracked in MLflow), the post-run audit, and the Ray resources of the
# simulated sites. Every other key can change the model or what is reported about it.
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
        "tracking-uri",
        "audit",
        "audit-reference",
        "client-num-cpus",
        "client-num-gpus",
        "client-memory-mb",
    }
)


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
    if saved is None:
        log.warning("%s stores no run config: the resumed config cannot be checked", where)
        return []
    changes = config_changes(saved, current)
    if not changes:
        return []
    diff = "; ".join(changes)
    if force:
        log.warning("resuming from %s with a changed config (force-resume): %s", where, diff)
        return changes
    raise ConfigError(
        f"{where}: resume refused, the run config differs from the checkpoint's ({diff}); "
        "resume with the same config, or add --force-resume (run config force-resume=true)"
    )


@dataclass(frozen=True)
class Resume:
    """The outcome of a run's one resume check, handed on to whoever starts from it: the run
    folder's last checkpoint, checked (None: there is none, the run starts fresh)."""

    checkpoint: dict[str, Any] | None


def resume_checkpoint(
    run_dir: str | Path, config: Mapping[str, Any], force: bool = False
) -> dict[str, Any] | None:
    """The run directory's last checkpoint, checked against ``config``; None if there is none.

    The one resume policy, checked afresh on every call (whoever checks hands the result
    on, :class:`Resume`): the config may change only in :data:`RESUME_MAY_CHANGE` unless ``force``
    (:func:`check_resume`); a checkpoint without a stored config is compared with the run
    directory's config.toml when there is one. Its state must hold every key the loop's
    state needs, and the manifest the config names must be the one the run trained on
    (:func:`check_known_manifest`); each refused with one line naming the file.
    """
    rd = RunDir(Path(run_dir))
    if not rd.checkpoint("last").is_file():
        return None
    ckpt = load_checkpoint(rd.checkpoint("last"))
    _check_resumable(rd, ckpt, config, force)
    return ckpt


def _check_resumable(
    rd: RunDir, ckpt: dict[str, Any], config: Mapping[str, Any], force: bool
) -> None:
    saved = ckpt["config"]
    if saved is None and rd.config.is_file():
        saved = read_toml(rd.config)
    check_resume(saved, config, rd.checkpoint("last"), force)
    if why := state_error(ckpt["state"], complete=True):  # the loop's state is made from it
        raise DataError(f"{rd.checkpoint('last')}: refused, {why}; it was not loaded")
    check_known_manifest(ckpt, config, rd.root)


def known_manifest(ckpt: Mapping[str, Any] | None, run_dir: str | Path | None = None) -> str | None:
    """The SHA-256 of the manifest a run already trained on, or None when it knows none.

    From its checkpoint (``manifest``, recorded by :func:`save_checkpoint` with every
    round), else from the copy the runner keeps in the run folder (``manifest.csv``) when
    the checkpoint's config names a manifest file.
    """
    recorded = (ckpt or {}).get("manifest")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("sha256"), str):
        return str(recorded["sha256"])
    if run_dir is not None and config_manifest((ckpt or {}).get("config")) is not None:
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
    current = config_manifest(config)
    saved = config_manifest(ckpt.get("config"))
    if current is None or (saved is not None and saved != current) or not current.exists():
        return  # no manifest here (a missing one is refused by whoever reads it)
    expected = known_manifest(ckpt, run_dir)
    if expected is None:
        return
    check_seal(current, None, None, known_sha256=expected)
