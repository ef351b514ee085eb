"""The `fedskin` command line: one entry point for all three kinds of users."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from common.data.schema import DataError
from server.deploy_cli import deploy_app
from simulations.bench.cli import bench_cli
from simulations.data_cli import partition_cli, synth_cli
from simulations.keys import keys_cli
from simulations.runner import RAY_ADDRESS_HELP, shipped_configs, use_ray_address, use_verbose
from simulations.sweep import sweep_cli
from simulations.tracking import Track, TrackingUri, log_baselines, parent_run, with_tracking
from simulations.weights import weights_save_cli

SHIPPED = ", ".join(shipped_configs())
CONFIG_HELP = f"experiment TOML file, or the name of a shipped one: {SHIPPED}"
RUN_CONFIG_HELP = "overrides of any config key: \"key=value key2='text'\" (as flwr run)"
RayAddress = Annotated[str | None, typer.Option("--ray-address", help=RAY_ADDRESS_HELP)]
VERBOSE_HELP = "debug logging: each site's reply, each message, Flower's own log"
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)]


def with_verbose(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with a ``-v/--verbose`` option: every run it starts logs at DEBUG."""

    @functools.wraps(command)
    def wrapper(*args: object, verbose: bool = False, **kwargs: object) -> None:
        use_verbose(verbose)
        command(*args, **kwargs)

    sig = inspect.signature(command, eval_str=True)
    option = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False)
    params = [*sig.parameters.values(), option.replace(annotation=Verbose)]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return wrapper


# `fedskin --help` lists the user commands in the order of the work; commands this list
# does not name come after them. Internal commands (site-exec, deploy-overhead) are hidden
# there and documented where they are used (docs/deployment.md, docs/benchmarks.md).
WORKFLOW = (
    "synth",
    "partition",
    "simulate",
    "compare",
    "sweep",
    "evaluate",
    "deploy",
    "weights",
    "bench",
    "keys",
)


class WorkflowGroup(TyperGroup):
    """A command group whose help lists the commands in :data:`WORKFLOW` order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        return sorted(names, key=lambda n: rank.get(n, len(WORKFLOW)))


app = typer.Typer(
    cls=WorkflowGroup,
    help="Federated skin-lesion classification across hospital sites (Flower + timm + Opacus). "
    "Every run-config key, its default and allowed values: fedskin keys [WORD].",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from common.version import version

        typer.echo(version())
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="print fedskin's version (and git commit, in a checkout) and exit",
        ),
    ] = False,
) -> None:
    # No docstring: the help above stays the app's. --version is eager: no command needed.
    pass


sweep_app = typer.Typer(help="Grids of experiments.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")

app.command("synth", help="Write a synthetic data set in one of the real on-disk formats.")(
    synth_cli
)
app.command("partition", help="Split a data source into hospital sites (writes a manifest).")(
    partition_cli
)
app.command(
    "bench", help="Benchmarks: throughput, data pipeline, round overhead, DP cost, scaling."
)(bench_cli)
sweep_app.command("privacy", help="Privacy-utility grid: epsilons x strategies x seeds.")(
    with_verbose(sweep_cli)
)
app.add_typer(
    deploy_app, name="deploy", help="Key material of a federation: deploy init, deploy add-site."
)
from client.warm_exec import site_exec_cli  # noqa: E402
from simulations.deploy_overhead import deploy_overhead_cli  # noqa: E402

app.command(
    "site-exec",
    hidden=True,
    help="A site's warm ClientApp launcher (supernode --isolation process).",
)(site_exec_cli)
app.command(
    "deploy-overhead", hidden=True, help="Benchmark: ClientApp start per message, cold vs warm."
)(deploy_overhead_cli)
weights_app = typer.Typer(help="Pretrained backbone weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
weights_app.command("save", help="Save a backbone's pretrained weights for an offline server.")(
    weights_save_cli
)


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Option("--config", "-c", help=CONFIG_HELP)] = None,
    run_config: Annotated[
        str | None, typer.Option("--run-config", help="overrides: \"key=value key2='text'\"")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue from the last checkpoint (refused if the config changes the result)"
        ),
    ] = False,
    force_resume: Annotated[
        bool,
        typer.Option(
            "--force-resume",
            help="resume even though the config differs from the checkpoint's",
        ),
    ] = False,
    verbose: Verbose = False,
    ray_address: RayAddress = None,
    track: Track = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run a federated experiment on this machine (no arguments: the built-in default)."""
    from simulations.runner import simulate as run

    use_ray_address(ray_address)
    use_verbose(verbose)
    try:
        run_config, _ = with_tracking(config, run_config, track, tracking_uri)  # sets the key
        run(config, run_config, out, resume=resume, verbose=verbose, force_resume=force_resume)
    except DataError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err


@app.command()
def compare(
    config: Annotated[Path | None, typer.Option("--config", "-c", help=CONFIG_HELP)] = None,
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategies and personalised methods")
    ] = "fedavg,fedprox",
    run_config: Annotated[str | None, typer.Option("--run-config", help=RUN_CONFIG_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for every run and the table")] = Path(
        "runs/compare"
    ),
    local: Annotated[bool, typer.Option(help="train one local model per site")] = True,
    verbose: Verbose = False,
    ray_address: RayAddress = None,
    track: Track = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Pooled, local and federated models on the same sites: FLamby's per-site table."""
    from simulations.baselines import compare as run

    use_ray_address(ray_address)
    use_verbose(verbose)
    methods = [s.strip() for s in strategies.split(",") if s.strip()]
    asked = {"command": "compare", "config": config or "", "strategies": ",".join(methods)}
    try:
        asked |= {"run-config": run_config or "", "local": local}
        run_config, uri = with_tracking(config, run_config, track, tracking_uri)  # sets the key
        with parent_run(uri, out, asked) as parent:
            log_baselines(parent, run(config, run_config, methods, out, local), methods)
    except DataError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err


# External validation: score a trained checkpoint on a data set (simulations/evaluate.py).
from simulations.evaluate import evaluate_cli  # noqa: E402

app.command("evaluate", help="Score a trained checkpoint on a data set, without training.")(
    evaluate_cli
)

app.command("keys", help="Every run-config key: default, type, allowed values, help [WORD].")(
    keys_cli
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
