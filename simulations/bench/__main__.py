"""``python -m simulations.bench``: the same as ``fedskin bench``."""

import typer

from simulations.bench.cli import bench_cli

typer.run(bench_cli)
