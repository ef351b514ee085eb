"""A derived manifest cannot be relabelled by deleting its seal (common/data/site_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RunConfig
from common.data.site_data import ensure_manifest
from common.fileio import seal_path


def test_a_cached_manifest_without_its_seal_is_derived_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    run = RunConfig.from_mapping({"builtin-images": 300, "image-size": 16})
    path = ensure_manifest(run)
    honest = path.read_text()
    header, first, *rest = honest.splitlines()
    label_at = header.split(",").index("label")
    cells = first.split(",")
    cells[label_at] = "0" if cells[label_at] != "0" else "1"  # one image relabelled
    path.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    seal_path(path).unlink()

    assert ensure_manifest(run) == path
    assert path.read_text() == honest and seal_path(path).is_file()
