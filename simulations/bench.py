"""`fedskin bench`: performance figures of the training stack, measured side by side.

Why a script and not timed tests: absolute times depend on the machine and its load, so the
useful figures are *ratios* of two things measured in the same run, on the same device,
interleaved (A B A B ...) so that background load hits both alike. Five sections:

1. local training throughput of the client code (``train_local``) against a plain PyTorch
   loop over the same tensors (same model, optimizer, batch size; augmentation off in both);
2. data pipeline: gathering batches from the uint8 cache against decoding the JPEGs every
   epoch through a naive Dataset/DataLoader;
3. round overhead of a real (Flower Simulation Engine) run: round wall time against the
   clients' own training time, from the run's metrics.json;
4. DP-SGD cost: DP step against non-DP step, per backbone and per grad-sample mode;
5. scaling with the number of sites over the same total data (measured in-process: a loop
   over sites calling ``train_local`` with one reused model, as a simulated client does).

Every figure is printed as a rich table and returned as a dict (``--out`` writes it as JSON,
``--markdown`` appends a dated Markdown block).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from common.rundir import RunDir, atomic_torch_save, atomic_write_json, read_checkpoint

NUM_CLASSES = 7  # HAM10000's classes
SECTION_NAMES = {1: "train", 2: "pipeline", 3: "round", 4: "dp", 5: "scaling"}
DP_MODES = ["hooks", "functorch", "ghost"]
# Figures that are differences or fitted coefficients: finite, but may be zero or negative.
SIGNED_FIGURES = {
    "overhead_seconds",
    "overhead_fraction",
    "peak_rss_growth_mb",
    "peak_gpu_growth_mb",
    "fit_ms_per_site",
    "fit_ms_per_image",
    "plots_seconds",
}

# Targets of the performance issue (quoted in every report so the figures can be judged).
TARGETS = {
    "train_ratio": 0.95,  # client training >= 0.95 x plain-loop throughput
    "round_overhead_fraction": 0.10,  # round time - max client train time <= 10% (b0, 224 px)
    "dp_step_ratio": 3.0,  # DP step <= 3 x non-DP step (default DP backbone, GPU)
    "h100_b0_224_images_per_second": 2500.0,  # per client, bf16
    "h100_round_seconds_6_sites": 10.0,  # one FedAvg round, HAM10000 over 6 sites, 1 epoch
}


# ----------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """Everything a bench run depends on; printed in the header and stored in the JSON."""

    device: str = "cpu"
    model: str = "test_efficientnet"
    image_size: int = 32
    batch_size: int = 32
    threads: int = 1  # torch intra-op threads on CPU (0 = leave torch's default)
    warmup: int = 2  # warm-up steps (section 1) / calls (sections 4, 5), not timed
    steps: int = 6  # timed steps per repeat (sections 1 and 4)
    repeats: int = 3  # interleaved repeats; the median is reported
    dp_steps: int = 3  # timed steps per repeat in section 4 (DP steps are slow on CPU)
    dp_batch_size: int = 0  # section 4's batch (and Opacus physical batch); 0 = batch_size
    pipeline_images: int = 200  # JPEGs in the synthetic ham-dataverse set (section 2)
    source_size: int = 128  # side of those JPEGs (HAM10000's are 600 x 450)
    pipeline_workers: list[int] = field(default_factory=lambda: [0])
    sim_images: int = 300  # built-in synthetic set for the simulation (section 3)
    sim_sites: int = 4
    sim_rounds: int = 2
    dp_models: list[str] = field(default_factory=lambda: ["test_efficientnet", "test_resnet"])
    dp_modes: list[str] = field(default_factory=lambda: list(DP_MODES))
    scaling_images: int = 1536  # total images over all sites (section 5)
    scaling_sites: list[int] = field(default_factory=lambda: [6, 24, 96])


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; a cuda request without a GPU fails clearly."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: no CUDA device is available here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise typer.BadParameter(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def make_settings(device: str = "auto", quick: bool = False, **overrides: Any) -> BenchSettings:
    """Defaults by device: tiny models at 32 px on CPU, efficientnet_b0 at 224 px on a GPU."""
    from common.models import SUPPORTED_MODELS

    dev = resolve_device(device)
    if dev.startswith("cuda"):
        s = BenchSettings(
            device=dev,
            model="efficientnet_b0",
            image_size=224,
            batch_size=128,
            threads=0,
            warmup=10,
            steps=40,
            repeats=5,
            dp_steps=20,
            dp_batch_size=64,
            pipeline_images=1000,
            source_size=450,
            pipeline_workers=[0, min(8, os.cpu_count() or 1)],
            sim_images=10015,
            sim_sites=6,
            dp_models=list(SUPPORTED_MODELS),
            scaling_images=10015,
        )
        if quick:
            s = replace(
                s,
                warmup=5,
                steps=15,
                repeats=3,
                dp_steps=10,
                pipeline_images=300,
                sim_images=3000,
                dp_models=["efficientnet_b0", "resnet18", "test_efficientnet"],
                scaling_images=3072,
            )
    else:
        s = BenchSettings(device=dev)
        if not quick:
            s = replace(
                s,
                warmup=3,
                steps=20,
                repeats=5,
                dp_steps=10,
                pipeline_images=500,
                source_size=256,
                pipeline_workers=[0, 2],
                sim_images=1500,
                scaling_images=3072,
            )
    given = {k: v for k, v in overrides.items() if v is not None}
    s = replace(s, **given)
    if s.model not in SUPPORTED_MODELS:
        raise typer.BadParameter(f"unknown model {s.model!r}; supported: {SUPPORTED_MODELS}")
    if min(s.image_size, s.batch_size, s.steps, s.repeats) < 1 or s.warmup < 0:
        raise typer.BadParameter("image-size, batch-size, steps, repeats must be >= 1")
    return s


# ----------------------------------------------------------------------------- helpers


@dataclass
class SectionTable:
    """One table of figures, rendered both with rich and as Markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rich(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _fmt(x: float, digits: int = 1) -> str:
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _fake_data(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images and labels (the contents do not matter for throughput)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    labels[:NUM_CLASSES] = torch.arange(min(n, NUM_CLASSES))  # every class present
    return images, labels


def _vm_kb(field_name: str, pid: int | str = "self") -> float:
    """A ``Vm*`` line of /proc/<pid>/status in kB (NaN where /proc is unavailable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return float(m.group(1)) if m else math.nan


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ``clear_refs`` 5), so the next peak is this phase's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _ActorPeaks(threading.Thread):
    """Samples the peak RSS (VmHWM) of this process's own Ray ClientApp actors from /proc.

    Only descendants of this process count, so other jobs' simulations on a shared machine
    are ignored. VmHWM includes shared pages (torch libraries, Ray's object store).
    """

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self._stop_event = threading.Event()
        self._me = os.getpid()

    def _is_descendant(self, pid: int) -> bool:
        for _ in range(16):
            ppid = _vm_ppid(pid)
            if ppid is None or ppid <= 1:
                return False
            if ppid == self._me:
                return True
            pid = ppid
        return False

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if not cmd.startswith(b"ray::ClientAppActor") or not self._is_descendant(int(entry)):
                continue
            hwm = _vm_kb("VmHWM", entry)
            if math.isfinite(hwm):
                self.peaks[int(entry)] = max(self.peaks.get(int(entry), 0.0), hwm)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _vm_ppid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^PPid:\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (0: unchanged), restoring the previous count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- 1. training


class PlainLoop:
    """The reference: a textbook PyTorch loop over device tensors, nothing else.

    Same precision policy as the client on CUDA (bf16 autocast, channels_last) so the ratio
    measures the client's overhead, not a precision difference.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        batch_size: int,
        device: torch.device,
    ) -> None:
        from common.augment import to_float

        self.to_float = to_float
        self.device = device
        cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.criterion = nn.CrossEntropyLoss()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )

    def run(self, steps: int) -> int:
        """``steps`` optimizer steps; returns the number of images seen."""
        self.model.train()
        seen = 0
        done = 0
        while done < steps:
            perm = torch.randperm(len(self.images), device=self.device)
            for idx in perm.split(self.batch_size):
                x = self.to_float(self.images[idx]).contiguous(memory_format=self.memory_format)
                with self.autocast:
                    logits = self.model(x)
                loss = self.criterion(logits.float(), self.labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                seen += len(idx)
                done += 1
                if done == steps:
                    break
        return seen


def bench_train(s: BenchSettings, console: Console) -> tuple[dict[str, Any], SectionTable]:
    """Client ``train_local`` against :class:`PlainLoop`, interleaved, augmentation off."""
    from common.models import build_model
    from common.train import TrainConfig, train_local

    device = torch.device(s.device)
    n = s.batch_size * s.steps  # one epoch per timed call: every batch is full
    images, labels = _fake_data(n, s.image_size)
    lr = 1e-3
    cfg = TrainConfig(batch_size=s.batch_size, local_steps=s.steps, lr=lr, loss="ce", augment=False)
    client_model = build_model(s.model, NUM_CLASSES)
    plain = PlainLoop(copy.deepcopy(client_model), images, labels, lr, s.batch_size, device)

    def client(c: TrainConfig, data: torch.Tensor) -> tuple[float, dict[str, float]]:
        return _timed(
            lambda: train_local(
                client_model, data, labels, c, num_classes=NUM_CLASSES, device=device
            ),
            device,
        )

    if s.warmup:
        client(replace(cfg, local_steps=s.warmup), images)
        client(replace(cfg, local_steps=s.warmup, augment=True), images)
        _timed(lambda: plain.run(s.warmup), device)
    on_device = images.to(device) if device.type == "cuda" else None
    runs: dict[str, list[float]] = {
        "client": [],
        "client_reported": [],
        "plain": [],
        "client_augment": [],
        "client_on_device": [],
    }
    for r in range(s.repeats):
        console.log(f"[1] training throughput, repeat {r + 1}/{s.repeats}")
        # A B A B: the order alternates so drift in machine load hits both alike.
        order = ["client", "plain"] if r % 2 == 0 else ["plain", "client"]
        for which in order:
            if which == "client":
                secs, out = client(cfg, images)
                runs["client"].append(n / secs)
                runs["client_reported"].append(out["images_per_second"])
            else:
                secs, seen = _timed(lambda: plain.run(s.steps), device)
                runs["plain"].append(seen / secs)
        secs, _ = client(replace(cfg, augment=True), images)
        runs["client_augment"].append(n / secs)
        if on_device is not None:
            secs, _ = client(cfg, on_device)
            runs["client_on_device"].append(n / secs)
    runs = {k: v for k, v in runs.items() if v}
    med = {k: _median(v) for k, v in runs.items()}
    result: dict[str, Any] = {
        "images_per_call": n,
        "client_images_per_second": med["client"],
        "client_reported_images_per_second": med["client_reported"],
        "plain_images_per_second": med["plain"],
        "client_augment_images_per_second": med["client_augment"],
        "ratio": med["client"] / med["plain"],
        "augment_cost_ratio": med["client_augment"] / med["client"],
        "runs": runs,
    }
    if "client_on_device" in med:
        result["client_on_device_images_per_second"] = med["client_on_device"]
        result["ratio_on_device"] = med["client_on_device"] / med["plain"]

    table = SectionTable(
        f"1. Local training throughput: {s.model} at {s.image_size} px, batch {s.batch_size}, "
        f"median of {s.repeats} (images/s)",
        ["loop", "images/s", "vs plain loop"],
    )
    labels_txt = {
        "plain": "plain PyTorch loop (reference)",
        "client": "client train_local (whole call, augment off)",
        "client_reported": "client train_local, its own timer (excl. setup)",
        "client_on_device": "client train_local, split already on the GPU",
        "client_augment": "client train_local with augmentation (info)",
    }
    for key, label in labels_txt.items():
        if key in med:
            table.rows.append([label, _fmt(med[key]), f"{med[key] / med['plain']:.3f}"])
    table.notes.append(
        f"{n} images per call ({s.steps} steps), {s.warmup} warm-up steps excluded, "
        f"interleaved A B / B A; target ratio >= {TARGETS['train_ratio']}"
    )
    return result, table


# ----------------------------------------------------------------------------- 2. pipeline


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
    build_s, cache = _timed(
        lambda: build_cache(source, s.image_size, workdir / "cache", progress=False), device
    )
    reuse_s, cache = _timed(
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

    _timed(cache_epoch, device)  # warm-up (and the OS page cache for the JPEGs)
    for loader in loaders.values():
        _timed(lambda loader=loader: jpeg_epoch(loader), device)
    runs: dict[str, list[float]] = {"cache": [], **{f"jpeg_w{w}": [] for w in loaders}}
    for r in range(s.repeats):
        console.log(f"[2] data pipeline, repeat {r + 1}/{s.repeats}")
        secs, _ = _timed(cache_epoch, device)
        runs["cache"].append(n / secs)
        for w, loader in loaders.items():
            secs, _ = _timed(lambda loader=loader: jpeg_epoch(loader), device)
            runs[f"jpeg_w{w}"].append(n / secs)
    del loaders  # stops persistent workers
    med = {k: _median(v) for k, v in runs.items()}
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
    table.rows.append(["uint8 cache: gather + to_float", _fmt(med["cache"]), "1.0"])
    for w in s.pipeline_workers:
        v = med[f"jpeg_w{w}"]
        table.rows.append(
            [
                f"JPEG decode + resize every epoch, DataLoader workers={w}",
                _fmt(v),
                f"{med['cache'] / v:.1f}x",
            ]
        )
    table.notes.append(
        f"one-time cache build {build_s:.2f} s (threads), reuse {reuse_s * 1000:.0f} ms"
    )
    return result, table


# ----------------------------------------------------------------------------- 3. rounds


def bench_round(
    s: BenchSettings, console: Console, workdir: Path
) -> tuple[dict[str, Any], SectionTable]:
    """A short real simulation (Flower Simulation Engine); per-round overhead from metrics."""
    from simulations.runner import simulate

    overrides = {
        "model": s.model,
        "image-size": s.image_size,
        "batch-size": s.batch_size,
        "num-server-rounds": s.sim_rounds,
        "builtin-images": s.sim_images,
        "scheme": "iid",
        "num-sites": s.sim_sites,
        "local-epochs": 1,
        "local-steps": 0,
        "run-name": "bench",
        "strategy": "fedavg",
    }
    console.log(f"[3] simulating {s.sim_rounds} rounds of {s.sim_sites} sites via Flower/Ray")
    sampler = _ActorPeaks()
    driver_reset = _reset_peak_rss()
    sampler.start()
    try:
        t0 = time.perf_counter()
        metrics = simulate(overrides=overrides, out=workdir / "sim")
        total_s = time.perf_counter() - t0
    finally:
        sampler.sample()
        sampler.stop()
    rounds = []
    for rec in metrics["rounds"]:
        train = rec.get("train", {})
        secs = [float(m["seconds"]) for m in train.values()]
        if not secs:
            continue
        rt = float(rec["seconds"])
        rounds.append(
            {
                "round": int(rec["round"]),
                "round_seconds": rt,
                "max_train_seconds": max(secs),
                "sum_train_seconds": sum(secs),
                "overhead_seconds": rt - max(secs),
                "overhead_fraction": (rt - max(secs)) / rt,
                "train_images": sum(float(m["num-examples"]) for m in train.values()),
                "client_images_per_second": _median(
                    [float(m["images_per_second"]) for m in train.values()]
                ),
            }
        )
    if not rounds:
        raise RuntimeError("the simulation recorded no client training times")
    console.log("[3] timing the server's per-round writes (report, plots, checkpoint)")
    writes = bench_server_writes(workdir / "sim", metrics, max(s.repeats, 3))
    last = rounds[-1]
    peaks_mb = [v / 1024 for v in sampler.peaks.values()]
    result: dict[str, Any] = {
        "sites": s.sim_sites,
        "rounds": rounds,
        "total_seconds": total_s,
        "overhead_seconds": last["overhead_seconds"],
        "overhead_fraction": last["overhead_fraction"],
        "cpu_count": os.cpu_count() or 1,
        "server_writes": writes,
    }
    if peaks_mb:
        result["client_actor_peak_rss_mb"] = max(peaks_mb)
        result["client_actors"] = len(peaks_mb)
    if driver_reset:
        result["driver_peak_rss_mb"] = _vm_kb("VmHWM") / 1024
    table = SectionTable(
        f"3. Round overhead: {s.sim_sites} sites ({s.sim_images} images in all), {s.model} at "
        f"{s.image_size} px, 1 local epoch, Flower Simulation Engine",
        [
            "round",
            "round s",
            "max client train s",
            "sum client train s",
            "overhead s",
            "overhead / round",
        ],
    )
    for r in rounds:
        table.rows.append(
            [
                str(r["round"]),
                _fmt(r["round_seconds"], 2),
                _fmt(r["max_train_seconds"], 2),
                _fmt(r["sum_train_seconds"], 2),
                _fmt(r["overhead_seconds"], 2),
                f"{r['overhead_fraction']:.0%}",
            ]
        )
    table.notes.append(
        "overhead = round time - max client train time (clients run in parallel); the round "
        "time also includes the validation pass at every site and the FedAvg aggregation; "
        f"target <= {TARGETS['round_overhead_fraction']:.0%} for efficientnet_b0 at 224 px"
    )
    table.notes.append(
        "not in the round time above: the server's writes after each round, timed on this "
        f"run's metrics (median of {writes['repeats']}): write_outputs "
        f"{_fmt(writes['write_outputs_seconds'], 3)} s with PNG plots, "
        f"{_fmt(writes['write_outputs_no_plots_seconds'], 3)} s with plots=False; checkpoint "
        f"write {_fmt(writes.get('checkpoint_write_seconds', math.nan), 3)} s (twice when "
        "the best round improves)"
    )
    if (os.cpu_count() or 1) < s.sim_sites and not s.device.startswith("cuda"):
        table.notes.append(
            f"{os.cpu_count()} CPU cores for {s.sim_sites} clients of 1 CPU each: clients "
            "partly serialize, so round time approaches the *sum* of client train times"
        )
    if peaks_mb:
        table.notes.append(
            f"peak RSS per client actor (VmHWM, incl. shared pages) {max(peaks_mb):,.0f} MB "
            f"over {len(peaks_mb)} actors; driver peak "
            f"{result.get('driver_peak_rss_mb', math.nan):,.0f} MB"
        )
    return result, table


def bench_server_writes(run_dir: Path, metrics: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The server's per-round writes, which the recorded round time does not include.

    After every round the loop saves ``checkpoints/last.pt`` (and ``best.pt`` when the
    validation score improves) and calls ``write_outputs``. Both are re-run here on the
    finished run's own data, into a scratch folder: ``write_outputs`` with and without its
    PNG plots (interleaved), and a re-save of the run's ``last.pt`` (same size and contents).
    """
    from server.report import write_outputs

    paths = RunDir(run_dir)
    scratch = paths.bench_writes
    args = (metrics["config"], metrics["classes"], metrics["rounds"], None, metrics["best_round"])
    ckpt_path = paths.checkpoint("last")
    ckpt = read_checkpoint(ckpt_path) if ckpt_path.is_file() else None  # weights only

    def save_checkpoint() -> None:  # as the loop does: atomically (common/rundir.py)
        atomic_torch_save(scratch / "last.pt", ckpt)

    cpu = torch.device("cpu")
    write_outputs(scratch, *args, plots=True)  # warm-up: matplotlib's first figure
    runs: dict[str, list[float]] = {"plots": [], "no_plots": [], "checkpoint": []}
    for r in range(repeats):
        for plots in (True, False) if r % 2 == 0 else (False, True):
            secs, _ = _timed(lambda p=plots: write_outputs(scratch, *args, plots=p), cpu)
            runs["plots" if plots else "no_plots"].append(secs)
        if ckpt is not None:
            runs["checkpoint"].append(_timed(save_checkpoint, cpu)[0])
    with_plots, without = _median(runs["plots"]), _median(runs["no_plots"])
    out: dict[str, Any] = {
        "repeats": repeats,
        "write_outputs_seconds": with_plots,
        "write_outputs_no_plots_seconds": without,
        "plots_seconds": with_plots - without,
        "runs": runs,
    }
    if runs["checkpoint"]:
        out["checkpoint_write_seconds"] = _median(runs["checkpoint"])
        out["checkpoint_mb"] = ckpt_path.stat().st_size / 1e6
    return out


# ----------------------------------------------------------------------------- 4. DP


def bench_dp(s: BenchSettings, console: Console) -> tuple[dict[str, Any], SectionTable]:
    """DP-SGD step against a plain step of the same (GroupNorm) model, per mode."""
    from common.models import build_model
    from common.privacy import DPConfig, DPSession
    from common.train import TrainConfig, train_local

    device = torch.device(s.device)
    bs = s.dp_batch_size or s.batch_size
    n = bs * s.dp_steps
    images, labels = _fake_data(n, s.image_size, seed=1)
    cfg = TrainConfig(batch_size=bs, local_steps=s.dp_steps, loss="ce", augment=False)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for name in s.dp_models:
        model = build_model(name, NUM_CLASSES, dp=True)

        def step(dp_mode: str | None, steps: int, model: nn.Module = model) -> float:
            session = None
            if dp_mode is not None:
                dcfg = DPConfig(noise_multiplier=1.0, physical_batch=bs, grad_sample_mode=dp_mode)
                session = DPSession(dcfg, n, bs, steps)
            c = replace(cfg, local_steps=steps)
            secs, _ = _timed(
                lambda: train_local(
                    model, images, labels, c, num_classes=NUM_CLASSES, device=device, dp=session
                ),
                device,
            )
            return secs / steps

        warm = max(1, min(s.warmup, 2))
        step(None, warm)
        for mode in s.dp_modes:
            console.log(f"[4] DP cost: {name}, grad-sample mode {mode}")
            try:
                step(mode, warm)
                plain_t, dp_t = [], []
                for r in range(s.repeats):
                    pair = [(plain_t, None), (dp_t, mode)]
                    for bucket, m in pair if r % 2 == 0 else pair[::-1]:
                        bucket.append(step(m, s.dp_steps))
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # e.g. OOM
                errors.append({"model": name, "mode": mode, "error": str(exc).split("\n")[0][:200]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "dp_step_seconds": _median(dp_t),
                    "nondp_step_seconds": _median(plain_t),
                    "ratio": _median(dp_t) / _median(plain_t),
                }
            )
        del model
    table = SectionTable(
        f"4. DP-SGD cost at {s.image_size} px, batch {bs} (Poisson, expected), "
        f"median of {s.repeats}",
        ["backbone (dp=True)", "grad-sample mode", "non-DP step ms", "DP step ms", "DP / non-DP"],
    )
    for r in rows:
        table.rows.append(
            [
                r["model"],
                r["mode"],
                _fmt(r["nondp_step_seconds"] * 1000),
                _fmt(r["dp_step_seconds"] * 1000),
                f"{r['ratio']:.2f}",
            ]
        )
    for e in errors:
        table.rows.append([e["model"], e["mode"], "-", "failed", e["error"][:60]])
    table.notes.append(
        "both steps use the same DP-compatible model (GroupNorm); the DP step includes "
        "per-sample gradients, clipping and noise; each train_local call's Opacus wrapping "
        f"is included; target <= {TARGETS['dp_step_ratio']}x for the default DP backbone on GPU"
    )
    return {"rows": rows, "errors": errors}, table


# ----------------------------------------------------------------------------- 5. scaling


def _scaling_rows(s: BenchSettings) -> dict[str, Any]:
    """Section 5's measurements; runs in a fresh (spawned) process for a clean memory baseline.

    The plan is run twice, forward then backward, so slow drift in machine load does not
    masquerade as a trend in the number of sites; the median of the two is reported.
    """
    from common.models import build_model, get_weights, set_weights
    from common.train import TrainConfig, train_local

    if s.threads > 0 and s.device == "cpu":
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    cuda = device.type == "cuda"
    total = s.scaling_images
    images, labels = _fake_data(total, s.image_size, seed=2)
    model = build_model(s.model, NUM_CLASSES)
    global_state = get_weights(model)
    model_mb = sum(v.numel() * v.element_size() for v in global_state.values()) / 2**20
    cfg = TrainConfig(batch_size=s.batch_size, local_epochs=1, loss="ce", augment=True)
    baseline_mb = _vm_kb("VmRSS") / 1024  # interpreter + libraries + the data + one model
    if s.warmup:
        k = min(total, s.batch_size * 2)
        c = replace(cfg, local_steps=s.warmup)
        train_local(model, images[:k], labels[:k], c, num_classes=NUM_CLASSES, device=device)

    def one_round(n_sites: int, n_images: int) -> dict[str, float]:
        bounds = np.linspace(0, n_images, n_sites + 1).astype(int)
        _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_s = 0.0
        acc: dict[str, torch.Tensor] = {}
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            set_weights(model, global_state)  # the round's global model, as a client gets it
            out = train_local(
                model, images[lo:hi], labels[lo:hi], cfg, num_classes=NUM_CLASSES, device=device
            )
            train_s += out["seconds"]
            # FedAvg as a running weighted sum: one accumulator, whatever the site count.
            w = float(hi - lo) / n_images
            for key, v in model.state_dict().items():
                term = v.detach().double().cpu() * w
                acc[key] = acc[key] + term if key in acc else term
        _sync(device)
        seconds = time.perf_counter() - t0
        row = {
            "sites": n_sites,
            "total_images": n_images,
            "round_seconds": seconds,
            "train_seconds": train_s,
            "peak_rss_mb": _vm_kb("VmHWM") / 1024,
        }
        if cuda:
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return row

    plan = [(s.scaling_sites[0], total // 2)] + [(k, total) for k in s.scaling_sites]
    passes = [plan, plan[::-1]] if s.repeats > 1 else [plan]
    measured: dict[tuple[int, int], list[dict[str, float]]] = {p: [] for p in plan}
    for order in passes:
        for k, n_img in order:
            print(f"[5] scaling: {k} sites, {n_img} images", file=sys.stderr, flush=True)
            measured[(k, n_img)].append(one_round(k, n_img))
    rows = []
    for key in plan:
        runs = measured[key]
        row = {m: _median([r[m] for r in runs]) for m in runs[0]}
        row["sites"], row["total_images"] = key
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        row["ms_per_image"] = 1000 * row["round_seconds"] / row["total_images"]
        rows.append(row)
    return {"rows": rows, "model_mb": model_mb, "baseline_rss_mb": baseline_mb}


def _run_child(s: BenchSettings) -> dict[str, Any]:
    """Run :func:`_scaling_rows` in a new interpreter (settings in, JSON result out)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import json, sys; from simulations.bench import BenchSettings, _scaling_rows; "
        "r = _scaling_rows(BenchSettings(**json.loads(sys.argv[1]))); "
        "sys.stdout.write('\\n' + json.dumps(r) + '\\n')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(s))],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scaling benchmark process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scaling(s: BenchSettings, console: Console) -> tuple[dict[str, Any], SectionTable]:
    """One FedAvg round in-process for 6/24/96 sites over the same data (and half the data)."""
    console.log("[5] scaling: measuring in a fresh process (clean memory baseline)")
    child = _run_child(s)
    rows = child["rows"]
    total = s.scaling_images
    cuda = s.device.startswith("cuda")
    full = [r for r in rows if r["total_images"] == total]
    half = rows[0]
    # round_seconds ~ a * images + b * sites: per-image cost and fixed per-site cost.
    design = np.array([[r["total_images"], r["sites"]] for r in rows], dtype=float)
    coef = np.linalg.lstsq(design, np.array([r["round_seconds"] for r in rows]), rcond=None)[0]
    result: dict[str, Any] = {
        "method": "in-process loop over sites (one model object reused), not Ray",
        "model_mb": child["model_mb"],
        "baseline_rss_mb": child["baseline_rss_mb"],
        "rows": rows,
        "data_ratio": full[0]["round_seconds"] / half["round_seconds"],  # ideal: 2
        "data_ratio_ideal": full[0]["total_images"] / half["total_images"],
        "sites_ratio": full[-1]["round_seconds"] / full[0]["round_seconds"],  # ideal: 1
        "fit_ms_per_image": 1000 * float(coef[0]),
        "fit_ms_per_site": 1000 * float(coef[1]),
        "peak_rss_growth_mb": full[-1]["peak_rss_mb"] - full[0]["peak_rss_mb"],
    }
    if cuda:
        result["peak_gpu_growth_mb"] = full[-1]["peak_gpu_mb"] - full[0]["peak_gpu_mb"]
    cols = ["sites", "total images", "round s", "ms / image", "peak RSS MB"]
    if cuda:
        cols.append("peak GPU MB")
    table = SectionTable(
        f"5. Scaling: one FedAvg round, {s.model} at {s.image_size} px, batch {s.batch_size}, "
        "1 local epoch, in-process loop over sites",
        cols,
    )
    for r in rows:
        line = [
            str(r["sites"]),
            str(r["total_images"]),
            _fmt(r["round_seconds"], 2),
            _fmt(r["ms_per_image"], 2),
            _fmt(r["peak_rss_mb"], 0),
        ]
        if cuda:
            line.append(_fmt(r["peak_gpu_mb"], 0))
        table.rows.append(line)
    table.notes += [
        "measured in-process (not through Ray), in a fresh process: each site's train_local "
        "runs in turn on one reused model; FedAvg is a running weighted sum (one accumulator)",
        f"round time, {total} vs {half['total_images']} images at {half['sites']} sites: "
        f"{result['data_ratio']:.2f}x (linear: {result['data_ratio_ideal']:.0f}x); "
        f"{full[-1]['sites']} vs {full[0]['sites']} sites over the same data: "
        f"{result['sites_ratio']:.2f}x (flat: 1x)",
        f"least-squares fit: {result['fit_ms_per_image']:.2f} ms per image + "
        f"{result['fit_ms_per_site']:.1f} ms fixed per site (set_weights, optimizer, "
        "partial last batch, averaging)",
        f"memory: baseline {child['baseline_rss_mb']:,.0f} MB (libraries + data + model), peak "
        f"RSS growth {full[0]['sites']} -> {full[-1]['sites']} sites "
        f"{result['peak_rss_growth_mb']:+.0f} MB; model state {child['model_mb']:.1f} MB (Flower's "
        "FedAvg holds every reply at once: sites x model state on the server)",
    ]
    return result, table


# ----------------------------------------------------------------------------- driver


def header(s: BenchSettings) -> dict[str, Any]:
    dev = torch.device(s.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "device": s.device,
        "device_name": name,
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "settings": asdict(s),
    }


def parse_sections(text: str) -> list[int]:
    try:
        picked = sorted({int(p) for p in text.replace(" ", "").split(",") if p})
    except ValueError:
        raise typer.BadParameter(f"--sections: comma-separated numbers 1-5, got {text!r}") from None
    bad = [p for p in picked if p not in SECTION_NAMES]
    if bad or not picked:
        raise typer.BadParameter(f"--sections: numbers 1-5, got {text!r}")
    return picked


def run_bench(
    s: BenchSettings, sections: Sequence[int], console: Console | None = None
) -> tuple[dict[str, Any], list[SectionTable]]:
    """Run the chosen sections; returns the figures (JSON-able) and the tables printed."""
    console = console or Console()
    results: dict[str, Any] = {}
    tables: list[SectionTable] = []
    with _torch_threads(s.threads if not s.device.startswith("cuda") else 0):
        meta = header(s)
        console.print(
            f"[bold]fedskin bench[/] {meta['date']} | device {s.device} ({meta['device_name']}, "
            f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads) | torch "
            f"{meta['torch']}\n$ {meta['command']}"
        )
        results["meta"] = meta
        with tempfile.TemporaryDirectory(prefix="fedskin-bench-") as tmp:
            work = Path(tmp)
            for sec in sections:
                if sec == 1:
                    res, table = bench_train(s, console)
                elif sec == 2:
                    res, table = bench_pipeline(s, console, work)
                elif sec == 3:
                    res, table = bench_round(s, console, work)
                elif sec == 4:
                    res, table = bench_dp(s, console)
                else:
                    res, table = bench_scaling(s, console)
                results[SECTION_NAMES[sec]] = res
                tables.append(table)
                console.print(table.rich())
                for note in table.notes:
                    console.print(f"  [dim]- {note}[/]")
    return results, tables


def markdown_block(results: dict[str, Any], tables: list[SectionTable]) -> str:
    meta = results["meta"]
    lines = [
        f"## fedskin bench, {meta['date']}",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']} ({meta['device_name']}, {meta['cpu_count']} CPUs, "
        f"{meta['torch_threads']} torch threads), torch {meta['torch']}",
        "",
    ]
    return "\n".join(lines) + "\n" + "\n".join(t.markdown() for t in tables) + "\n"


def bench_cli(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    model: Annotated[
        str | None, typer.Option(help="backbone (default: efficientnet_b0 on GPU, else tiny)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="px (default: 224 on GPU, 32 on CPU)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="small settings (CI / CPU)")] = False,
    sections: Annotated[str, typer.Option("--sections", help="e.g. 1,2,4")] = "1,2,3,4,5",
    steps: Annotated[int | None, typer.Option("--steps", help="timed steps per repeat")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU torch threads (0: torch default)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the figures as JSON")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="append a dated Markdown block")
    ] = None,
) -> None:
    """Throughput, pipeline, round-overhead, DP-cost and scaling figures, side by side."""
    picked = parse_sections(sections)
    s = make_settings(
        device,
        quick,
        model=model,
        image_size=image_size,
        batch_size=batch_size,
        steps=steps,
        dp_steps=steps,
        repeats=repeats,
        threads=threads,
    )
    results, tables = run_bench(s, picked)
    if out is not None:
        atomic_write_json(out, results, indent=2)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        with markdown.open("a") as f:
            f.write(markdown_block(results, tables))


if __name__ == "__main__":
    typer.run(bench_cli)
