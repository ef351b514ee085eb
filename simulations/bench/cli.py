"""`fedskin bench`: the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.rundir import atomic_write_json


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
    # Lazily, on purpose: the sections import torch, timm, Flower and Ray (about 6 CPU-s),
    # which every other `fedskin` command (partition, keys, deploy, --help) would pay too.
    from simulations.bench.driver import markdown_block, parse_sections, run_bench
    from simulations.bench.settings import make_settings

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
