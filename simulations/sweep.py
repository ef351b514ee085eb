"""`fedskin sweep privacy`: the privacy-utility trade-off as a grid of federated runs.

Every cell (DP level x strategy x target epsilon x seed, epsilon "inf" = no DP) is one ordinary
``simulate`` run in ``<out>/cells/<cell>``; a cell whose run directory already holds final
test results is not run again, so an interrupted sweep resumes where it stopped. The
results are collected from the cells' ``metrics.json`` (and ``audit.json`` with ``--audit``)
into ``sweep.csv`` (one row per run), ``sweep.md`` (mean +- sd over seeds) and
``privacy_utility.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.markdown import Markdown

from common.config import RunConfig
from common.data.schema import DataError
from common.fedmetrics import nanmax
from common.figures import pyplot, save_figure, styled
from common.rundir import RunDir, atomic_write_text
from server.results import Central, ResultsError, RunResults, load_results
from simulations.runner import RAY_ADDRESS_HELP, use_ray_address
from simulations.tracking import Track, TrackingUri, log_children, parent_run, with_tracking

console = Console()
log = logging.getLogger("fedskin")

NO_DP = {"inf", "none", "nodp", "no-dp", "off"}
LEVELS = ("sample", "site")  # Opacus at each site | Flower's site-level wrappers
BUDGET_SPENT = "privacy budget spent"


# ------------------------------------------------------------------------------ grid
def parse_epsilons(text: str) -> list[float | None]:
    """``"1,3,8,inf"`` -> [1.0, 3.0, 8.0, None]; inf/none mean "no DP"."""
    out: list[float | None] = []
    for item in (s.strip().lower() for s in str(text).split(",")):
        if not item:
            continue
        if item in NO_DP:
            out.append(None)
            continue
        try:
            eps = float(item)
        except ValueError:
            raise DataError(f"--epsilons: {item!r} is not a number, inf or none") from None
        if not (eps > 0 and math.isfinite(eps)):
            raise DataError(f"--epsilons: {item!r} must be > 0 (use inf for no DP)")
        out.append(eps)
    if not out:
        raise DataError("--epsilons is empty")
    return out


def parse_list(text: str, name: str, cast: type = str) -> list[Any]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise DataError(f"--{name} is empty")
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise DataError(f"--{name}: cannot read {text!r} as a list of {cast.__name__}") from None


def cell_name(strategy: str, epsilon: float | None, seed: int, level: str = "sample") -> str:
    eps = "nodp" if epsilon is None else f"eps{epsilon:g}"
    if level == "site" and epsilon is not None:  # the no-DP cell is shared by both levels
        eps = f"site-{eps}"
    return f"{strategy}_{eps}_seed{seed}"


def cell_overrides(
    base: dict[str, Any], strategy: str, epsilon: float | None, seed: int, level: str = "sample"
) -> dict[str, Any]:
    """The cell's run config on top of the sweep's ``--run-config``.

    Every cell refits the head as the config says (``head-calibration``; under
    sample-level DP from noised statistics, common/headfit.py; site-level DP refuses it, so
    a site-level sweep needs ``head-calibration = "none"``). Sample level:
    Opacus at every site, noise calibrated to ``target-epsilon``. Site level:
    Flower's wrapper (``central-dp``, client-side clipping unless the base config names
    another fixed-clipping variant), noise calibrated to ``central-epsilon``.
    """
    asked = RunConfig.from_flat(base)  # the sweep's own settings, typed
    cell = dict(base)
    cell.update(strategy=strategy, seed=int(seed), dp=level == "sample" and epsilon is not None)
    if epsilon is not None and level == "sample":
        # calibrate to the target, never a fixed sigma
        cell.update({"target-epsilon": float(epsilon), "noise-multiplier": 0.0})
    if epsilon is not None and level == "site":
        variant = asked.central_dp or "client-fixed"
        cell.update({"central-dp": variant, "central-epsilon": float(epsilon)})
    elif "central-dp" in cell:
        cell.update({"central-dp": ""})
    cell.update({"run-name": cell_name(strategy, epsilon, seed, level)})
    return cell


def is_finished(run_dir: Path) -> bool:
    """A cell is done when its metrics.json carries final test results."""
    return finished_results(run_dir) is not None


def finished_results(run_dir: Path) -> RunResults | None:
    """A finished cell's results; None while it is not (a malformed metrics.json: not
    finished, the cell runs again)."""
    if not RunDir(run_dir).metrics.is_file():
        return None
    try:
        results = load_results(run_dir)
    except ResultsError:
        return None
    return results if results.test is not None else None


# ------------------------------------------------------------------------------ results
def cell_row(results: RunResults, audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """One CSV row from a finished run's results (and its audit.json)."""
    run, test = results.run, results.finished()
    site_level = bool(run.central_dp) and run.central_epsilon > 0
    row: dict[str, Any] = {
        "strategy": run.strategy,
        "level": "site" if site_level else ("sample" if run.dp else "none"),
        "seed": run.seed,
        "dp": run.dp or site_level,
        "target_epsilon": _target(run, site_level),
        "rounds": len(results.rounds),
        "best_round": results.best_round or test.best_round,
        "test_balanced_accuracy": test.pooled.balanced_accuracy,
        "test_mean_site_balanced_accuracy": test.mean_site_balanced_accuracy,
        "test_accuracy": test.pooled.accuracy,
        "test_auroc": test.pooled.auroc,
        "seconds": results.seconds,
        # balanced accuracy of a constant guess: the plot's floor
        "chance": 1.0 / len(results.classes) if results.classes else math.nan,
    }
    # cumulative values: the last one seen per site is the total (the head refit's release
    # under DP, after the rounds, included)
    eps = results.epsilons()
    delta = results.last_train_value("delta")
    sigma = results.last_train_value("noise_multiplier", "noise-multiplier")
    row |= _privacy_totals(results, site_level, eps, delta, sigma)
    row["stopped"] = test.stopped
    row["sites_stopped_at_budget"] = len(results.sites_rejected_for(BUDGET_SPENT))
    row |= _by_site("bacc", {site: m.balanced_accuracy for site, m in test.sites.items()})
    row |= _by_site("epsilon", eps) | _by_site("delta", delta)
    row |= _by_site("noise_multiplier", sigma)
    return row | (_audit_columns(audit) if audit is not None else {})


def _privacy_totals(
    results: RunResults,
    site_level: bool,
    eps: dict[str, float],
    delta: dict[str, float],
    sigma: dict[str, float],
) -> dict[str, float]:
    """The run's privacy: the worst site's at sample level; at site level one guarantee for
    the whole federation (cumulative: the last round's figure)."""
    run = results.run
    if site_level:
        last = results.central() or Central(delta=run.central_delta)
        return {
            "epsilon_max": float(last.epsilon),
            "delta_max": float(last.delta),
            "noise_multiplier_min": float(last.noise_multiplier),
        }
    return {
        "epsilon_max": max(eps.values()) if eps else (0.0 if run.dp else math.inf),
        "delta_max": max(delta.values()) if delta else math.nan,
        "noise_multiplier_min": min(sigma.values()) if sigma else math.nan,
    }


def _by_site(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``name[site]`` columns, sites in name order."""
    return {f"{name}[{site}]": values[site] for site in sorted(values)}


def _audit_columns(audit: dict[str, Any]) -> dict[str, Any]:
    """The membership-inference audit's columns (audit.json writes NaN as null)."""
    sites = audit.get("sites", {})
    auc = {site: _num(m.get("auc")) for site, m in sorted(sites.items())}
    tpr = {site: _num(m.get("tpr_at_1pct_fpr")) for site, m in sorted(sites.items())}
    row: dict[str, Any] = {
        "mia_auc_max": nanmax(auc.values()),
        "mia_tpr1_max": nanmax(tpr.values()),
    }
    for site in auc:
        row[f"mia_auc[{site}]"] = auc[site]
        row[f"mia_tpr1[{site}]"] = tpr[site]
    return row


def _target(run: RunConfig, site_level: bool) -> float:
    """The epsilon the cell was calibrated to (inf: no DP)."""
    if site_level:
        return run.central_epsilon
    return run.target_epsilon if run.dp else math.inf


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def collect(cells: Sequence[tuple[str, Path]], audit: bool) -> pd.DataFrame:
    """The table of all finished cells, in grid order."""
    rows = []
    for name, run_dir in cells:
        if (results := finished_results(run_dir)) is None:
            continue
        paths = RunDir(run_dir)
        audit_json = None
        if audit and paths.audit_json.is_file():
            audit_json = json.loads(paths.audit_json.read_text())
        rows.append({"cell": name, **cell_row(results, audit_json)})
    return pd.DataFrame(rows)


def _mean_sd(values: pd.Series, digits: int = 3) -> str:
    v = values.dropna().astype(float)
    if v.empty:
        return "-"
    if np.isinf(v).all():
        return "∞"
    mean = f"{v.mean():.{digits}f}"
    return mean if len(v) < 2 else f"{mean} ± {v.std(ddof=1):.{digits}f}"


def summary_table(df: pd.DataFrame) -> str:
    """Markdown table: mean ± sd over seeds per (strategy, target epsilon)."""
    cols = [
        ("achieved ε (max site)", "epsilon_max", 2),
        ("test bal. acc (pooled)", "test_balanced_accuracy", 3),
        ("mean site bal. acc", "test_mean_site_balanced_accuracy", 3),
        ("AUROC", "test_auroc", 3),
    ]
    if "mia_auc_max" in df:
        cols += [("MIA AUC (max site)", "mia_auc_max", 3), ("TPR@1%FPR", "mia_tpr1_max", 3)]
    head = ["strategy", "DP level", "target ε", "seeds", *[c[0] for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if df.empty:
        return "\n".join(lines)
    df = _with_level(df)
    for (strategy, level, eps), g in df.groupby(["strategy", "level", "target_epsilon"], sort=True):
        label = "no DP" if math.isinf(eps) else f"{eps:g}"
        cells = [str(strategy), "-" if level == "none" else str(level), label, str(len(g))]
        cells += [_mean_sd(g[c], d) if c in g else "-" for _, c, d in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_level(df: pd.DataFrame) -> pd.DataFrame:
    """Tables written before site-level sweeps existed have no level column."""
    if "level" not in df:
        df = df.assign(level=np.where(df["dp"].astype(bool), "sample", "none"))
    return df


@styled
def plot_privacy_utility(df: pd.DataFrame, path: Path) -> None:
    """Test balanced accuracy (and MIA AUC) against epsilon; "no DP" sits at the right."""
    plt = pyplot()

    panels = [("test_balanced_accuracy", "test balanced accuracy (pooled)")]
    if "mia_auc_max" in df and df["mia_auc_max"].notna().any():
        panels.append(("mia_auc_max", "membership-inference AUC (max over sites)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    df = _with_level(df)
    levels = sorted(set(df["level"]) - {"none"})
    if len(levels) > 1:  # one line per strategy and level; the no-DP point joins each line
        nodp = df[df["level"] == "none"]
        parts = [pd.concat([df[df["level"] == lv], nodp]).assign(level=lv) for lv in levels]
        df = pd.concat(parts).assign(strategy=lambda d: d["strategy"] + ", " + d["level"])
    finite = sorted(e for e in df["target_epsilon"].unique() if math.isfinite(e))
    x_nodp = (max(finite) * 4) if finite else 10.0
    for ax, (col, ylabel) in zip(axes[0], panels, strict=True):
        for i, (strategy, g) in enumerate(df.groupby("strategy", sort=True)):
            color = f"C{i}"
            stats = g.groupby("target_epsilon")[col].agg(["mean", "std"]).fillna({"std": 0.0})
            fin = stats[np.isfinite(stats.index.to_numpy(dtype=float))]
            if len(fin):
                ax.errorbar(
                    fin.index,
                    fin["mean"],
                    yerr=fin["std"],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=str(strategy),
                )
            if (~np.isfinite(stats.index.to_numpy(dtype=float))).any():
                nodp = stats.loc[math.inf]
                ax.errorbar(
                    [x_nodp],
                    [nodp["mean"]],
                    yerr=[nodp["std"]],
                    marker="s",
                    mfc="white",
                    capsize=3,
                    color=color,
                    label=None if len(fin) else str(strategy),
                )
                ax.axhline(nodp["mean"], color=color, ls=":", lw=0.8)
        ticks = [*finite, x_nodp] if math.inf in set(df["target_epsilon"]) else finite
        labels = [f"{e:g}" for e in finite] + (["no DP"] if len(ticks) > len(finite) else [])
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        if finite and len(ticks) > len(finite):
            ax.axvline(math.sqrt(max(finite) * x_nodp), color="grey", lw=0.6, ls="--")
        unit = {"sample": "per site (sample-level DP)", "site": "(site-level DP)"}
        xlabel = unit[levels[0]] if len(levels) == 1 else "(per site at sample level)"
        ax.set(xlabel=f"target ε {xlabel}", ylabel=ylabel)
        if col == "mia_auc_max":
            ax.axhline(0.5, color="k", lw=0.6, ls="--")
        elif "chance" in df and df["chance"].notna().any():
            ax.axhline(df["chance"].max(), color="k", lw=0.6, ls="--", label="chance")
        ax.legend(title="strategy", fontsize=8)
        ax.grid(alpha=0.3)
    n_seeds = df.groupby(["strategy", "target_epsilon"]).size().max() if len(df) else 0
    fig.suptitle(f"Privacy-utility trade-off (error bars: sd over ≤{n_seeds} seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out: Path) -> str:
    """sweep.csv, sweep.md and privacy_utility.png from the collected table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.csv", df.to_csv(index=False, float_format="%.6g"))
    table = summary_table(df)
    atomic_write_text(out / "sweep.md", f"# Privacy sweep\n\n{table}\n")
    if len(df):
        plot_privacy_utility(df, out / "privacy_utility.png")
    return table


# ------------------------------------------------------------------------------ sweep
def sweep_privacy(
    config: Path | None,
    epsilons: Sequence[float | None],
    strategies: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    overrides: str | None = None,
    audit: bool = False,
    levels: Sequence[str] = ("sample",),
) -> pd.DataFrame:
    """Run (or resume) the grid and write sweep.csv, sweep.md and privacy_utility.png."""
    from server.strategies import STRATEGIES
    from simulations.runner import parse_overrides, resolve_config, simulate

    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise DataError(f"unknown strategies {bad}; choose from {list(STRATEGIES)}")
    base = parse_overrides(overrides)
    clash = sorted({"dp", "target-epsilon", "central-epsilon", "strategy", "seed"} & set(base))
    if clash:
        raise DataError(f"--run-config sets {clash}, which the sweep itself varies")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise DataError(f"unknown DP levels {bad}; choose from {list(LEVELS)}")
    out = Path(out)
    grid = list(
        dict.fromkeys(  # the no-DP cell is one cell, whatever the level
            (s, e, k, "sample" if e is None else lv)
            for lv in levels
            for s in strategies
            for e in epsilons
            for k in seeds
        )
    )
    cells = [(cell_name(*c), out / "cells" / cell_name(*c)) for c in grid]
    for cell in grid:  # fail fast on config mistakes (each level's own checks)
        resolve_config(config, cell_overrides(base, *cell))
    failed: list[str] = []
    for i, ((strategy, eps, seed, level), (name, run_dir)) in enumerate(
        zip(grid, cells, strict=True)
    ):
        tag = f"[{i + 1}/{len(grid)}] {name}"
        if is_finished(run_dir):
            console.print(f"{tag}: finished earlier, skipped")
        else:
            console.rule(tag)
            try:
                simulate(config, cell_overrides(base, strategy, eps, seed, level), out=run_dir)
            except DataError:
                raise
            except Exception as err:  # one broken cell must not lose the rest of the grid
                log.exception("cell %s failed", name)
                failed.append(f"{name}: {err}")
                continue
        if audit and not RunDir(run_dir).audit_json.is_file():
            from simulations.audit import audit_run

            try:
                audit_run(run_dir)
            except Exception as err:  # the run itself is fine: keep it, retry the audit later
                log.exception("audit of cell %s failed", name)
                failed.append(f"{name} (audit): {err}")
        write_outputs(collect(cells, audit), out)  # partial results survive an interruption
    df = collect(cells, audit)
    write_outputs(df, out)
    if failed:
        console.print(
            "[red]failed cells (re-run the same command to retry):[/]\n  " + "\n  ".join(failed)
        )
    return df


def sweep_cli(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="experiment TOML (simulations/configs)")
    ] = None,
    epsilons: Annotated[
        str, typer.Option(help="target epsilons per site; inf or none = no DP")
    ] = "1,3,8,inf",
    strategies: Annotated[str, typer.Option(help="comma-separated strategies")] = "fedavg",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1",
    out: Annotated[Path, typer.Option(help="sweep directory")] = Path("runs/sweep-privacy"),
    run_config: Annotated[
        str | None, typer.Option("--run-config", help="overrides for every cell: \"k=v k2='t'\"")
    ] = None,
    audit: Annotated[
        bool, typer.Option("--audit/--no-audit", help="membership-inference audit of each run")
    ] = False,
    levels: Annotated[
        str,
        typer.Option(
            help="DP levels: sample (Opacus at each site), site (Flower's site-level "
            "wrappers, noise calibrated to the epsilon), or both: sample,site"
        ),
    ] = "sample",
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
    track: Track = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Privacy-utility sweep: strategies x target epsilons x seeds; resumes if interrupted."""
    use_ray_address(ray_address)
    asked = dict(command="sweep privacy", config=config or "", epsilons=epsilons, seeds=seeds)
    asked |= {"strategies": strategies, "run-config": run_config or "", "levels": levels}
    try:
        run_config, uri = with_tracking(config, run_config, track, tracking_uri)  # sets the key
        grid = parse_epsilons(epsilons), parse_list(strategies, "strategies")
        grid += (parse_list(seeds, "seeds", int),)
        with parent_run(uri, out, asked | {"audit": audit}, resume=True) as parent:
            df = sweep_privacy(
                config,
                *grid,
                out,
                overrides=run_config,
                audit=audit,
                levels=parse_list(levels, "levels"),
            )
            log_children(parent, sorted((out / "cells").glob("*")))  # cells done earlier
    except DataError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    console.print(Markdown(summary_table(df)))
    console.print(
        f"{len(df)} runs: {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'privacy_utility.png'}"
    )
