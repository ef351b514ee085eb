"""From run config to one site's tensors: the single path used by simulation and deployment.

In simulation the runner writes a manifest for all sites and each simulated SuperNode picks
its site by partition id; in a real deployment the SuperNode's ``--node-config`` names the
site and its local files. Both end in :func:`load_site`, so there is one code path.

This package never imports the run config (common/config.py): its functions take the typed
settings (:class:`DataSettings`, which :class:`common.config.RunConfig` fulfils), built
once at an entry point (``RunConfig.from_mapping``, or a site's ``client/siteconfig.py:
site_settings``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import numpy as np
import pandas as pd

from common.data import synth  # synth.ensure_builtin looked up when called
from common.data.cache import ImageCache, build_cache
from common.data.formats import BUILTIN_FORMAT, FORMAT_CLASSES
from common.data.partition import (
    SOURCE_COLUMNS,
    moves_report_path,
    partition,
    read_manifest,
    rows_named,
    write_manifest,
    write_moves_report,
)
from common.data.schema import DataError, SourceData, default_home
from common.data.sources import load_source
from common.fileio import confined, seal_path
from common.names import DATA_KEYS, SPLITS
from common.names import MANIFEST_KEYS as MANIFEST_KEYS  # what DataSettings.manifest_key joins

log = logging.getLogger("fedskin")

# BUILTIN_FORMAT, FORMAT_CLASSES: derived from the format registry (common/data/formats.py);
# SPLITS, DATA_KEYS, MANIFEST_KEYS: defined once in common/names.py.


class DataSettings(Protocol):
    """The settings the data pipeline reads (:class:`common.config.RunConfig` has them)."""

    @property
    def data_format(self) -> str: ...
    @property
    def data_path(self) -> str: ...
    @property
    def manifest(self) -> str: ...
    @property
    def cache_dir(self) -> str: ...
    @property
    def state_dir(self) -> str: ...
    @property
    def image_size(self) -> int: ...
    @property
    def builtin_images(self) -> int: ...
    @property
    def scheme(self) -> str: ...
    @property
    def num_sites(self) -> int: ...
    @property
    def dirichlet_alpha(self) -> float: ...
    @property
    def seed(self) -> int: ...

    def manifest_key(self) -> str:
        """The derived manifest's name part: the values of :data:`MANIFEST_KEYS`."""
        ...

    def institution_list(self) -> list[str] | None: ...

    def with_values(self, values: Mapping[str, Any]) -> Self:
        """A copy with some kebab-case keys changed, checked again."""
        ...


S = TypeVar("S", bound=DataSettings)


def classes_for(fmt: str) -> list[str]:
    """Class names of a data format (the model head is sized from this)."""
    try:
        return FORMAT_CLASSES[fmt]
    except KeyError:
        raise DataError(
            f"unknown data-format {fmt!r}; choose one of {sorted(FORMAT_CLASSES)}"
        ) from None


def node_data_values(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The data keys (:data:`DATA_KEYS`, but ``site``) the site's node config sets."""
    return {
        key: node_config[key]
        for key in DATA_KEYS
        if key != "site" and key in node_config and node_config[key] != ""
    }


def merged_config(run: S, node_config: Mapping[str, Any]) -> tuple[S, str]:
    """The run config with the site's own node config on top (data paths are the site's),
    and the site's name (``site``: a node-config key; "" lets the partition id pick one)."""
    site = str(node_config.get("site") or "")
    return run.with_values(node_data_values(node_config)), site


def resolve_source(run: DataSettings) -> tuple[str, Path]:
    """Return (format, path); the built-in default is synthesized once and cached."""
    if run.data_format == BUILTIN_FORMAT:
        size = max(run.image_size, 32)
        n_images = run.builtin_images
        folder = synth.ensure_builtin("ham-dataverse", n_images=n_images, image_size=size)
        return "ham-dataverse", folder
    classes_for(run.data_format)
    if not run.data_path:
        raise DataError(
            f"data-format={run.data_format!r} needs data-path (the folder of its files)"
        )
    return run.data_format, Path(run.data_path).expanduser()


def cache_dir(run: DataSettings) -> Path:
    d = run.cache_dir
    return Path(d).expanduser() if d else default_home() / "cache"


def ensure_manifest(run: DataSettings, source: SourceData | None = None) -> Path:
    """The manifest named in the config, or one made deterministically from the scheme.

    Every process that derives it from the same config writes byte-identical content via
    an atomic rename, so simulated clients racing on it cannot corrupt it. Pass the
    already-loaded ``source`` to avoid reading its metadata twice.
    """
    given = run.manifest
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise DataError(f"manifest file not found: {p}")
        return p
    if source is None:
        source = load_source(*resolve_source(run))
    # Config values are in the name: it must stay inside the cache's manifests folder.
    out = confined(cache_dir(run) / "manifests", f"{source.fingerprint}-{run.manifest_key()}.csv")
    # A derived manifest whose seal is gone is derived again (it is deterministic): deleting
    # the seal must not let a relabelled cached manifest through.
    if not out.is_file() or not seal_path(out).is_file():
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
            # a site's held-out splits stratified on fewer classes: detail, under -v
            level = logging.DEBUG if "held-out splits" in note else logging.INFO
            log.log(level, "manifest: %s", note)
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
class LoadedSource:
    """One data source, loaded, with its images cached at the run's size."""

    source: SourceData
    cache: ImageCache


@dataclass
class PreparedData:
    """What the data pipeline made: the manifest and, for each site asked for, its loaded
    source (the run's own, or the one the manifest records for that site)."""

    manifest_path: Path
    manifest: pd.DataFrame
    by_site: dict[str, LoadedSource]

    @property
    def source(self) -> SourceData:
        """The first site's source (every site's has the run's classes)."""
        return next(iter(self.by_site.values())).source

    def sources(self) -> list[SourceData]:
        """Each distinct source once, in site order."""
        return list({id(v.source): v.source for v in self.by_site.values()}.values())


def recorded_sources(manifest: pd.DataFrame) -> dict[str, tuple[str, Path]]:
    """site -> (data format, path) the manifest records (``fedskin partition``), or {}."""
    if any(c not in manifest.columns for c in SOURCE_COLUMNS):
        return {}
    first = manifest.drop_duplicates("site")  # read_manifest checked: one source per site
    return {
        str(r.site): (str(r.data_format), Path(str(r.data_path)))
        for r in first.itertuples(index=False)
    }


def check_recorded(run: DataSettings, recorded: dict[str, tuple[str, Path]], path: Path) -> None:
    """The sources a manifest records must have the run's classes."""
    classes = classes_for(run.data_format)
    for site, (fmt, _) in recorded.items():
        if classes_for(fmt) != classes:
            raise DataError(
                f"{path}: site {site}'s {fmt} data has classes {classes_for(fmt)}; the run's "
                f"data-format {run.data_format!r} has {classes}"
            )


def check_rows_in_source(manifest: pd.DataFrame, source: SourceData, path: Path) -> None:
    """Every row's image must be in ``source`` with the same label: a row naming a file
    outside it (``../``, another folder) or relabelled is one line naming the row."""
    meta = source.meta.drop_duplicates("image_id").set_index(source.meta["image_id"].astype(str))
    ids = manifest["image_id"].astype(str)
    absent = ~ids.isin(meta.index)
    if absent.any():
        raise DataError(
            f"{path}: image(s) not in the {source.format} data the site reads "
            f"({source.report.source}): {rows_named(manifest, absent)}"
        )
    relabelled = manifest["label"].to_numpy() != meta.loc[ids, "label"].to_numpy()
    if relabelled.any():
        mask = pd.Series(relabelled, index=manifest.index)
        raise DataError(
            f"{path}: label differs from the {source.format} data's own: "
            f"{rows_named(manifest, mask)}"
        )


def data_pipeline(
    run: DataSettings, *, progress: bool = False, sites: list[str] | None = None
) -> PreparedData:
    """The data pipeline, one code path for simulation and deployment: read (or derive) the
    manifest, load each needed source (the built-in one is synthesized once) and fill its
    uint8 cache. ``sites``: only these sites' (default: all). Every site reads the run's
    data-path when it names one (a deployed site: its node config's); without one, each
    site reads the folder the manifest records for it (a joined manifest)."""
    given = Path(run.manifest).expanduser() if run.manifest else None
    table = read_manifest(ensure_manifest(run)) if given is not None else None
    where = recorded_sources(table) if table is not None and not run.data_path else {}
    own: SourceData | None = None
    if where:
        check_recorded(run, where, given)
        manifest_path, manifest = ensure_manifest(run), table
    else:
        own = load_source(*resolve_source(run))
        manifest_path = ensure_manifest(run, own)
        manifest = table if table is not None else read_manifest(manifest_path)
    wanted = sites if sites is not None else site_names(manifest)
    sources: dict[tuple[str, Path], SourceData] = {}
    for site in wanted:  # every row checked against its source before any image is read
        key = where.get(site) or ("", Path())
        if key not in sources:
            source = load_source(*key) if key[0] else own
            if source is None:
                raise DataError(f"site {site!r} is not in {manifest_path}")
            sources[key] = source
        rows = manifest[manifest["site"].astype(str) == site]
        try:
            check_rows_in_source(rows, sources[key], manifest_path)
        except DataError as err:
            if where or table is None or not recorded_sources(table):
                raise
            raise DataError(
                f"{err}; the manifest records each site's folder: leave data-path out to read them"
            ) from None
    loaded = {
        key: LoadedSource(
            source, build_cache(source, run.image_size, cache_dir(run), progress=progress)
        )
        for key, source in sources.items()
    }
    by_site = {site: loaded[where.get(site) or ("", Path())] for site in wanted}
    return PreparedData(manifest_path, manifest, by_site)


_SITE_CACHE: dict[tuple, SiteData] = {}


def load_site(run: DataSettings, node_config: Mapping[str, Any] | None = None) -> SiteData:
    """Load (once per process) the site's splits from the preprocessed uint8 cache."""
    node_config = node_config or {}
    run, named = merged_config(run, node_config)
    # Keyed on the config alone, so a site's second message reads no file at all.
    where = (run.data_format, run.data_path, run.manifest, run.cache_dir, run.state_dir)
    key = (
        (named, *where, run.manifest_key(), run.image_size),
        str(node_config.get("partition-id", "")),
    )
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    manifest = read_manifest(ensure_manifest(run)) if run.manifest else None
    site = pick_site(manifest, named, node_config) if manifest is not None else ""
    prepared = data_pipeline(run, sites=[site] if site else None)
    manifest = prepared.manifest
    site = site or pick_site(manifest, named, node_config)
    loaded = prepared.by_site[site]
    rows = manifest[manifest["site"].astype(str) == site]
    images, labels = {}, {}
    for split in SPLITS:
        part = rows[rows["split"] == split]
        ids = part["image_id"].astype(str).tolist()
        images[split] = np.ascontiguousarray(loaded.cache.get(ids))
        labels[split] = part["label"].to_numpy(dtype=np.int64).copy()
    data = SiteData(site=site, classes=loaded.source.classes, images=images, labels=labels)
    _SITE_CACHE[key] = data
    return data
