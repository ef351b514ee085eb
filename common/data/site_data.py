"""From run config to one site's tensors: the single path used by simulation and deployment.

In simulation the runner writes a manifest for all sites and each simulated SuperNode picks
its site by partition id; in a real deployment the SuperNode's ``--node-config`` names the
site and its local files. Both end in :func:`load_site`, so there is one code path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.data.formats import BUILTIN_FORMAT, FORMAT_CLASSES
from common.data.schema import DataError, SourceData, default_home

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.data.cache import ImageCache

log = logging.getLogger("fedskin")

# BUILTIN_FORMAT, FORMAT_CLASSES: derived from the format registry (common/data/formats.py)
SPLITS = ("train", "validation", "test")

# What a data location is made of; node config overrides run config for these keys.
DATA_KEYS = ("data-format", "data-path", "manifest", "site", "cache-dir", "state-dir")


# What the derived manifest depends on (besides the source itself).
_MANIFEST_KEYS = (
    "scheme",
    "num-sites",
    "dirichlet-alpha",
    "institutions",
    "seed",
    "builtin-images",
)


def classes_for(fmt: str) -> list[str]:
    """Class names of a data format (the model head is sized from this)."""
    try:
        return FORMAT_CLASSES[fmt]
    except KeyError:
        raise DataError(
            f"unknown data-format {fmt!r}; choose one of {sorted(FORMAT_CLASSES)}"
        ) from None


def _typed(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    from common.config import run_config_of  # common.config imports this module

    return run_config_of(cfg)


def merged_config(
    run_config: RunConfig | Mapping[str, Any], node_config: Mapping[str, Any]
) -> tuple[RunConfig, str]:
    """The run config with the site's own node config on top (data paths are the site's),
    and the site's name (``site``: a node-config key; "" lets the partition id pick one)."""
    flat = dict(run_config) if isinstance(run_config, Mapping) else run_config.to_flat()
    site = str(node_config.get("site") or flat.pop("site", "") or "")
    for key in DATA_KEYS:
        if key != "site" and key in node_config and node_config[key] != "":
            flat[key] = node_config[key]
    return _typed(flat), site


def resolve_source(cfg: RunConfig | Mapping[str, Any]) -> tuple[str, Path]:
    """Return (format, path); the built-in default is synthesized once and cached."""
    run = _typed(cfg)
    if run.data_format == BUILTIN_FORMAT:
        from common.data.synth import ensure_builtin

        size = max(run.image_size, 32)
        n_images = run.builtin_images
        return "ham-dataverse", ensure_builtin("ham-dataverse", n_images=n_images, image_size=size)
    classes_for(run.data_format)
    if not run.data_path:
        raise DataError(
            f"data-format={run.data_format!r} needs data-path (the folder of its files)"
        )
    return run.data_format, Path(run.data_path).expanduser()


def cache_dir(cfg: RunConfig | Mapping[str, Any]) -> Path:
    d = _typed(cfg).cache_dir
    return Path(d).expanduser() if d else default_home() / "cache"


def ensure_manifest(cfg: RunConfig | Mapping[str, Any], source: SourceData | None = None) -> Path:
    """The manifest named in the config, or one made deterministically from the scheme.

    Every process that derives it from the same config writes byte-identical content via
    an atomic rename, so simulated clients racing on it cannot corrupt it. Pass the
    already-loaded ``source`` to avoid reading its metadata twice.
    """
    run = _typed(cfg)
    given = run.manifest
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise DataError(f"manifest file not found: {p}")
        return p
    from common.data.partition import (
        moves_report_path,
        partition,
        write_manifest,
        write_moves_report,
    )

    if source is None:
        from common.data.sources import load_source

        source = load_source(*resolve_source(run))
    from common.siteconfig import confined  # config values are in the name: stay inside

    out = confined(cache_dir(run) / "manifests", f"{source.fingerprint}-{run.manifest_key()}.csv")
    if not out.is_file():
        manifest = partition(
            source.meta,
            run.scheme,
            classes=source.classes,
            num_sites=run.num_sites,
            alpha=run.dirichlet_alpha,
            institutions=run.institution_list(),
            seed=run.seed,
        )
        for note in manifest.attrs.get("notes", []):
            log.info("manifest: %s", note)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_moves_report(manifest, out)  # before the manifest: a cached one has its report
        write_manifest(manifest, out, seal=True)  # atomic; reuse checks its seal
    elif moves_report_path(out).is_file():  # cached: repeat what was moved to keep groups whole
        moves = moves_report_path(out)
        try:
            log.info("manifest: %s (%s)", json.loads(moves.read_text())["note"], moves)
        except (OSError, ValueError, KeyError):  # only a log line: never fail the run over it
            log.info("manifest: images were moved to keep groups at one site; see %s", moves)
    return out


def site_names(manifest: pd.DataFrame) -> list[str]:
    return sorted(manifest["site"].astype(str).unique())


def pick_site(manifest: pd.DataFrame, site: str, node_config: Mapping) -> str:
    """A deployed node names its ``site``; a simulated node maps its partition id to one."""
    names = site_names(manifest)
    if site:
        if site not in names:
            raise DataError(f"site {site!r} is not in the manifest (sites: {names})")
        return site
    if "partition-id" not in node_config:
        raise DataError("node config names no site (set --node-config \"site='...'\")")
    pid = int(node_config["partition-id"])
    if pid >= len(names):
        raise DataError(
            f"partition-id {pid} but the manifest has only {len(names)} sites {names}: "
            "set num-supernodes to the number of sites"
        )
    return names[pid]


@dataclass
class SiteData:
    """One site's images (uint8 NHWC) and integer labels per split."""

    site: str
    classes: list[str]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def n(self, split: str) -> int:
        return int(len(self.labels[split]))


@dataclass
class PreparedData:
    """What the data pipeline made: the loaded source, its manifest, the filled image cache."""

    source: SourceData
    manifest_path: Path
    manifest: pd.DataFrame
    cache: ImageCache


def data_pipeline(cfg: RunConfig | Mapping[str, Any], *, progress: bool = False) -> PreparedData:
    """The data pipeline, one code path for simulation and deployment: load the source (the
    built-in one is synthesized once), derive (or read) the manifest, fill the uint8 cache."""
    from common.data.cache import build_cache
    from common.data.partition import read_manifest
    from common.data.sources import load_source

    run = _typed(cfg)
    source = load_source(*resolve_source(run))
    manifest_path = ensure_manifest(run, source)
    manifest = read_manifest(manifest_path)
    cache = build_cache(source, run.image_size, cache_dir(run), progress=progress)
    return PreparedData(source, manifest_path, manifest, cache)


_SITE_CACHE: dict[tuple, SiteData] = {}


def load_site(
    cfg: RunConfig | Mapping[str, Any], node_config: Mapping[str, Any] | None = None
) -> SiteData:
    """Load (once per process) the site's splits from the preprocessed uint8 cache."""
    node_config = node_config or {}
    run, named = merged_config(cfg, node_config)
    # Keyed on the config alone, so a site's second message reads no file at all.
    where = (run.data_format, run.data_path, run.manifest, run.cache_dir, run.state_dir)
    key = (
        (named, *where, run.manifest_key(), run.image_size),
        str(node_config.get("partition-id", "")),
    )
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    prepared = data_pipeline(run)
    manifest = prepared.manifest
    site = pick_site(manifest, named, node_config)
    rows = manifest[manifest["site"].astype(str) == site]
    images, labels = {}, {}
    for split in SPLITS:
        part = rows[rows["split"] == split]
        ids = part["image_id"].astype(str).tolist()
        images[split] = np.ascontiguousarray(prepared.cache.get(ids))
        labels[split] = part["label"].to_numpy(dtype=np.int64).copy()
    data = SiteData(site=site, classes=prepared.source.classes, images=images, labels=labels)
    _SITE_CACHE[key] = data
    return data
