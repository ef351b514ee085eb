"""`fedskin synth` and `fedskin partition`: the data commands (algorithms: common/data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from common.data.formats import ALL_FORMATS, SYNTH_FORMATS
from common.data.institutions import resolve_names
from common.data.partition import (
    SPLITS,
    join_manifests,
    one_site,
    partition,
    read_manifest,
    site_class_counts,
    with_source,
    write_manifest,
    write_moves_report,
)
from common.data.schema import DataError, default_home
from common.data.sources import load_source, source_location
from common.data.synth import synthesize
from common.figures import pyplot, save_figure, styled


@styled
def plot_sites(manifest: pd.DataFrame, classes: Sequence[str], path: str | Path) -> Path:
    """PNG: per site, a stacked bar of class proportions with its image count."""
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    counts = site_class_counts(manifest, classes)
    props = counts.div(counts.sum(axis=1), axis=0)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(props)))
    y = np.arange(len(props))[::-1]
    left = np.zeros(len(props))
    for k, name in enumerate(classes):
        w = props[k].to_numpy()
        ax.barh(y, w, left=left, color=cmap(k % cmap.N), label=str(name), edgecolor="white")
        for yi, li, wi in zip(y, left, w, strict=True):
            if wi >= 0.07:
                ax.text(li + wi / 2, yi, f"{wi:.0%}", ha="center", va="center", fontsize=8)
        left += w
    for yi, n in zip(y, counts.sum(axis=1), strict=True):
        ax.text(1.01, yi, f"n={n}", va="center", fontsize=9)
    ax.set_yticks(y, [str(s) for s in props.index])
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of site's images")
    scheme = manifest.attrs.get("scheme", "")
    ax.set_title(f"Class mix per site{f' ({scheme})' if scheme else ''}")
    ax.legend(
        ncol=min(len(classes), 8),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35 if len(props) < 4 else -0.15),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def synth_cli(
    fmt: Annotated[
        str,
        typer.Argument(
            help="Format: " + " | ".join(SYNTH_FORMATS) + " (csv: a hospital's own export)"
        ),
    ] = "ham-dataverse",
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: FEDSKIN_HOME/synth/..)")
    ] = None,
    n_images: Annotated[int, typer.Option("--n-images", help="Number of images")] = 2000,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Random seed")] = 0,
) -> None:
    """Write a synthetic data set in a real on-disk format (wired as `fedskin synth`)."""
    if fmt not in SYNTH_FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}; expected one of {list(SYNTH_FORMATS)}")
    out = out or default_home() / "synth" / f"{fmt}-{n_images}-{image_size}-{seed}"
    try:
        path = synthesize(fmt, out, n_images=n_images, image_size=image_size, seed=seed)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console().print(
        f"wrote synthetic [bold]{fmt}[/] data set ({n_images} images, {image_size}px, "
        f"seed {seed}) to {path}\nload it with: load_source({fmt!r}, {str(path)!r}) or "
        f"--run-config \"data-format='{fmt}' data-path='{path}'\""
    )


def site_table(
    manifest: pd.DataFrame, classes: Sequence[str], meta: pd.DataFrame | None = None
) -> Table:
    """Per-site images, groups, split sizes, class counts (and mean age if meta is given)."""
    counts = site_class_counts(manifest, classes)
    splits = pd.crosstab(manifest["site"], manifest["split"]).reindex(columns=SPLITS, fill_value=0)
    groups = manifest.groupby("site")["group_id"].nunique()
    age = None
    if meta is not None and "age" in meta.columns:
        ages = pd.to_numeric(meta["age"], errors="coerce")
        ages.index = meta["image_id"].astype(str)
        age = (
            ages.reindex(manifest["image_id"].astype(str))
            .groupby(manifest["site"].to_numpy())
            .mean()
        )
    scheme = manifest.attrs.get("scheme", "")
    table = Table(
        title=f"Sites{f' ({scheme})' if scheme else ''}",
        caption="imgs/grps: images/groups; train/val/test: images; class columns: images",
        show_footer=True,
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        pad_edge=False,
    )
    total = counts.to_numpy().sum()

    def col(header: str, footer: object, **kw: object) -> None:
        table.add_column(header, footer=str(footer), justify="right", no_wrap=True, **kw)

    table.add_column("site", footer="total", no_wrap=True, style="bold")
    col("imgs", total)
    col("grps", manifest["group_id"].nunique())
    for s, short in zip(SPLITS, ("train", "val", "test"), strict=True):
        col(short, int(splits[s].sum()), style="dim")
    for k, c in enumerate(classes):
        col(str(c), int(counts[k].sum()))
    if age is not None:
        col("age", f"{ages.mean():.1f}")
    for site, row in counts.iterrows():
        n = int(row.sum())
        cells = [str(site), str(n), str(int(groups[site]))]
        cells += [str(int(splits.loc[site, s])) for s in SPLITS]
        cells += [str(int(v)) if v else "·" for v in row]
        if age is not None:
            a = age.get(site, np.nan)
            cells.append("–" if pd.isna(a) else f"{a:.1f}")
        table.add_row(*cells)
    return table


def partition_cli(
    fmt: Annotated[
        str,
        typer.Argument(
            help="data format: " + ", ".join(ALL_FORMATS) + " (csv: a hospital's own export)"
        ),
    ],
    data_path: Annotated[
        Path | None,
        typer.Option("--data-path", help="source folder; omit for the built-in synthetic set"),
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help="natural | institutions | dirichlet | iid (default: natural)"),
    ] = None,
    num_sites: Annotated[
        int | None, typer.Option(help="sites for dirichlet / iid (default: 4)")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            "--site",
            help="ONE named site holding every image (a hospital's own data): keeps the "
            "export's own split if it has one, else a group-safe split; replaces "
            "--scheme/--num-sites",
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (small = more skew)")] = 0.5,
    institutions: Annotated[
        str, typer.Option(help="comma subset of vienna,barcelona,mskcc,mia,queensland,athens")
    ] = "",
    seed: Annotated[int, typer.Option(help="same seed -> byte-identical manifest")] = 0,
    val_frac: Annotated[
        float, typer.Option(help="validation fraction of each site's groups")
    ] = 0.15,
    test_frac: Annotated[float, typer.Option(help="test fraction of each site's groups")] = 0.15,
    min_site_images: Annotated[int, typer.Option(help="smallest site allowed")] = 20,
    join: Annotated[
        list[Path] | None,
        typer.Option(
            "--join",
            help="a manifest written by fedskin partition whose sites join these in one "
            "federation (site names, images and groups must differ, classes agree); "
            "repeatable",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="manifest CSV; the plot goes beside it as <stem>.png")
    ] = Path("manifest.csv"),
) -> None:
    """Split a data source into hospital sites with leak-free train/validation/test splits."""
    console = Console()
    if site is not None and (scheme is not None or num_sites is not None):
        raise typer.BadParameter("--site makes one site: drop --scheme and --num-sites")
    scheme = scheme or "natural"
    try:
        read_as, folder = source_location(fmt, data_path)
        src = load_source(read_as, folder)
        if site is not None:
            manifest = one_site(
                src.meta,
                site,
                classes=list(src.classes),
                seed=seed,
                val_frac=val_frac,
                test_frac=test_frac,
                min_site_images=min_site_images,
            )
        else:
            manifest = partition(
                src.meta,
                scheme,
                classes=list(src.classes),
                num_sites=4 if num_sites is None else num_sites,
                alpha=alpha,
                institutions=resolve_names(institutions) if scheme == "institutions" else None,
                seed=seed,
                val_frac=val_frac,
                test_frac=test_frac,
                min_site_images=min_site_images,
            )
        manifest = with_source(manifest, read_as, folder)  # where these sites' images are
        if join:
            joined = [(p, read_manifest(p)) for p in join]
            manifest = join_manifests(manifest, joined, list(src.classes))
    except DataError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    csv = write_manifest(manifest, out)
    png = plot_sites(manifest, src.classes, csv.with_suffix(".png"))
    moves = write_moves_report(manifest, csv)
    console.print(site_table(manifest, src.classes, meta=src.meta))
    for note in manifest.attrs.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"manifest: {csv}\nplot:     {png}")
    if moves is not None:
        console.print(f"moves:    {moves}")
    nxt = next_commands(fmt, None if join else data_path, csv, None if join else site)
    console.print(nxt, soft_wrap=True, markup=False)


def next_commands(fmt: str, data_path: Path | None, manifest: Path, site: str | None) -> str:
    """What to run with a manifest just written: a simulation, and a site's SuperNode (a
    joined manifest: no data-path, it records each site's)."""
    data = f"data-format='{fmt}'"
    if data_path is not None:
        data += f" data-path='{data_path.resolve()}'"
    data += f" manifest='{manifest.resolve()}'"
    lines = ["next: simulate with it:", f'  fedskin simulate --run-config "{data}"']
    if site is not None:
        lines += [
            "or serve it as this site's data in a deployment:",
            f"  flower-supernode ... --node-config \"site='{site}' {data}\"",
        ]
    return "\n".join(lines)
