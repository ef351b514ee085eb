"""``fedskin deploy init`` and ``fedskin deploy add-site``: a federation's key material.

Each verb prints a table of the files it wrote and where each one goes; a problem is one
line naming the file or the option (docs/deployment.md, step 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.deploy import DEFAULT_SERVER_NAMES, add_site_keys, make_federation

deploy_app = typer.Typer(
    help="A federation's key material: the CA, the SuperLink certificate, the sites' keys "
    "(docs/deployment.md).",
    no_args_is_help=True,
)

Out = Annotated[
    Path,
    typer.Option("--out", "-o", help="The federation's key folder (e.g. federation-keys)."),
]
Sites = Annotated[
    list[str], typer.Option("--site", "-s", help="Site name (repeat once per hospital).")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing keys (old ones stop working).")
]


def _show(out_dir: Path, rows: list[tuple[str, str, str]]) -> None:
    console = Console()
    table = Table(title=f"Federation key material in {out_dir}")
    for column in ("file", "what", "goes to"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"Copy rules: {out_dir / 'README.txt'}; guide: docs/deployment.md")


def _fail(err: Exception) -> typer.Exit:
    """One line: the file or option and what is wrong with it."""
    Console().print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
    return typer.Exit(code=1)


@deploy_app.command("init")
def init_cli(
    out: Out,
    site: Sites,
    server_name: Annotated[
        list[str] | None,
        typer.Option(
            "--server-name",
            help="Host name or IP the sites use to reach the SuperLink (repeatable). "
            f"Default: {' '.join(DEFAULT_SERVER_NAMES)}.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates in days.")] = 365,
    overwrite: Overwrite = False,
) -> None:
    """Create a federation: its CA, the SuperLink's certificate and one key pair per site."""
    try:
        files = make_federation(
            out, server_names=server_name or None, sites=site, days=days, overwrite=overwrite
        )
    except (OSError, ValueError) as err:
        raise _fail(err) from err
    _show(out, files.rows())


@deploy_app.command("add-site")
def add_site_cli(
    out: Out,
    site: Sites,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--ca-fingerprint",
            help="The CA fingerprint from the folder's README.txt (sha256:...); "
            "ca/ca.crt must match it.",
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Add a site's key pair to an existing federation (the CA and other sites unchanged)."""
    try:
        added = add_site_keys(out, site, overwrite=overwrite, ca_fingerprint=ca_fingerprint)
    except (OSError, ValueError) as err:
        raise _fail(err) from err
    rows = [(str(p.relative_to(out)), w, g) for k in added.values() for p, w, g in k.rows()]
    _show(out, rows)
