"""`fedskin weights save`: a backbone's pretrained weights in a file for an air-gapped server.

On a machine with internet, ``--source hub`` downloads timm's weights; copy the file to the
server and start the run with ``pretrained='FILE'``. Only the server reads it: the sites get
the initial global model in round 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def weights_save_cli(
    model: Annotated[str, typer.Argument(help="backbone name, e.g. efficientnet_b0")],
    out: Annotated[Path, typer.Option("--out", help="file to write: .safetensors or .pth")],
    source: Annotated[
        str,
        typer.Option(
            "--source", help="hub (timm's download) | cache (local hub caches) | a weights file"
        ),
    ] = "hub",
) -> None:
    """Save MODEL's pretrained weights (a timm state_dict) to --out."""
    from common.models import export_weights

    try:
        count = export_weights(model, source, out)
    except (ValueError, OSError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {count} tensors of {model} to {out.expanduser().resolve()}")
