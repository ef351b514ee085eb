"""5. Scaling with the number of sites over the same data (in a fresh process)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from simulations.bench.measure import SectionTable, fake_data, fmt, median, sync
from simulations.bench.memory import reset_peak_rss, vm_kb
from simulations.bench.settings import NUM_CLASSES, BenchSettings


def scaling_rows(s: BenchSettings) -> dict[str, Any]:
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
    images, labels = fake_data(total, s.image_size, seed=2)
    model = build_model(s.model, NUM_CLASSES)
    global_state = get_weights(model)
    model_mb = sum(v.numel() * v.element_size() for v in global_state.values()) / 2**20
    cfg = TrainConfig(batch_size=s.batch_size, local_epochs=1, loss="ce", augment=True)
    baseline_mb = vm_kb("VmRSS") / 1024  # interpreter + libraries + the data + one model
    if s.warmup:
        k = min(total, s.batch_size * 2)
        c = replace(cfg, local_steps=s.warmup)
        train_local(model, images[:k], labels[:k], c, num_classes=NUM_CLASSES, device=device)

    def one_round(n_sites: int, n_images: int) -> dict[str, float]:
        bounds = np.linspace(0, n_images, n_sites + 1).astype(int)
        reset_peak_rss()
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
        sync(device)
        seconds = time.perf_counter() - t0
        row = {
            "sites": n_sites,
            "total_images": n_images,
            "round_seconds": seconds,
            "train_seconds": train_s,
            "peak_rss_mb": vm_kb("VmHWM") / 1024,
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
        row = {m: median([r[m] for r in runs]) for m in runs[0]}
        row["sites"], row["total_images"] = key
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        row["ms_per_image"] = 1000 * row["round_seconds"] / row["total_images"]
        rows.append(row)
    return {"rows": rows, "model_mb": model_mb, "baseline_rss_mb": baseline_mb}


def _run_child(s: BenchSettings) -> dict[str, Any]:
    """Run :func:`scaling_rows` in a new interpreter (settings in, JSON result out)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import json, sys; from simulations.bench.settings import BenchSettings; "
        "from simulations.bench.scaling import scaling_rows; "
        "r = scaling_rows(BenchSettings(**json.loads(sys.argv[1]))); "
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
            fmt(r["round_seconds"], 2),
            fmt(r["ms_per_image"], 2),
            fmt(r["peak_rss_mb"], 0),
        ]
        if cuda:
            line.append(fmt(r["peak_gpu_mb"], 0))
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
