"""What a site decides for itself, whatever the server's messages or the run config say.

A site's ClientApp sees three layers of settings: the run config (written by whoever starts
the run), the SuperNode's ``--node-config`` (written by the hospital) and the per-message
config the server sends with every query, train and evaluate message. Keys that describe the
site's data, its privacy budget, its state directory and its identity (:data:`SITE_KEYS`)
come only from the node config, or where the node config is silent from the run config's
defaults; a message that names one of them is ignored for that key, with a warning naming it.
These rules make the server able to ask for *less* exposure but never more:

* ``dp`` is on when the node config or the run config turns it on (a site cannot be talked
  out of DP);
* the site's own budget and limits (:data:`STRICTER_KEYS`: ``target-epsilon``,
  ``target-delta``, ``site-epsilon-limit``, ``max-image-size``) can be lowered by the run
  config, never raised: the smaller value wins. A deployed site's own value is its node
  config's or, where that is silent, the schema's default (common/config.py), never
  the server-written run config's; ``target-delta = 0`` stands for 1 / (10 n-train), so its
  rule is applied once the site's training count is known (:func:`site_delta`), and a site
  whose own delta is above 1 / n-train refuses DP work;
* ``image-size`` (which sets the size of the image cache a site builds) may not exceed the
  site's ``max-image-size`` (:func:`check_image_size`);
* evaluation runs on ``validation`` or ``test`` only (:func:`eval_split`): scores on the
  train split would publish what DP-SGD protects, without its noise.

In a real deployment (not ``fedskin simulate``: Flower's simulation gives every node a
``partition-id`` and ``num-partitions``) the paths a site reads and writes
(:data:`PATH_KEYS`) come from its node config only, and ``dp=true`` needs a ``state-dir``
there, so that a restarted SuperNode still knows the budget it spent (:func:`require_state_dir`):
each run's accountant, and the site's lifetime ledger over all runs, which no run tag resets
and which ``site-epsilon-limit`` caps (client/client_app.py).
Paths are resolved, folders the site writes to may not go up with ``..``, and names joined
onto them (site, run tag) must stay inside (:func:`confined`). Each refusal is a
:class:`SiteConfigError` whose message is one line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig, known_keys, value_of
from common.errors import ConfigError
from common.errors import SiteConfigError as SiteConfigError
from common.fileio import confined as confined  # path confinement, used here and by the data
from common.names import DATA_KEYS, MANIFEST_KEYS

log = logging.getLogger("fedskin")

# Where the site's data is (DATA_KEYS) and how its manifest is derived (MANIFEST_KEYS): both
# from common/names.py.
IDENTITY_KEYS = ("partition-id", "num-partitions")
DP_KEYS = (
    "dp",
    "target-epsilon",
    "target-delta",
    "noise-multiplier",
    "max-grad-norm",
    "dp-head-share",  # the part of its budget a site keeps for the head refit's statistics
    "site-epsilon-limit",  # its lifetime budget over all runs (client/client_app.py: ledger)
)
# How large the images a site decodes and caches may be (the server sets image-size).
LIMIT_KEYS = ("max-image-size",)
# The site's own value caps the run config's: the smaller wins (target-delta: see site_delta).
STRICTER_KEYS = ("target-epsilon", "target-delta", "site-epsilon-limit", "max-image-size")
# Whether the site tells the server its training class counts (class-prior = "federation")
# and its feature statistics (head-calibration = "lda"; common/headfit.py).
DISCLOSURE_KEYS = ("class-prior", "head-calibration")
SITE_KEYS = frozenset(
    (*DATA_KEYS, *MANIFEST_KEYS, *IDENTITY_KEYS, *DP_KEYS, *DISCLOSURE_KEYS, *LIMIT_KEYS)
)
# Folders and files at the site: a deployed site names them itself, in its node config.
PATH_KEYS = ("data-path", "manifest", "cache-dir", "state-dir")
WRITTEN_DIRS = ("cache-dir", "state-dir")  # the site writes below these
EVAL_SPLITS = ("validation", "test")
_KNOWN = known_keys()  # the run-config keys
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def is_simulation(node_config: Mapping[str, Any]) -> bool:
    """Flower's simulation gives each node ``partition-id`` and ``num-partitions``."""
    return "partition-id" in node_config and "num-partitions" in node_config


def _given(values: Mapping[str, Any], key: str) -> bool:
    return key in values and values[key] is not None and values[key] != ""


@dataclass(frozen=True)
class SiteSettings:
    """What a site acts on for one message, merged once (:func:`site_settings`)."""

    run: RunConfig  # run config, node config and the message's values under the site's rules
    run_dp: bool  # the run's own dp: its model is built with or without DP (require_run_dp)
    run_delta: float  # the run's own target-delta, weighed against the site's (site_delta)


def _own(key: str, value: Any, whose: str) -> Any:
    """A value some layer (the site's node config, the server's message) sets, typed and
    checked by the key's rule; refused in one line naming whose value it was."""
    try:
        return value_of({key: value}, key)
    except ConfigError as e:
        raise ConfigError(f"{whose}: {e}") from None


def site_settings(
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    message_config: Mapping[str, Any] | None = None,
) -> SiteSettings:
    """The settings a site acts on: run config, the site's node config, the server's message,
    merged key by key and typed once (one :class:`RunConfig`).

    The node config wins for :data:`SITE_KEYS`; the message may set any other run-config key
    (the learning rate) but none of :data:`SITE_KEYS`; its own fields (the round, FedProx's
    mu: client/message.py) are the caller's to leave out. Every value is typed and checked
    as the run config is; paths are checked and resolved (:func:`check_paths`).
    """
    deployed = not is_simulation(node_config)
    values = {k: v for k, v in run_config.items() if k in _KNOWN}
    if deployed:  # a deployed site's folders are its own
        for key in PATH_KEYS:
            if (value := value_of(values, key)) and not _given(node_config, key):
                log.warning(
                    "site: ignored the run config's %s=%r: a site's paths come from its "
                    "--node-config",
                    key,
                    value,
                )
            values[key] = ""
    own = {
        k: _own(k, node_config[k], "the site's node config")
        for k in SITE_KEYS & _KNOWN
        if _given(node_config, k)
    }
    if deployed:  # silent: the schema's default, not the server's value
        own = {k: RunConfig.model_fields[k.replace("-", "_")].default for k in STRICTER_KEYS} | own
    # The server may ask for more privacy, never less: DP if either side asks for it, and
    # the smaller of two budgets or limits. The site's own target-delta stays: 0 means
    # 1 / (10 n-train), so the run's value is weighed against it by site_delta.
    run_dp = value_of(values, "dp")
    site = {k: own.get(k, value_of(values, k)) for k in (*STRICTER_KEYS, "dp")}
    stricter = {k: min(value_of(values, k), site[k]) for k in STRICTER_KEYS if k != "target-delta"}
    mine = own | stricter | {"dp": run_dp or site["dp"]}
    asked = {}
    for key, value in (message_config or {}).items():
        if key in SITE_KEYS:
            held = (
                (mine[key] if key in mine else value_of(values, key))
                if key in _KNOWN
                else (node_config.get(key, ""))
            )
            if str(value) != str(held):
                log.warning(
                    "site: ignored the server's %s=%r: the site's own setting (%r) stays",
                    key,
                    value,
                    held,
                )
        elif key in _KNOWN:
            asked[key] = _own(key, value, "the server's message")
    merged = check_paths({**values, **mine, **asked})
    run = check_image_size(RunConfig.from_mapping(merged))
    if run.dp and run.grad_sample_mode == "ghost" and deployed:
        # ghost clipping never forms per-sample gradients, so one image's non-finite
        # gradient cannot be zeroed before the clip (common/train.py): not at a real site
        raise SiteConfigError(
            "grad-sample-mode='ghost': refused under DP at a deployed site (its per-sample "
            "gradients cannot be checked for non-finite values); use auto, hooks or functorch"
        )
    return SiteSettings(run, run_dp, value_of(values, "target-delta"))


def site_config(
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    message_config: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The merged run config of :func:`site_settings`."""
    return site_settings(run_config, node_config, message_config).run


def site_node(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config without the data keys :func:`site_settings` already merged (and
    resolved): what the data pipeline needs besides the merged config (the site's name,
    its partition)."""
    return {k: v for k, v in node_config.items() if k == "site" or k not in DATA_KEYS}


def check_image_size(run: RunConfig) -> RunConfig:
    """Refuse an ``image-size`` above the site's ``max-image-size``: the site would decode
    and cache its images at whatever size the server names."""
    if run.image_size > run.max_image_size:
        raise SiteConfigError(
            f"image-size={run.image_size}: above this site's max-image-size="
            f"{run.max_image_size} (set in its --node-config); refusing"
        )
    return run


def site_delta(settings: SiteSettings, n_train: int) -> float:
    """The delta a site's DP accountant uses: the smaller of the site's own (the merged
    settings') and the run's own, each ``0 -> 1 / (10 n_train)``. Refused when the site's
    own delta is above 1 / n_train (a guarantee that allows publishing a whole record)."""
    auto = 1.0 / (10 * n_train)
    own = settings.run.target_delta or auto
    if own > 1.0 / n_train:
        raise SiteConfigError(
            f"target-delta={own:g}: above 1/n-train = 1/{n_train} ({1.0 / n_train:.3g}) at "
            "this site; set target-delta <= 1/n-train (0: 1/(10 n-train)) to train under DP"
        )
    return min(own, settings.run_delta or auto)


def check_paths(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the path keys resolved; a folder the site writes to may not contain
    ``..``."""
    resolved = dict(values)
    for key in PATH_KEYS:
        value = value_of(values, key)
        if not value:
            continue
        if key in WRITTEN_DIRS and ".." in Path(value).parts:
            raise SiteConfigError(
                f"{key}={value!r}: must not contain '..' (name the folder itself)"
            )
        resolved[key] = str(Path(value).expanduser().resolve())
    return resolved


def safe_name(value: Any, what: str) -> str:
    """A file-name part (site name, run tag): no separators, no '..', nothing hidden."""
    name = str(value)
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in ("/", "\\", "\0"))
    ):
        raise SiteConfigError(f"{what}={name!r}: not allowed in a file name")
    return name


def run_tag(value: Any) -> str:
    """The run's tag (the server makes it: 12 hex digits), as a file-name part."""
    tag = str(value)
    if not _TAG.match(tag) or ".." in tag:
        raise SiteConfigError(
            f"run-tag={tag!r}: must be 1-64 letters, digits, '_', '-' or '.', without '..'"
        )
    return tag


def eval_split(split: str) -> str:
    """The split the server asks a site to score: validation or test, never train."""
    if split not in EVAL_SPLITS:
        log.warning("site: refused the server's split=%r", split)
        raise SiteConfigError(
            f"split={split!r}: a site evaluates on {' or '.join(EVAL_SPLITS)} only"
        )
    return split


def require_run_dp(settings: SiteSettings) -> None:
    """A site that keeps DP on (its merged settings) refuses a run whose model is built
    without it (the run's own dp)."""
    if settings.run.dp and not settings.run_dp:
        raise SiteConfigError(
            "dp=true at this site (its --node-config) but the run is configured without "
            "sample-level DP (dp=false): refusing to train or score its model"
        )


def require_state_dir(run: RunConfig, node_config: Mapping[str, Any]) -> None:
    """A deployed site under DP keeps its accountant on disk, or does not train."""
    if run.dp and not is_simulation(node_config) and not run.state_dir:
        site = node_config.get("site", "") or "this site"
        raise SiteConfigError(
            f"{site}: dp=true needs state-dir in the site's --node-config (where its privacy "
            "accountant survives a restart); refusing to train"
        )
