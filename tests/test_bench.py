"""`fedskin bench` in-process with tiny settings: every figure present, positive and finite.

No timing thresholds (the machine is shared and noisy): the tests check that each figure was
measured and that the ratios are computed from the measured numbers.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console

from server.results import RunResults, load_results
from simulations.bench.cli import bench_cli
from simulations.bench.driver import markdown_block, parse_sections, run_bench
from simulations.bench.settings import SIGNED_FIGURES, make_settings


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """Every numeric leaf of the results as (dotted path, value); booleans excluded."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{path}.{k}" if path else k)]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{path}[{i}]")]
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return [(path, float(obj))]
    return []


def _check_figures(results: dict[str, Any]) -> None:
    figures = [(p, v) for p, v in _numbers(results) if not p.startswith("meta")]
    assert figures
    for path, value in figures:
        assert math.isfinite(value), path
        if path.rsplit(".", 1)[-1] not in SIGNED_FIGURES:
            assert value > 0, f"{path} = {value}"


@pytest.fixture(scope="module")
def quick_results() -> tuple[dict[str, Any], list, str]:
    s = make_settings(
        "cpu",
        quick=True,
        model="test_efficientnet",
        image_size=16,
        batch_size=8,
        steps=2,
        dp_steps=2,
        repeats=2,
        warmup=1,
        pipeline_images=24,
        source_size=32,
        dp_models=["test_efficientnet"],
        scaling_images=48,
        scaling_sites=[2, 6],
    )
    out = io.StringIO()
    results, tables = run_bench(s, [1, 2, 4, 5], Console(file=out, width=120))
    return results, tables, out.getvalue()


def test_every_figure_positive_and_finite(quick_results: tuple) -> None:
    results, tables, printed = quick_results
    assert set(results) == {"meta", "train", "pipeline", "dp", "scaling"}
    _check_figures(results)
    json.dumps(results, allow_nan=False)  # the --out file is strict JSON
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["date"] and meta["command"]
    for table in tables:
        assert table.title.split(":")[0] in printed
        assert table.rows


def test_training_ratio_from_measured_medians(quick_results: tuple) -> None:
    train = quick_results[0]["train"]
    runs = train["runs"]
    assert len(runs["client"]) == len(runs["plain"]) == 2
    client = statistics.median(runs["client"])
    plain = statistics.median(runs["plain"])
    assert train["client_images_per_second"] == pytest.approx(client)
    assert train["plain_images_per_second"] == pytest.approx(plain)
    assert train["ratio"] == pytest.approx(client / plain)
    assert train["augment_cost_ratio"] == pytest.approx(
        train["client_augment_images_per_second"] / client
    )


def test_pipeline_ratio_against_best_jpeg_loader(quick_results: tuple) -> None:
    pipe = quick_results[0]["pipeline"]
    assert pipe["n_images"] == 24
    jpeg = pipe["jpeg_images_per_second"]
    assert set(jpeg) == {"0"}
    assert pipe["ratio"] == pytest.approx(pipe["cache_images_per_second"] / max(jpeg.values()))


def test_dp_rows_per_mode(quick_results: tuple) -> None:
    dp = quick_results[0]["dp"]
    modes = {r["mode"] for r in dp["rows"]} | {e["mode"] for e in dp["errors"]}
    assert modes == {"hooks", "functorch", "ghost"}
    assert "hooks" in {r["mode"] for r in dp["rows"]}  # the default mode must work
    for r in dp["rows"]:
        assert r["model"] == "test_efficientnet"
        assert r["ratio"] == pytest.approx(r["dp_step_seconds"] / r["nondp_step_seconds"])


def test_scaling_rows_and_ratios(quick_results: tuple) -> None:
    sc = quick_results[0]["scaling"]
    plan = [(r["sites"], r["total_images"]) for r in sc["rows"]]
    assert plan == [(2, 24), (2, 48), (6, 48)]
    rows = {(r["sites"], r["total_images"]): r for r in sc["rows"]}
    assert sc["data_ratio"] == pytest.approx(
        rows[(2, 48)]["round_seconds"] / rows[(2, 24)]["round_seconds"]
    )
    assert sc["sites_ratio"] == pytest.approx(
        rows[(6, 48)]["round_seconds"] / rows[(2, 48)]["round_seconds"]
    )
    assert sc["peak_rss_growth_mb"] == pytest.approx(
        rows[(6, 48)]["peak_rss_mb"] - rows[(2, 48)]["peak_rss_mb"]
    )
    for r in sc["rows"]:
        assert r["ms_per_image"] == pytest.approx(1000 * r["round_seconds"] / r["total_images"])
        assert r["peak_rss_mb"] >= sc["baseline_rss_mb"] * 0.5


def test_markdown_block_has_every_table(quick_results: tuple) -> None:
    results, tables, _ = quick_results
    md = markdown_block(results, tables)
    assert md.startswith("## fedskin bench, ")
    for table in tables:
        assert f"### {table.title}" in md
        assert "| " + " | ".join(table.columns) + " |" in md


def test_cli_writes_json_and_appends_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    for _ in range(2):
        bench_cli(
            device="cpu",
            quick=True,
            model="test_resnet",
            image_size=16,
            batch_size=8,
            sections="1",
            steps=2,
            repeats=1,
            threads=1,
            out=out,
            markdown=md,
        )
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "train"}
    assert results["meta"]["settings"]["model"] == "test_resnet"
    _check_figures(results)
    assert md.read_text().count("## fedskin bench, ") == 2  # appended, not overwritten


def test_bad_options_are_refused() -> None:
    assert parse_sections("4, 1,2") == [1, 2, 4]
    for bad in ("0", "1,7", "x", ""):
        with pytest.raises(typer.BadParameter):
            parse_sections(bad)
    with pytest.raises(typer.BadParameter, match="unknown model"):
        make_settings("cpu", model="vit_huge")
    with pytest.raises(typer.BadParameter):
        make_settings("cpu", batch_size=0)


def _tiny_run(run_dir: Path) -> dict[str, Any]:
    """A run directory as the server loop leaves it: metrics of two rounds and last.pt."""
    import torch

    site = {"balanced_accuracy": 0.5, "accuracy": 0.6, "auroc": 0.7}
    rounds = [
        {
            "round": r,
            "seconds": 1.0,
            "train": {"a": {"train_loss": 1.0 / r}, "b": {"train_loss": 1.2 / r}},
            "validation": {
                "global": site,
                "sites": {"a": site, "b": site},
                "mean_site_balanced_accuracy": 0.5,
            },
        }
        for r in (1, 2)
    ]
    metrics = {"config": {"run-name": "t"}, "classes": ["x", "y"], "rounds": rounds}
    metrics["best_round"] = 2
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"arrays": {"w": torch.ones(64, 64)}, "state": {}}, run_dir / "checkpoints/last.pt")
    return metrics


def test_write_outputs_plots_flag_and_redraw(tmp_path: Path) -> None:
    from server.report import write_outputs

    metrics = _tiny_run(tmp_path)
    args = (metrics["config"], metrics["classes"], metrics["rounds"])
    write_outputs(tmp_path, RunResults.of(*args, None, 2), plots=False)  # a per-round write
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "history.csv").is_file()
    assert not list(tmp_path.glob("*.png"))
    test = {
        "global": {"n": 4, "balanced_accuracy": 0.5},
        "sites": {"a": {"num-examples": 4}},
        "confusion": [[1, 1], [0, 2]],
        "best_round": 2,
    }
    write_outputs(tmp_path, RunResults.of(*args, test, 2), plots=False)
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))
    # an interrupted or plots=False run gets its PNGs later, from metrics.json alone
    write_outputs(tmp_path, load_results(tmp_path))
    written = sorted(tmp_path.glob("*.png"))
    assert sorted(p.name for p in written) == ["confusion_test.png", "learning_curves.png"]
    assert all(p.stat().st_size > 0 for p in written)
    write_outputs(tmp_path / "default", RunResults.of(*args, test, 2))  # default: plots drawn
    assert {p.name for p in (tmp_path / "default").glob("*.png")} == {
        "confusion_test.png",
        "learning_curves.png",
    }


def test_server_writes_are_timed_with_and_without_plots(tmp_path: Path) -> None:
    from simulations.bench.rounds import bench_server_writes

    metrics = _tiny_run(tmp_path)
    writes = bench_server_writes(tmp_path, RunResults.from_json(metrics), repeats=2)
    _check_figures(writes)
    assert len(writes["runs"]["plots"]) == len(writes["runs"]["no_plots"]) == 2
    assert writes["write_outputs_seconds"] == pytest.approx(
        statistics.median(writes["runs"]["plots"])
    )
    assert writes["plots_seconds"] == pytest.approx(
        writes["write_outputs_seconds"] - writes["write_outputs_no_plots_seconds"]
    )
    assert writes["checkpoint_mb"] > 0.016  # 64 x 64 float32
    assert (tmp_path / "bench-writes" / "learning_curves.png").is_file()


def test_secagg_bytes_are_the_masked_vector_and_the_key_exchange() -> None:
    """A site's SecAgg+ round sends its masked vector (8 bytes per floating-point entry,
    twice the packed float32 weights) plus keys and one encrypted share pair per other
    site: the difference between 4 and 24 sites is 20 ciphertexts and 20 unmask shares."""
    import torch

    from common.models import build_model
    from simulations.bench.secagg import reply_bytes

    state = build_model("test_efficientnet", 7).state_dict()
    floats = sum(v.numel() for v in state.values() if torch.is_floating_point(v))
    plain, secure = (
        reply_bytes("test_efficientnet", 4, "none"),
        reply_bytes("test_efficientnet", 4, "secagg+"),
    )
    weights = sum(v.numel() * v.element_size() for v in state.values())
    assert weights < plain < weights + 4096  # the packed arrays and their framing
    assert 8 * floats < secure < 8 * floats + 4096
    per_site = (reply_bytes("test_efficientnet", 24, "secagg+") - secure) / 20
    assert 100 < per_site < 1000  # one ciphertext (two Shamir shares) + one unmask share
