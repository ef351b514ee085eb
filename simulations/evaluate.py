"""`fedskin evaluate`: score a trained checkpoint on any supported data set, no training.

Two uses. **Reproduce a run**: ``fedskin evaluate --checkpoint RUN --split test`` scores the
run's best checkpoint on exactly the run's test split (its own data and its manifest,
``RUN/manifest.csv``), and gives the pooled test figure the run reported. **External
validation**: a hospital checks the consortium's model on its own images, in any supported
on-disk format with the same classes (``--split`` then means the publisher's split, or a
``--manifest``'s). The run directory (``RUN/config.toml``) says which backbone, image size
and label set the model has. Images the run trained on are never scored by accident: a
selection that holds any image of the run's training split is refused unless
``--include-training-images``. Outputs (``metrics.json``, ``confusion.png``, ``report.md``)
go to ``RUN/external/<data-format>`` unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.config import RunConfig
from common.data.cache import build_cache
from common.data.partition import read_manifest
from common.data.schema import DataError
from common.data.site_data import (
    cache_dir,
    classes_for,
    data_pipeline,
    recorded_sources,
    resolve_source,
)
from common.data.sources import load_source
from common.names import SPLITS as MANIFEST_SPLITS
from common.rundir import RunDir, read_checkpoint, read_toml
from simulations.evaluate_report import print_table, summarize, write_results

if TYPE_CHECKING:
    import numpy as np
    import torch
    from rich.console import Console
    from torch import nn

    from common.data.schema import SourceData

SPLITS = ("all", *MANIFEST_SPLITS)  # what --split accepts


# ----------------------------------------------------------------------------- the run


def checkpoint_path(given: Path) -> Path:
    """``given`` itself, or for a run directory its best checkpoint (its last if no round
    was ever best)."""
    given = Path(given).expanduser()
    if not given.is_dir():
        return given
    paths = RunDir(given)
    best, last = paths.checkpoint("best"), paths.checkpoint("last")
    if best.is_file():
        return best
    if last.is_file():
        return last
    raise DataError(f"checkpoint not found: {given} has no checkpoints/best.pt or last.pt")


def checkpoint_run_config(checkpoint: Path) -> RunConfig:
    """The resolved run config written beside ``checkpoints/`` (``RUN/config.toml``), typed
    (keys of an older fedskin left out)."""
    if not checkpoint.is_file():
        raise DataError(f"checkpoint not found: {checkpoint}")
    path = RunDir(checkpoint.resolve().parent.parent).config
    if not path.is_file():
        raise DataError(
            f"run config not found: {path} (the checkpoint must lie in RUN/checkpoints/ "
            "of the run directory that holds config.toml)"
        )
    return RunConfig.from_flat(read_toml(path, "run config"))  # malformed: one line


def model_from_checkpoint(
    run: RunConfig, checkpoint: dict[str, Any], classes: list[str], path: Path
) -> nn.Module:
    """The run's backbone (GroupNorm under DP) with the checkpoint's weights, in eval mode."""
    from common.models import model_for_run, set_weights  # lazily: timm is heavy

    arrays = checkpoint.get("arrays") if isinstance(checkpoint, dict) else None
    if not isinstance(arrays, dict) or not arrays:
        raise DataError(f"{path} is not a fedskin checkpoint (no 'arrays' entry)")
    # The weights all come from the checkpoint: no pretrained file is needed here.
    model = model_for_run(run, len(classes), pretrained=False)
    try:
        set_weights(model, arrays)
    except ValueError as err:
        raise DataError(f"{path} does not fit model {run.model!r}: {err}") from err
    return model.eval()


def load_personal(
    model: nn.Module, run: RunConfig, run_dir: RunDir, site: str, state_dir: Path | None
) -> dict[str, Any]:
    """Put ``site``'s personal entries (FedBN: its normalisation layers; Ditto: its whole
    model; fine-tuning: the fine-tuned model it tested) in the model, from
    ``<state-dir>/<site>-personal.pt``; what was loaded, for metrics.json. A run without
    kept personal state scores the global model at the site."""
    # lazily: client.personal imports timm (heavy), not for `fedskin --help`
    from client.personal import KEEPS_STATE, overwrite, personal_file, read_personal
    from common.models import set_weights

    if run.personalize not in KEEPS_STATE:
        return {"personal": None}
    if state_dir is None:  # a simulation's sites keep theirs in RUN/site-state
        state_dir = run_dir.site_state if run_dir.site_state.is_dir() else Path(run.state_dir)
    folder = Path(state_dir).expanduser()
    saved = read_personal(folder, site, run.personalize)
    if saved["arrays"]:  # none: the site had not trained by the best round
        try:
            set_weights(model, overwrite(model.state_dict(), saved["arrays"]))
        except ValueError as err:
            raise DataError(f"{personal_file(folder, site)} does not fit the model: {err}") from err
    model.eval()
    return {"personal": str(personal_file(folder, site)), "personal_round": saved["round"]}


# ----------------------------------------------------------------------------- the data


def check_classes(
    model_classes: list[str], model_format: str, data_classes: list[str], data_format: str
) -> None:
    """Refuse data whose label set differs from the one the model was trained on."""
    if list(model_classes) != list(data_classes):
        raise DataError(
            f"class mismatch: the checkpoint predicts {list(model_classes)} "
            f"(data-format {model_format!r}) but the {data_format!r} data has classes "
            f"{list(data_classes)}"
        )


def select_split(source: SourceData, split: str) -> Any:
    """Rows of the metadata to score: all, or one of the publisher's splits."""
    meta = source.meta
    if split == "all":
        return meta
    part = meta[meta["source_split"] == split]
    if part.empty:
        found = sorted(s for s in meta["source_split"].unique() if s) or ["none recorded"]
        raise DataError(
            f"no images in split {split!r} of this {source.format} data set "
            f"(publisher's splits: {', '.join(found)}); use --split all"
        )
    return part


def select_manifest_split(
    source: SourceData, manifest: Path, split: str, site: str | None = None
) -> Any:
    """Rows of the metadata in ``split`` of ``manifest`` (every row of it for ``all``), of
    ``site`` only when one is named."""
    table = read_manifest(manifest)
    if site is not None:
        check_site(table, manifest, site)
        table = table[table["site"].astype(str) == site]
    if split != "all":
        table = table[table["split"] == split]
    ids = set(table["image_id"].astype(str))
    meta = source.meta
    part = meta[meta["image_id"].astype(str).isin(ids)]
    if part.empty or len(part) < len(ids):
        raise DataError(
            f"{manifest}: {len(ids) - len(part)} of the {len(ids)} images of split {split!r} "
            f"are not in this {source.format} data set"
        )
    return part


def check_site(table: Any, manifest: Path, site: str) -> None:
    """Refuse a site the manifest does not name (one line listing those it names)."""
    sites = sorted(table["site"].astype(str).unique())
    if site not in sites:
        raise DataError(f"site {site!r} is not in {manifest} (its sites: {', '.join(sites)})")


def training_ids(run_dir: RunDir) -> set[str]:
    """The image ids of the run's training split (its manifest), or none if it has none."""
    if not run_dir.manifest.is_file():
        return set()
    table = read_manifest(run_dir.manifest)
    return set(table.loc[table["split"] == "train", "image_id"].astype(str))


@dataclass
class Scored:
    """The images to score: a uint8 image array, the rows of it to score (in order), their
    labels and ids, the data's classes and how many of its rows its loader skipped."""

    images: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    skipped: int


def data_source(
    run: RunConfig, data_format: str | None, data_path: Path | None
) -> tuple[str, Path, bool]:
    """(format, path, whether it is the run's own data) of the data to score: the given
    one, or the run's own."""
    own_format, own_path = resolve_source(run)
    if data_format is None:
        if data_path is not None:
            raise DataError("--data-path needs --data-format (or neither: the run's own data)")
        data_format, data_path = own_format, own_path
    elif data_path is None:
        raise DataError(f"--data-format {data_format} needs --data-path")
    data_path = Path(data_path).expanduser()
    own = data_format == own_format and data_path.resolve() == Path(own_path).resolve()
    return data_format, data_path, own


def recorded_label(recorded: dict[str, tuple[str, Path]]) -> str:
    """The data formats a manifest records, as the results name them (``csv+ham-dataverse``)."""
    return "+".join(sorted({fmt for fmt, _ in recorded.values()}))


def load_images(
    data_format: str,
    data_path: Path,
    size: int,
    split: str,
    manifest: Path | None = None,
    cache_root: Path | None = None,
    site: str | None = None,
) -> Scored:
    """The images to score: ``split`` of ``manifest`` (``site``'s rows only, if named) when
    one is given, else the publisher's split."""
    source = load_source(data_format, data_path)
    cache = build_cache(source, size, cache_root, progress=True)  # drops unreadable rows
    if manifest is not None:
        part = select_manifest_split(source, manifest, split, site)
    else:
        part = select_split(source, split)
    ids = part["image_id"].astype(str).tolist()
    labels = part["label"].to_numpy(dtype="int64")
    skipped = source.report.n_skipped()
    return Scored(cache.images, cache.rows(ids), labels, ids, source.classes, skipped)


def load_recorded(
    run: RunConfig, manifest: Path, size: int, split: str, site: str | None = None
) -> Scored:
    """``split`` of a manifest that records each site's source (``site``'s rows only, if
    named), each site's images read from its own source (the data pipeline's checks)."""
    import numpy as np

    sites = [site] if site is not None else None
    settings = run.with_values({"manifest": str(manifest), "image-size": size, "data-path": ""})
    prepared = data_pipeline(settings, sites=sites)
    images, labels, ids = [], [], []
    for name, loaded in prepared.by_site.items():
        rows = prepared.manifest[prepared.manifest["site"].astype(str) == name]
        if split != "all":
            rows = rows[rows["split"] == split]
        names = rows["image_id"].astype(str).tolist()
        images.append(loaded.cache.get(names))
        labels.append(rows["label"].to_numpy(dtype="int64"))
        ids += names
    stacked = np.concatenate(images)
    skipped = sum(source.report.n_skipped() for source in prepared.sources())
    return Scored(
        stacked, np.arange(len(ids)), np.concatenate(labels), ids, prepared.source.classes, skipped
    )


def predict_all(
    model: nn.Module,
    images: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """Softmax probabilities, batch by batch from the (memory-mapped) cache, with a bar."""
    import numpy as np
    import torch
    from rich.progress import track

    from common.train import predict  # lazily: Opacus and timm are heavy

    starts = range(0, len(rows), batch_size)
    out = [np.zeros((0, _num_classes(model)), dtype=np.float32)]
    for start in track(
        starts, description=f"scoring {len(rows)} images", transient=True, disable=not progress
    ):
        batch = torch.from_numpy(np.ascontiguousarray(images[rows[start : start + batch_size]]))
        out.append(predict(model, batch, device=device, batch_size=batch_size))
    return np.concatenate(out)


def _num_classes(model: nn.Module) -> int:
    return int(model.get_classifier().out_features)


# ----------------------------------------------------------------------------- entry points


def evaluate_checkpoint(
    checkpoint: Path,
    data_format: str | None = None,
    data_path: Path | None = None,
    out: Path | None = None,
    image_size: int | None = None,
    split: str = "all",
    batch_size: int = 256,
    console: Console | None = None,
    manifest: Path | None = None,
    include_training_images: bool = False,
    site: str | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` (a file, or a run directory: its best) and write the results;
    returns metrics.json's dict. Data format and path default to the run's own, and then
    the manifest to the run's (``RUN/manifest.csv``): ``split`` is the run's split.
    ``site``: that site's rows of the manifest, scored by its personal model (FedBN, Ditto,
    fine-tuning: its entries from ``state_dir``, by default the run's ``state-dir``)."""
    from common.train import pick_device  # lazily: Opacus and timm, not for `fedskin --help`

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    checkpoint = checkpoint_path(checkpoint)
    run = checkpoint_run_config(checkpoint)
    run_dir = RunDir(checkpoint.resolve().parent.parent)
    if manifest is None and data_format is None and data_path is None:
        manifest = run_dir.manifest if run_dir.manifest.is_file() else None
    joined = manifest is not None and not data_format and not run.data_path
    recorded = recorded_sources(read_manifest(manifest)) if joined else {}
    if recorded:  # the run read each site from the folder its manifest records
        data_format, data_path, own = recorded_label(recorded), Path(manifest), True
    else:
        data_format, data_path, own = data_source(run, data_format, data_path)
        if manifest is None and own and run_dir.manifest.is_file():
            manifest = run_dir.manifest
    if site is not None and manifest is None:
        raise DataError(f"--site {site} needs a manifest that names the sites (--manifest)")
    if site is not None:
        check_site(read_manifest(manifest), manifest, site)
    trained_on = run.data_format
    classes = classes_for(trained_on)
    if not recorded:  # a manifest's recorded sources are checked against the run's classes
        check_classes(classes, trained_on, classes_for(data_format), data_format)
    size = int(image_size or run.image_size)
    # torch.load(..., weights_only=True): a checkpoint holding any other object is refused
    model = model_from_checkpoint(run, read_checkpoint(checkpoint), classes, checkpoint)
    personal = load_personal(model, run, run_dir, site, state_dir) if site else {}
    if recorded:
        scored = load_recorded(run, manifest, size, split, site)
    else:
        cache_root = cache_dir(run) if own else None
        scored = load_images(data_format, data_path, size, split, manifest, cache_root, site)
        check_classes(classes, trained_on, scored.classes, data_format)
    images, rows, labels, ids = scored.images, scored.rows, scored.labels, scored.ids
    seen = training_ids(run_dir) & set(ids)
    if seen and not own and console is not None:  # other data may reuse ids for other images
        console.print(
            f"[yellow]note: {len(seen)} image ids coincide with the run's training split; "
            "if they are the same images, the figures are optimistic[/yellow]"
        )
    if seen and own and not include_training_images:
        raise DataError(
            f"{len(seen)} of the {len(ids)} images of split {split!r} are in the run's "
            f"training split ({run_dir.manifest}); score --split test or validation, or pass "
            "--include-training-images"
        )
    device = pick_device()
    probs = predict_all(model, images, rows, device, batch_size, progress=console is not None)
    if manifest is None:
        whose = "the publisher's splits"
    elif manifest == run_dir.manifest:
        whose = "the run's manifest"
    else:
        whose = f"manifest {manifest}"
    info = {
        "checkpoint": str(checkpoint.resolve()),
        "model": run.model,
        "trained_on": trained_on,
        "data_format": data_format,
        "data_path": str(data_path.resolve()),
        "split": split,
        "split_of": whose,
        "manifest": str(manifest) if manifest is not None else None,
        "training_images_scored": len(seen),
        "image_size": size,
        "skipped": scored.skipped,
        "site": site,
        **personal,
    }
    if checkpoint.name == "last.pt" and run.head_calibration != "none":
        info["note"] = (
            "last.pt holds the last round's model before the head refit; the run's test "
            "figures are best.pt's (--checkpoint RUN)"
        )
    if run.personalize and not personal.get("personal"):
        info["note"] = (
            f"personalize={run.personalize}: the run tested each site's own model; "
            "this scores the global one"
        )
    metrics = summarize(labels, probs, classes, info)
    out = Path(out) if out else run_dir.external(f"{data_format}-{site}" if site else data_format)
    write_results(out, metrics)
    if console is not None:
        print_table(console, metrics, out)
    return metrics


def evaluate_cli(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", help="a run directory (its best checkpoint) or RUN/checkpoints/X.pt"
        ),
    ],
    data_format: Annotated[
        str | None,
        typer.Option(
            "--data-format",
            help="ham-hf | ham-dataverse | isic2020 | fedisic2019 | csv | synth-ham "
            "(default: the run's own data)",
        ),
    ] = None,
    data_path: Annotated[
        Path | None,
        typer.Option("--data-path", help="folder of the data set (default: the run's own)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="results folder (default RUN/external/FORMAT)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="default: the run's image size")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="all | train | validation | test: the manifest's split (the run's own on its "
            "own data), else the publisher's",
        ),
    ] = "all",
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="a manifest whose --split to score (fedskin partition)"),
    ] = None,
    include_training_images: Annotated[
        bool,
        typer.Option(
            "--include-training-images", help="allow scoring images of the run's training split"
        ),
    ] = False,
    site: Annotated[
        str | None,
        typer.Option(
            "--site",
            help="score only this site's rows of the manifest, with its personal model "
            "(personalize=fedbn/ditto/finetune: its kept state from --state-dir)",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="where the site keeps SITE-personal.pt (default: the run's state-dir)",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
) -> None:
    """Score a trained model without training: the run's own test split, or external data."""
    from rich.console import Console

    try:
        evaluate_checkpoint(
            checkpoint,
            data_format,
            data_path,
            out,
            image_size,
            split,
            batch_size,
            Console(),
            manifest=manifest,
            include_training_images=include_training_images,
            site=site,
            state_dir=state_dir,
        )
    except DataError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
