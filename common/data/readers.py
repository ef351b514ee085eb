"""Lazy image readers a loaded source hands back: image_id -> RGB array (picklable)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from common.data.imaging import decode_image_bytes, decode_image_file, read_dicom
from common.data.schema import DataError


class FileImageReader:
    """image_id -> RGB array from a JPEG/PNG/DICOM file; picklable (plain dict of paths)."""

    def __init__(self, paths: dict[str, Path], on_bad: str = "error") -> None:
        self.paths = paths
        self.on_bad = on_bad

    def path_of(self, image_id: str) -> Path:
        try:
            return self.paths[image_id]
        except KeyError:
            raise DataError(f"unknown image id {image_id!r}: not in this source") from None

    def __call__(self, image_id: str) -> np.ndarray:
        path = self.path_of(image_id)
        if path.suffix.lower() == ".dcm":
            return read_dicom(path)
        return decode_image_file(path)


class ParquetImageReader:
    """image_id -> RGB array from HF ``Image`` bytes embedded in parquet shards.

    Images are not held in memory: one row group's image column is read on demand and the last
    few are kept (sequential access, as in cache building, then reads each group once).
    """

    def __init__(
        self, locations: dict[str, tuple[str, int, int]], on_bad: str = "error", keep: int = 8
    ) -> None:
        self.locations = locations  # image_id -> (shard path, row group, index in group)
        self.on_bad = on_bad
        self.keep = keep
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        state["_groups"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _group(self, shard: str, rg: int) -> Any:
        import pyarrow.parquet as pq  # lazily: heavy, parquet sources only

        key = (shard, rg)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        try:
            col = pq.ParquetFile(shard).read_row_group(rg, columns=["image"]).column("image")
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise DataError(f"cannot read images from parquet shard {shard}: {exc}") from exc
        col = col.combine_chunks()
        with self._lock:
            self._groups[key] = col
            while len(self._groups) > self.keep:
                self._groups.popitem(last=False)
        return col

    def __call__(self, image_id: str) -> np.ndarray:
        try:
            shard, rg, idx = self.locations[image_id]
        except KeyError:
            raise DataError(f"unknown image id {image_id!r}: not in this source") from None
        value = self._group(shard, rg)[idx].as_py()
        where = f"{shard} (row group {rg}, row {idx}, image_id {image_id})"
        data, rel = (
            (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        )
        if data:
            return decode_image_bytes(data, where)
        if rel and (Path(shard).parent / rel).is_file():
            return decode_image_file(Path(shard).parent / rel)
        raise DataError(f"image missing: no embedded bytes in {where}")


class BytesImageReader:
    """image_id -> RGB array from encoded bytes held in memory (hub downloads)."""

    def __init__(self, blobs: dict[str, bytes], origin: str, on_bad: str = "error") -> None:
        self.blobs = blobs
        self.origin = origin
        self.on_bad = on_bad

    def __call__(self, image_id: str) -> np.ndarray:
        data = self.blobs.get(image_id)
        if not data:
            raise DataError(f"image missing for image_id {image_id!r} in {self.origin}")
        return decode_image_bytes(data, f"{self.origin} image_id {image_id}")
