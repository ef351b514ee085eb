"""Bench settings: what a run depends on, with defaults by device, and the targets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import typer

NUM_CLASSES = 7  # HAM10000's classes
SECTION_NAMES = {1: "train", 2: "pipeline", 3: "round", 4: "dp", 5: "scaling", 6: "secagg"}
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
    "secagg_round_ratio": 1.5,  # a 6-site regnetx_002 SecAgg+ round <= 1.5 x plain (2 CPUs)
}


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
    secagg_models: list[str] = field(default_factory=lambda: ["test_efficientnet", "regnetx_002"])
    secagg_sites: list[int] = field(default_factory=lambda: [4, 6, 24])
    secagg_rounds: int = 2  # section 6: the last round is timed (the first warms up)
    secagg_images_per_site: int = 50


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
