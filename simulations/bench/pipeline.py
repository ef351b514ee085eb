"""2. Data pipeline: batches from the uint8 cache against decoding JPEGs every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from simulations.bench.measure import SectionTable, fmt, median, timed
from simulations.bench.settings import BenchSettings


class _JpegDataset(torch.utils.data.Dataset):
    """What a naive pipeline does: decode + resize every JPEG again at every epoch."""

    def __init__(self, source: Any, ids: list[str], size: int) -> None:
        self.source, self.ids, self.size = source, ids, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        from common.data.imaging import fit_square

        return torch.from_numpy(fit_square(self.source.read_image(self.ids[i]), self.size).copy())


def bench_pipeline(
    s: BenchSettings, console: Console, workdir: Path
) -> tuple[dict[str, Any], SectionTable]:
    """Images/s delivered as normalised float batches: uint8 cache vs JPEG decoding."""
    from common.augment import to_float
    from common.data.cache import build_cache
    from common.data.sources import load_source
    from common.data.synth import synthesize

    device = torch.device(s.device)
    console.log(f"[2] synthesizing {s.pipeline_images} JPEGs at {s.source_size} px")
    folder = synthesize(
        "ham-dataverse",
        workdir / "ham",
        n_images=s.pipeline_images,
        image_size=s.source_size,
        seed=0,
    )
    source = load_source("ham-dataverse", folder)
    ids = source.meta["image_id"].astype(str).tolist()
    build_s, cache = timed(
        lambda: build_cache(source, s.image_size, workdir / "cache", progress=False), device
    )
    reuse_s, cache = timed(
        lambda: build_cache(source, s.image_size, workdir / "cache", progress=False), device
    )
    cached = torch.from_numpy(np.array(cache.images)).to(device)  # once per round
    n = len(cached)

    def cache_epoch() -> None:
        for idx in torch.randperm(n, device=device).split(s.batch_size):
            to_float(cached[idx])

    loaders = {
        w: torch.utils.data.DataLoader(
            _JpegDataset(source, ids, s.image_size),
            batch_size=s.batch_size,
            shuffle=True,
            num_workers=w,
            persistent_workers=w > 0,
        )
        for w in s.pipeline_workers
    }

    def jpeg_epoch(loader: torch.utils.data.DataLoader) -> None:
        for xb in loader:
            to_float(xb.to(device, non_blocking=True))

    timed(cache_epoch, device)  # warm-up (and the OS page cache for the JPEGs)
    for loader in loaders.values():
        timed(lambda loader=loader: jpeg_epoch(loader), device)
    runs: dict[str, list[float]] = {"cache": [], **{f"jpeg_w{w}": [] for w in loaders}}
    for r in range(s.repeats):
        console.log(f"[2] data pipeline, repeat {r + 1}/{s.repeats}")
        secs, _ = timed(cache_epoch, device)
        runs["cache"].append(n / secs)
        for w, loader in loaders.items():
            secs, _ = timed(lambda loader=loader: jpeg_epoch(loader), device)
            runs[f"jpeg_w{w}"].append(n / secs)
    del loaders  # stops persistent workers
    med = {k: median(v) for k, v in runs.items()}
    best_jpeg = max(v for k, v in med.items() if k.startswith("jpeg"))
    result = {
        "n_images": n,
        "source_size": s.source_size,
        "image_size": s.image_size,
        "cache_build_seconds": build_s,
        "cache_reuse_seconds": reuse_s,
        "cache_images_per_second": med["cache"],
        "jpeg_images_per_second": {
            k.removeprefix("jpeg_w"): v for k, v in med.items() if k.startswith("jpeg")
        },
        "ratio": med["cache"] / best_jpeg,
        "runs": runs,
    }
    table = SectionTable(
        f"2. Data pipeline: {n} synthetic HAM JPEGs ({s.source_size} px) -> {s.image_size} px "
        f"float batches of {s.batch_size}, median of {s.repeats} epochs",
        ["pipeline", "images/s", "cache speed-up"],
    )
    table.rows.append(["uint8 cache: gather + to_float", fmt(med["cache"]), "1.0"])
    for w in s.pipeline_workers:
        v = med[f"jpeg_w{w}"]
        table.rows.append(
            [
                f"JPEG decode + resize every epoch, DataLoader workers={w}",
                fmt(v),
                f"{med['cache'] / v:.1f}x",
            ]
        )
    table.notes.append(
        f"one-time cache build {build_s:.2f} s (threads), reuse {reuse_s * 1000:.0f} ms"
    )
    return result, table
