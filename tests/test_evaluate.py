"""`fedskin evaluate`: a trained checkpoint scored on another data set, without training."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from common.data.sources import load_source
from common.data.synth import synthesize
from common.rundir import METRICS
from simulations.cli import app
from simulations.runner import simulate
from tests.ray_harness import on_ray

# One tiny but real federated run: the README's hospital export joined to a HAM10000 download's
# sites (a synthetic Dataverse folder and a mixed JPEG/PNG/DICOM csv export, 16 px images).
TINY = {
    "builtin-images": 300,
    "image-size": 16,
    "model": "test_efficientnet",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "augment": False,
    "head-calibration": "lda",  # best.pt may be the refitted model (its counters 0-d)
}
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ROOT = Path(__file__).resolve().parents[1]
STAND_IN = "~/data/HAM10000"  # the README's HAM10000 download


def readme_block(word: str) -> list[str]:
    """The README's fenced block (its ``fedskin`` lines) holding ``word``."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    block = next(b for b in blocks if word in b)
    return [ln.strip() for ln in block.splitlines() if ln.strip().startswith("fedskin ")]


def _tiny(command: str) -> list[str]:
    """A README command's arguments; a simulation's --run-config made TINY."""
    args = shlex.split(command.replace(STAND_IN, "HAM10000"), comments=True)[1:]
    if args[0] == "simulate":
        i = args.index("--run-config") + 1
        args[i] += " " + " ".join(f"{k}={json.dumps(v)}" for k, v in TINY.items())
    return args


@pytest.fixture(scope="module")
def joined_run(tmp_path_factory: pytest.TempPathFactory, ray_head: str | None) -> Path:
    """The README's joined federation, its commands run as written (in a folder holding the
    stand-ins): the quickstart's HAM10000 partition, then the export's --join and simulate."""
    root = tmp_path_factory.mktemp("eval")
    synthesize("ham-dataverse", root / "HAM10000", n_images=320, image_size=16)
    synthesize("csv", root / "example-export", n_images=60, image_size=16, seed=1)
    quickstart = next(c for c in readme_block("--scheme natural") if "ham-dataverse" in c)
    join, simulate_cmd, _ = readme_block("--join")
    with pytest.MonkeyPatch.context() as mp, on_ray(ray_head):  # the session's Ray head node
        mp.chdir(root)
        for command in (quickstart, join, simulate_cmd):
            result = CliRunner().invoke(app, _tiny(command))
            assert result.exit_code == 0, f"{command}\n{result.output}"
    return root


@pytest.fixture(scope="module")
def best_checkpoint(joined_run: Path) -> Path:
    return joined_run / "runs" / "federation" / "checkpoints" / "best.pt"


def _evaluate(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


def test_the_readme_joined_federation_is_scored_as_it_reported(joined_run, monkeypatch):
    """The hospital's export trained next to the HAM10000 sites, each read from its own
    folder; the README's `fedskin evaluate --checkpoint RUN --split test`, as written, gives
    the pooled test figure the run reported, and `--site hospital-a` that site's."""
    run = joined_run / "runs" / "federation"
    reported = json.loads((run / "metrics.json").read_text())["test"]
    manifest = pd.read_csv(run / "manifest.csv")
    hospital = manifest[manifest["site"] == "hospital-a"]
    assert {Path(i).suffix for i in hospital["image_id"]} == {".jpg", ".png", ".dcm"}
    assert set(manifest["data_format"]) == {"csv", "ham-dataverse"}
    assert "hospital-a" in reported["sites"] and len(reported["sites"]) >= 3
    monkeypatch.chdir(joined_run)
    (command,) = [c for c in readme_block("--join") if c.startswith("fedskin evaluate")]

    result = CliRunner().invoke(app, _tiny(command))

    assert result.exit_code == 0, result.output
    m = json.loads((run / "external" / "csv+ham-dataverse" / "metrics.json").read_text())
    assert m["split"] == "test" and m["split_of"] == "the run's manifest"
    assert m["n"] == int(reported["global"]["n"]) == int((manifest["split"] == "test").sum())
    for key in ("balanced_accuracy", "accuracy"):  # the pooled AUROC is from histograms
        assert m[key] == pytest.approx(reported["global"][key], abs=1e-3), key
    assert np.asarray(m["confusion"]).tolist() == reported["confusion"]
    site = _evaluate("--checkpoint", str(run), "--split", "test", "--site", "hospital-a")
    assert site.exit_code == 0, site.output
    at = json.loads((run / "external" / "csv+ham-dataverse-hospital-a" / METRICS).read_text())
    figures = reported["sites"]["hospital-a"]
    assert at["n"] == int(figures["num-examples"]) == int((hospital["split"] == "test").sum())
    assert at["balanced_accuracy"] == pytest.approx(figures["balanced_accuracy"], abs=1e-3)
    assert at["auroc"] == pytest.approx(figures["auroc"], abs=1e-3)


def test_evaluate_on_another_layout(best_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))  # the evaluation's image cache
    data = synthesize("ham-hf", tmp_path / "ham-hf", n_images=80, image_size=32, seed=1)
    n_images = len(load_source("ham-hf", data).meta)

    result = _evaluate(
        "--checkpoint", str(best_checkpoint), "--data-format", "ham-hf", "--data-path", str(data)
    )

    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output  # the summary table
    out = best_checkpoint.parent.parent / "external" / "ham-hf"  # default --out
    for name in ("metrics.json", "confusion.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == HAM and m["split"] == "all" and m["image_size"] == TINY["image-size"]
    assert m["n"] == n_images == 80
    conf = np.asarray(m["confusion"])
    assert conf.shape == (7, 7) and conf.sum() == m["n"]
    assert conf.sum(axis=1).tolist() == [m["class_counts"][c] for c in HAM]
    assert m["accuracy"] == pytest.approx(np.trace(conf) / m["n"])
    for i, c in enumerate(HAM):
        recall = m["per_class_recall"][c]
        if conf[i].sum():
            assert recall == pytest.approx(conf[i, i] / conf[i].sum())
        else:
            assert recall is None
    present = [m["per_class_recall"][c] for c in HAM if m["class_counts"][c]]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(present))
    for key in ("balanced_accuracy", "accuracy", "auroc"):
        assert 0.0 <= m[key] <= 1.0, key
    assert "External validation" in (out / "report.md").read_text()


def test_evaluate_refuses_other_classes(best_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    data = synthesize("isic2020", tmp_path / "isic2020", n_images=40, image_size=32, seed=1)

    result = _evaluate(
        "--checkpoint", str(best_checkpoint), "--data-format", "isic2020", "--data-path", str(data)
    )

    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    assert "benign" in lines[0] and "akiec" in lines[0]  # both class lists named
    assert not (best_checkpoint.parent.parent / "external" / "isic2020").exists()


def test_evaluate_needs_the_run_config(best_checkpoint, tmp_path):
    lonely = tmp_path / "copied" / "checkpoints" / "best.pt"
    lonely.parent.mkdir(parents=True)
    shutil.copy(best_checkpoint, lonely)

    result = _evaluate(
        "--checkpoint", str(lonely), "--data-format", "ham-hf", "--data-path", str(tmp_path)
    )

    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "config.toml" in lines[0], result.output


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, ray_head: str | None) -> Path:
    """A tiny run under sample-level DP (GroupNorm model, noised head refit)."""
    out = tmp_path_factory.mktemp("eval-dp") / "run"
    with on_ray(ray_head):
        simulate(None, dict(TINY) | {"dp": True, "target-epsilon": 8.0}, out=out)
    return out


@pytest.mark.parametrize("kind", ["lda", "dp"])
def test_evaluate_reproduces_the_runs_pooled_test_figure(kind, best_checkpoint, dp_run):
    """`fedskin evaluate --checkpoint RUN --split test` needs nothing else: the run's own
    data, its manifest's test split and its best checkpoint give the figure it reported."""
    run = best_checkpoint.parent.parent if kind == "lda" else dp_run
    reported = json.loads((run / "metrics.json").read_text())["test"]

    result = _evaluate("--checkpoint", str(run), "--split", "test", "--out", str(run / "again"))

    assert result.exit_code == 0, result.output
    m = json.loads((run / "again" / "metrics.json").read_text())
    assert m["split"] == "test" and m["split_of"] == "the run's manifest"
    assert m["n"] == int(reported["global"]["n"])
    assert m["balanced_accuracy"] == pytest.approx(
        reported["global"]["balanced_accuracy"], abs=1e-3
    )
    assert m["accuracy"] == pytest.approx(reported["global"]["accuracy"], abs=1e-3)
    assert np.asarray(m["confusion"]).tolist() == reported["confusion"]
    assert "The run's own data" in (run / "again" / "report.md").read_text()


def test_evaluate_loads_the_last_checkpoint_and_says_what_it_holds(best_checkpoint, tmp_path):
    """last.pt (the resume checkpoint: the last round's model, before the head refit) loads
    too; the report says the run's test figures are best.pt's."""
    last = best_checkpoint.parent / "last.pt"
    result = _evaluate("--checkpoint", str(last), "--split", "test", "--out", str(tmp_path))

    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["checkpoint"] == str(last.resolve()) and m["split"] == "test"
    assert "before the head refit" in m["note"] and "note: last.pt" in result.output


def test_evaluate_refuses_the_runs_training_images(best_checkpoint):
    run = best_checkpoint.parent.parent
    result = _evaluate("--checkpoint", str(run), "--split", "all", "--out", str(run / "all"))

    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "are in the run's training split" in line and "--include-training-images" in line
    assert not (run / "all").exists()


# FedBN and Ditto: each site scores its own model; `--site` loads the state it kept.
PERSONAL = TINY | {"num-server-rounds": 1, "head-calibration": "none"}


@pytest.fixture(scope="module", params=["fedbn", "ditto"])
def personal_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ray_head
) -> Path:
    out = tmp_path_factory.mktemp(f"eval-{request.param}") / "run"
    with on_ray(ray_head):
        simulate(None, dict(PERSONAL) | {"personalize": request.param}, out=out)
    return out


def test_evaluate_reproduces_each_sites_personal_figure(personal_run, tmp_path):
    """`fedskin evaluate --checkpoint RUN --split test --site S` scores S's test rows with S's
    kept state (RUN/site-state/S-personal.pt) and gives the figures S reported."""
    reported = json.loads((personal_run / "metrics.json").read_text())["test"]["sites"]
    global_auroc = _global_at_sites(personal_run, tmp_path, list(reported))
    differs = 0
    for site, figures in reported.items():
        out = tmp_path / site
        result = _evaluate(
            "--checkpoint", str(personal_run), "--split", "test", "--site", site, "--out", str(out)
        )

        assert result.exit_code == 0, result.output
        m = json.loads((out / "metrics.json").read_text())
        assert m["site"] == site and m["personal"].endswith(f"{site}-personal.pt")
        assert m["n"] == int(figures["num-examples"])
        assert m["balanced_accuracy"] == pytest.approx(figures["balanced_accuracy"], abs=1e-3)
        assert m["auroc"] == pytest.approx(figures["auroc"], abs=1e-3)
        differs += abs(global_auroc[site] - figures["auroc"]) > 1e-3
    assert differs, "the global model scores the sites as their own models do: nothing tested"


def _global_at_sites(run: Path, tmp_path: Path, sites: list[str]) -> dict[str, float]:
    """Each site's test AUROC under the run's global best model (the run's files, with
    personalisation off in a copy of its config)."""
    copy = tmp_path / "global-run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    shutil.copy(run / "manifest.csv", copy / "manifest.csv")
    config = (run / "config.toml").read_text()
    personalize = next(line for line in config.splitlines() if line.startswith("personalize"))
    (copy / "config.toml").write_text(config.replace(personalize, 'personalize = ""'))
    found = {}
    for site in sites:
        out = tmp_path / f"global-{site}"
        result = _evaluate(
            "--checkpoint", str(copy), "--split", "test", "--site", site, "--out", str(out)
        )
        assert result.exit_code == 0, result.output
        found[site] = json.loads((out / "metrics.json").read_text())["auroc"]
    return found


def test_evaluate_site_errors_are_one_line(personal_run, tmp_path):
    """An unknown site, and a state folder without the site's file: one line each."""
    cases = {
        ("--site", "nowhere"): "site 'nowhere' is not in",
        ("--site", "rosendahl", "--state-dir", str(tmp_path)): "no personal state of site",
    }
    for args, expected in cases.items():
        result = _evaluate("--checkpoint", str(personal_run), "--split", "test", *args)
        assert result.exit_code == 2
        (line,) = result.output.strip().splitlines()
        assert expected in line, line
        assert "rosendahl-personal.pt" in line or "vienna_dias" in line, line
