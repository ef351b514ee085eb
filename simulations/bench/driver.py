"""Run the chosen sections: header, section selection, the Markdown block."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from simulations.bench.dp import bench_dp
from simulations.bench.measure import SectionTable, torch_threads
from simulations.bench.pipeline import bench_pipeline
from simulations.bench.rounds import bench_round
from simulations.bench.scaling import bench_scaling
from simulations.bench.secagg import bench_secagg
from simulations.bench.settings import SECTION_NAMES, BenchSettings
from simulations.bench.train import bench_train


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
        raise typer.BadParameter(f"--sections: comma-separated numbers 1-6, got {text!r}") from None
    bad = [p for p in picked if p not in SECTION_NAMES]
    if bad or not picked:
        raise typer.BadParameter(f"--sections: numbers 1-6, got {text!r}")
    return picked


def run_bench(
    s: BenchSettings, sections: Sequence[int], console: Console | None = None
) -> tuple[dict[str, Any], list[SectionTable]]:
    """Run the chosen sections; returns the figures (JSON-able) and the tables printed."""
    console = console or Console()
    results: dict[str, Any] = {}
    tables: list[SectionTable] = []
    with torch_threads(s.threads if not s.device.startswith("cuda") else 0):
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
                elif sec == 5:
                    res, table = bench_scaling(s, console)
                else:
                    res, table = bench_secagg(s, console, work)
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
