"""3. Round overhead of a real Flower simulation, and the server's per-round writes."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from common.rundir import RunDir, atomic_torch_save, read_checkpoint
from server.report import write_outputs
from server.results import RunResults, load_results
from simulations.bench.measure import SectionTable, fmt, median, timed
from simulations.bench.memory import ActorPeaks, reset_peak_rss, vm_kb
from simulations.bench.settings import TARGETS, BenchSettings


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
    sampler = ActorPeaks()
    driver_reset = reset_peak_rss()
    sampler.start()
    try:
        t0 = time.perf_counter()
        simulate(overrides=overrides, out=workdir / "sim")
        total_s = time.perf_counter() - t0
    finally:
        sampler.sample()
        sampler.stop()
    results = load_results(workdir / "sim")
    rounds = []
    for rec in results.rounds:
        train = rec.train
        secs = [float(m["seconds"]) for m in train.values()]
        if not secs:
            continue
        rt = float(rec.seconds)
        rounds.append(
            {
                "round": rec.round,
                "round_seconds": rt,
                "max_train_seconds": max(secs),
                "sum_train_seconds": sum(secs),
                "overhead_seconds": rt - max(secs),
                "overhead_fraction": (rt - max(secs)) / rt,
                "train_images": sum(float(m["num-examples"]) for m in train.values()),
                "client_images_per_second": median(
                    [float(m["images_per_second"]) for m in train.values()]
                ),
            }
        )
    if not rounds:
        raise RuntimeError("the simulation recorded no client training times")
    console.log("[3] timing the server's per-round writes (report, plots, checkpoint)")
    writes = bench_server_writes(workdir / "sim", results, max(s.repeats, 3))
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
        result["driver_peak_rss_mb"] = vm_kb("VmHWM") / 1024
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
                fmt(r["round_seconds"], 2),
                fmt(r["max_train_seconds"], 2),
                fmt(r["sum_train_seconds"], 2),
                fmt(r["overhead_seconds"], 2),
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
        f"{fmt(writes['write_outputs_seconds'], 3)} s with PNG plots, "
        f"{fmt(writes['write_outputs_no_plots_seconds'], 3)} s with plots=False; checkpoint "
        f"write {fmt(writes.get('checkpoint_write_seconds', math.nan), 3)} s (twice when "
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


def bench_server_writes(run_dir: Path, results: RunResults, repeats: int) -> dict[str, Any]:
    """The server's per-round writes, which the recorded round time does not include.

    After every round the loop saves ``checkpoints/last.pt`` (and ``best.pt`` when the
    validation score improves) and calls ``write_outputs``. Both are re-run here on the
    finished run's own data, into a scratch folder: ``write_outputs`` with and without its
    PNG plots (interleaved), and a re-save of the run's ``last.pt`` (same size and contents).
    """
    paths = RunDir(run_dir)
    scratch = paths.bench_writes
    so_far = {k: v for k, v in results.to_json().items() if k != "test"}
    per_round = RunResults.from_json(so_far)  # what the loop writes after each round
    ckpt_path = paths.checkpoint("last")
    ckpt = read_checkpoint(ckpt_path) if ckpt_path.is_file() else None  # weights only

    def save_checkpoint() -> None:  # as the loop does: atomically (common/rundir.py)
        atomic_torch_save(scratch / "last.pt", ckpt)

    cpu = torch.device("cpu")
    write_outputs(scratch, per_round, plots=True)  # warm-up: matplotlib's first figure
    runs: dict[str, list[float]] = {"plots": [], "no_plots": [], "checkpoint": []}
    for r in range(repeats):
        for plots in (True, False) if r % 2 == 0 else (False, True):
            secs, _ = timed(lambda p=plots: write_outputs(scratch, per_round, plots=p), cpu)
            runs["plots" if plots else "no_plots"].append(secs)
        if ckpt is not None:
            runs["checkpoint"].append(timed(save_checkpoint, cpu)[0])
    with_plots, without = median(runs["plots"]), median(runs["no_plots"])
    out: dict[str, Any] = {
        "repeats": repeats,
        "write_outputs_seconds": with_plots,
        "write_outputs_no_plots_seconds": without,
        "plots_seconds": with_plots - without,
        "runs": runs,
    }
    if runs["checkpoint"]:
        out["checkpoint_write_seconds"] = median(runs["checkpoint"])
        out["checkpoint_mb"] = ckpt_path.stat().st_size / 1e6
    return out
