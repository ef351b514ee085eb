"""Preprocessing cache: built once, reused without decoding, rows map to the right ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.cache import build_cache, cache_path
from common.data.imaging import fit_square
from common.data.schema import DataError, SourceData
from common.data.sources import load_source
from tests.helpers import copy_dataset


def _counting(src: SourceData) -> list[str]:
    """Wrap the source's reader so the test sees every decode."""
    calls: list[str] = []
    inner = src.reader

    def reader(image_id: str) -> np.ndarray:
        calls.append(image_id)
        return inner(image_id)

    src.reader = reader
    return calls


@pytest.mark.parametrize("fixture", ["synth_ham_dataverse", "synth_ham_hf", "synth_isic2020"])
def test_build_then_reuse(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fmt = {"synth_ham_dataverse": "ham-dataverse", "synth_ham_hf": "ham-hf"}.get(
        fixture, "isic2020"
    )
    src = load_source(fmt, request.getfixturevalue(fixture))
    calls = _counting(src)
    cache = build_cache(src, 16, tmp_path, workers=2, progress=False)
    n = len(src.meta)
    assert cache.images.shape == (n, 16, 16, 3) and cache.images.dtype == np.uint8
    assert cache.ids == src.meta["image_id"].tolist() and len(calls) == n
    npy = cache_path(src, 16, tmp_path) / "images.npy"
    assert npy.is_file() and not list(npy.parent.glob("*.tmp*"))
    # rows map to the right images
    pick = [cache.ids[5], cache.ids[0], cache.ids[-1]]
    assert cache.rows(pick).tolist() == [5, 0, n - 1]
    for image_id, img in zip(pick, cache.get(pick), strict=True):
        assert np.array_equal(img, fit_square(src.read_image(image_id), 16))
    # second call: memory-mapped, nothing decoded, file untouched
    calls.clear()
    mtime = npy.stat().st_mtime_ns
    again = build_cache(src, 16, tmp_path, progress=False)
    assert calls == [] and npy.stat().st_mtime_ns == mtime
    assert isinstance(again.images, np.memmap)
    assert np.array_equal(np.asarray(again.images), np.asarray(cache.images))
    # another size is another cache
    assert build_cache(src, 8, tmp_path, progress=False).images.shape[1:] == (8, 8, 3)


def test_rows_unknown_id(synth_fedisic2019: Path, tmp_path: Path) -> None:
    src = load_source("fedisic2019", synth_fedisic2019)
    cache = build_cache(src, 8, tmp_path, progress=False)
    with pytest.raises(KeyError, match="ISIC_nope"):
        cache.rows([cache.ids[0], "ISIC_nope"])


def test_fit_square_centre_crop() -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200  # centre 20 columns bright, sides dark
    out = fit_square(img, 10)
    assert out.shape == (10, 10, 3) and out[:, 2:8].min() > 150


def test_read_error_names_file_and_leaves_no_cache(
    synth_ham_dataverse: Path, tmp_path: Path
) -> None:
    root = copy_dataset(synth_ham_dataverse, tmp_path / "d")
    bad = sorted(root.rglob("*.jpg"))[7]
    src = load_source("ham-dataverse", root)
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=bad.name):
        build_cache(src, 16, tmp_path / "c", progress=False)
    folder = cache_path(src, 16, tmp_path / "c")
    assert not (folder / "images.npy").exists() and not list(folder.glob("*.tmp*"))


def test_skip_unreadable_in_cache(synth_ham_dataverse: Path, tmp_path: Path) -> None:
    root = copy_dataset(synth_ham_dataverse, tmp_path / "d")
    bad = sorted(root.rglob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    src = load_source("ham-dataverse", root, on_bad="skip")
    n = len(src.meta)
    cache = build_cache(src, 16, tmp_path / "c", progress=False)
    assert cache.skipped == [bad.stem] and len(cache) == n - 1
    assert bad.stem in src.report.skipped["unreadable image"]
    assert bad.stem not in set(src.meta["image_id"]) and len(src.meta) == n - 1
    with pytest.raises(KeyError, match=bad.stem):
        cache.rows([bad.stem])
    # reuse of the compacted cache from disk on a fresh load
    src2 = load_source("ham-dataverse", root, on_bad="skip")
    again = build_cache(src2, 16, tmp_path / "c", progress=False)
    assert again.ids == cache.ids and again.skipped == [bad.stem]
    assert bad.stem not in set(src2.meta["image_id"])
