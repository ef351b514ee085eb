"""Decode-and-resize cache: every image is decoded once per (source, size), then memory-mapped.

Why: JPEG/DICOM decoding and resizing dominate small-model training time, and every federated
round (and every site process) would otherwise repeat it. The cache is a plain ``.npy``
(N x S x S x 3 uint8) plus ``ids.txt``, keyed by the source fingerprint and the size, written
to temporary files and renamed into place so an interrupted build never leaves a corrupt
cache behind.

Parallelism: a thread pool. PIL releases the GIL while decoding and resizing, the workers
write straight into the memory-mapped output (no pickling of arrays between processes), and
the readers (closures over lazily-read parquet row groups) need not be picklable. Measured
on the shared 2-core dev box (1500 JPEGs, 96 -> 32 px): 1 thread 6.6 s, 2 threads 3.7 s,
4 threads 3.3 s; reusing the cache: 2 ms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.imaging import fit_square
from common.data.schema import DataError, SourceData, default_home
from common.fileio import atomic_write_text


@dataclass
class ImageCache:
    """Preprocessed images of one source at one size, row-aligned with ``ids``."""

    images: np.ndarray  # uint8 N x S x S x 3 (memory-mapped when loaded from disk)
    ids: list[str]
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable ids left out (on_bad="skip")
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.images):
            raise DataError(
                f"cache {self.path}: {len(self.ids)} ids but {len(self.images)} images; "
                "delete the folder to rebuild"
            )
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``image_ids``; KeyError naming the ids not in the cache."""
        missing = [i for i in image_ids if i not in self._index]
        if missing:
            raise KeyError(
                f"{len(missing)} image id(s) not in cache {self.path}: first {missing[:5]}"
            )
        return np.fromiter(
            (self._index[i] for i in image_ids), dtype=np.int64, count=len(image_ids)
        )

    def get(self, image_ids: Sequence[str]) -> np.ndarray:
        """Images (in memory) for ``image_ids``, in that order."""
        return np.asarray(self.images[self.rows(image_ids)])


def cache_path(source: SourceData, size: int, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the cache of ``source`` at ``size``."""
    if not source.fingerprint:
        raise ValueError(f"source {source.name} has no fingerprint: cannot key its cache")
    root = Path(cache_dir) if cache_dir else default_home() / "cache"
    return root / f"{source.fingerprint}-{size}"


def _load(folder: Path, ids: list[str]) -> ImageCache | None:
    """The cache in ``folder`` if complete and made for these ids, else None."""
    npy, ids_file, skipped_file = folder / "images.npy", folder / "ids.txt", folder / "skipped.txt"
    if not (npy.is_file() and ids_file.is_file()):
        return None
    cached = ids_file.read_text().splitlines()
    skipped = skipped_file.read_text().splitlines() if skipped_file.is_file() else []
    if [i for i in ids if i not in set(skipped)] != cached:
        return None
    try:
        images = np.load(npy, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if images.shape[0] != len(cached):
        return None
    return ImageCache(images=images, ids=cached, path=folder, skipped=skipped)


def _drop_from_source(source: SourceData, skipped: list[str]) -> None:
    """Record unreadable images in the source report and remove them from its metadata."""
    if not skipped:
        return
    for image_id in skipped:
        if image_id not in source.report.skipped.get("unreadable image", []):
            source.report.skip("unreadable image", image_id)
    source.meta = source.meta[~source.meta["image_id"].isin(skipped)].reset_index(drop=True)
    source.report.n_kept = len(source.meta)


def _atomic_text(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def build_cache(
    source: SourceData,
    size: int,
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    on_bad: str | None = None,
) -> ImageCache:
    """Decode + resize (shorter side, centre crop) every image of ``source`` once; reuse after.

    A read error raises the reader's DataError naming the file, unless ``on_bad`` (default: the
    policy the source was loaded with) is "skip": then the image is left out, listed in
    ``ImageCache.skipped`` and ``source.report``, and dropped from ``source.meta``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    policy = on_bad or getattr(source.reader, "on_bad", "error")
    folder = cache_path(source, size, cache_dir)
    ids = source.meta["image_id"].astype(str).tolist()
    if len(set(ids)) != len(ids):
        raise DataError(f"source {source.name}: duplicated image ids; cannot build a cache")
    found = _load(folder, ids)
    if found is not None:
        _drop_from_source(source, found.skipped)
        return found

    folder.mkdir(parents=True, exist_ok=True)
    tmp_npy = folder / f"images.npy.tmp-{os.getpid()}"
    out = np.lib.format.open_memmap(
        tmp_npy, mode="w+", dtype=np.uint8, shape=(len(ids), size, size, 3)
    )
    failed: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = fit_square(source.read_image(ids[i]), size)
        except DataError as exc:
            if policy != "skip":
                raise
            failed[i] = str(exc)

    from rich.progress import Progress  # lazily: only when images are cached

    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2))
    try:
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"caching {len(ids)} images at {size}px", total=len(ids))
            for _ in pool.map(work, range(len(ids))):
                bar.advance(task)
        pool.shutdown()
        out.flush()
        keep = [i for i in range(len(ids)) if i not in failed]
        kept_ids = [ids[i] for i in keep]
        skipped = [ids[i] for i in sorted(failed)]
        if failed:  # compact: rewrite without the unreadable rows
            compact_tmp = folder / f"images.npy.tmp2-{os.getpid()}"
            compact = np.lib.format.open_memmap(
                compact_tmp, mode="w+", dtype=np.uint8, shape=(len(keep), size, size, 3)
            )
            compact[:] = out[keep]
            compact.flush()
            del compact, out
            os.replace(compact_tmp, tmp_npy)
        else:
            del out
        (folder / "images.npy").unlink(missing_ok=True)  # stale cache: never pair it with new ids
        _atomic_text(folder / "ids.txt", kept_ids)
        _atomic_text(folder / "skipped.txt", skipped)
        os.replace(tmp_npy, folder / "images.npy")  # last: its presence marks completeness
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error: stop decoding the rest
        for leftover in folder.glob(f"images.npy.tmp*-{os.getpid()}"):
            leftover.unlink(missing_ok=True)
    _drop_from_source(source, skipped)
    images = np.load(folder / "images.npy", mmap_mode="r")
    return ImageCache(images=images, ids=kept_ids, path=folder, skipped=skipped)
