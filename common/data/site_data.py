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
from typing import Any

import numpy as np
import pandas as pd

from common.data.formats import BUILTIN_FORMAT, FORMAT_CLASSES
from common.data.schema import DataError, SourceData, default_home

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


def merged_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict:
    """Run config with the site's own node config on top (data paths are the site's)."""
    cfg = dict(run_config)
    for key in DATA_KEYS:
        if key in node_config and node_config[key] != "":
            cfg[key] = node_config[key]
    return cfg


def resolve_source(cfg: Mapping[str, Any]) -> tuple[str, Path]:
    """Return (format, path); the built-in default is synthesized once and cached."""
    fmt = str(cfg.get("data-format", BUILTIN_FORMAT))
    path = str(cfg.get("data-path", ""))
    if fmt == BUILTIN_FORMAT:
        from common.data.synth import ensure_builtin

        size = max(int(cfg.get("image-size", 32)), 32)
        n_images = int(cfg.get("builtin-images", 1500))
        return "ham-dataverse", ensure_builtin("ham-dataverse", n_images=n_images, image_size=size)
    classes_for(fmt)
    if not path:
        raise DataError(f"data-format={fmt!r} needs data-path (the folder of its files)")
    return fmt, Path(path).expanduser()


def cache_dir(cfg: Mapping[str, Any]) -> Path:
    d = str(cfg.get("cache-dir", ""))
    return Path(d).expanduser() if d else default_home() / "cache"


def ensure_manifest(cfg: Mapping[str, Any], source: SourceData | None = None) -> Path:
    """The manifest named in the config, or one made deterministically from the scheme.

    Every process that derives it from the same config writes byte-identical content via
    an atomic rename, so simulated clients racing on it cannot corrupt it. Pass the
    already-loaded ``source`` to avoid reading its metadata twice.
    """
    given = str(cfg.get("manifest", ""))
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

        source = load_source(*resolve_source(cfg))
    key = "-".join(str(cfg.get(k, "")) for k in _MANIFEST_KEYS).replace(",", "+")
    from common.siteconfig import confined  # config values are in the name: stay inside

    out = confined(cache_dir(cfg) / "manifests", f"{source.fingerprint}-{key}.csv")
    if not out.is_file():
        manifest = partition(
            source.meta,
            str(cfg.get("scheme", "natural")),
            classes=source.classes,
            num_sites=int(cfg.get("num-sites", 4)),
            alpha=float(cfg.get("dirichlet-alpha", 0.5)),
            institutions=_split_list(cfg.get("institutions", "")),
            seed=int(cfg.get("seed", 0)),
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


def _split_list(value: Any) -> list[str] | None:
    items = [s.strip() for s in str(value or "").split(",") if s.strip()]
    return items or None


def site_names(manifest: pd.DataFrame) -> list[str]:
    return sorted(manifest["site"].astype(str).unique())


def pick_site(manifest: pd.DataFrame, cfg: Mapping[str, Any], node_config: Mapping) -> str:
    """A deployed node names its site; a simulated node maps its partition id to one."""
    names = site_names(manifest)
    if cfg.get("site"):
        site = str(cfg["site"])
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


_SITE_CACHE: dict[tuple, SiteData] = {}


def load_site(cfg: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> SiteData:
    """Load (once per process) the site's splits from the preprocessed uint8 cache."""
    from common.data.cache import build_cache
    from common.data.partition import read_manifest
    from common.data.sources import load_source

    node_config = node_config or {}
    cfg = merged_config(cfg, node_config)
    # Keyed on the config alone, so a site's second message reads no file at all.
    key = (
        tuple(str(cfg.get(k, "")) for k in (*DATA_KEYS, *_MANIFEST_KEYS, "image-size")),
        str(node_config.get("partition-id", "")),
    )
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    source = load_source(*resolve_source(cfg))
    manifest = read_manifest(ensure_manifest(cfg, source))
    site = pick_site(manifest, cfg, node_config)
    size = int(cfg.get("image-size", 32))
    cache = build_cache(source, size, cache_dir(cfg), progress=False)
    rows = manifest[manifest["site"].astype(str) == site]
    images, labels = {}, {}
    for split in SPLITS:
        part = rows[rows["split"] == split]
        images[split] = np.ascontiguousarray(cache.get(part["image_id"].astype(str).tolist()))
        labels[split] = part["label"].to_numpy(dtype=np.int64).copy()
    data = SiteData(site=site, classes=source.classes, images=images, labels=labels)
    _SITE_CACHE[key] = data
    return data
