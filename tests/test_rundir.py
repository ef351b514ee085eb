"""The run directory (common/rundir.py): atomic writes, safe checkpoints, checked resumes,
and one-line errors naming the file for a truncated checkpoint, manifest or TOML config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from typer.testing import CliRunner

from common import rundir
from common.config import ConfigError, RunConfig
from common.data.partition import read_manifest, write_manifest
from common.data.schema import DataError
from common.rundir import RunDir, atomic_write, atomic_write_text
from server import resume
from server.checkpoints import Checkpoints
from server.strategies import load_strategy_state, make_strategy, strategy_state

CLASSES = ["a", "b"]


def _one_line_naming(err: BaseException, path: Path) -> str:
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


# ----------------------------------------------------------------------------- atomic writes


def test_a_failure_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def half_then_crash(f) -> None:
        f.write(b"new but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp left


def test_a_failed_rename_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "history.csv"
    atomic_write_text(path, "old")

    def refuse(src, dst, **dir_fds) -> None:  # renamed inside the folder's fd
        raise OSError("rename failed")

    monkeypatch.setattr(rundir.os, "replace", refuse)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


def test_atomic_writes_of_each_kind(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    rundir.atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1}, indent=1)
    rundir.atomic_write(tmp_path / "b.bin", b"\x00\x01")  # bytes as they are
    rundir.atomic_torch_save(tmp_path / "c.pt", {"w": torch.ones(2)})
    rundir.atomic_copy(tmp_path / "b.bin", tmp_path / "d.bin")
    assert (tmp_path / "sub" / "a.json").read_text() == '{\n "x": 1\n}'
    assert (tmp_path / "d.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(2))
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_run_directory_paths() -> None:
    paths = RunDir(Path("runs/x"))
    assert paths.checkpoint("best") == Path("runs/x/checkpoints/best.pt")
    assert paths.config.name == "config.toml" and paths.metrics.name == "metrics.json"
    runs = RunConfig.from_mapping({"out-dir": "", "run-name": "r"})
    assert rundir.run_dir_for(runs) == Path("runs/r")
    out = RunConfig.from_mapping({"out-dir": "/tmp/o", "run-name": "r"})
    assert rundir.run_dir_for(out) == Path("/tmp/o")


# ----------------------------------------------------------------------------- checkpoints


def _cfg(**changes) -> dict:
    return RunConfig.from_mapping({"strategy": "fedavg", **changes}).to_flat()


def _checkpoints(run_dir: Path, cfg: dict) -> Checkpoints:
    """The run's checkpoints as the round loop keeps them (server/loop.py)."""
    run = RunConfig.from_mapping(cfg)
    return Checkpoints(run_dir, run.to_flat(), run.force_resume)


def _initial() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3)}


def _checkpoint(run_dir: Path, cfg: dict, rounds: int = 1) -> Path:
    state = {"run_tag": "t", "round": rounds, "best_round": 1, "best_score": 0.5, "rounds": []}
    return rundir.save_checkpoint(
        RunDir(run_dir).checkpoint("last"), {"w": torch.ones(3)}, state, {}, cfg
    )


class _Planted:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_does_not_run_on_resume(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    last = RunDir(run_dir).checkpoint("last")
    last.parent.mkdir(parents=True)
    torch.save({"arrays": {"w": torch.ones(3)}, "state": _Planted(marker)}, last)
    with pytest.raises(DataError) as err:
        _checkpoints(run_dir, _cfg()).start(_initial(), True)[:2]
    assert "refused" in _one_line_naming(err.value, last)
    assert not marker.exists()
    for load in (rundir.load_checkpoint, rundir.read_checkpoint):  # audit, bench, evaluate
        with pytest.raises(DataError):
            load(last)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = _checkpoint(run_dir, _cfg())
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        _checkpoints(run_dir, _cfg()).start(_initial(), True)[:2]
    assert "truncated" in _one_line_naming(err.value, last)


def test_loop_checkpoints_load_weights_only_and_resume(tmp_path: Path) -> None:
    cfg = _cfg()
    fed = _checkpoints(tmp_path, cfg)
    state, _ = fed.start(_initial(), False)[:2]
    state.round, state.rounds = 2, [{"round": 1, "validation": {"global": {"x": np.float64(1)}}}]
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    fed.save("last", arrays, state, make_strategy(RunConfig.from_mapping(cfg), 1))
    ck = torch.load(RunDir(tmp_path).checkpoint("last"), weights_only=True)
    assert ck["config"] == cfg and ck["state"]["round"] == 2
    again = _checkpoints(tmp_path, dict(cfg, **{"num-server-rounds": 9, "resume": True}))
    resumed, weights = again.start(_initial(), True)[:2]
    assert resumed.round == 2 and resumed.rounds == state.rounds
    np.testing.assert_array_equal(weights["w"].numpy(), np.arange(3, dtype=np.float32))


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


def _reply(values: list[float], n: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(values, np.float32))}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_moments_round_trip_bit_exactly(tmp_path: Path, name: str) -> None:
    """FedAdam/FedYogi moments and FedAvgM momentum: stored as tensors, read weights-only,
    restored with the same dtype and bytes."""
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2]})()
    cfg = _cfg(strategy=name, **{"server-lr": 0.1})
    s1 = make_strategy(RunConfig.from_mapping(cfg), 2)
    start = ArrayRecord({"w": Array(np.array([0.1, -0.2, 0.3], np.float32))})
    list(s1.configure_train(1, start, ConfigRecord(), grid))
    s1.aggregate_train(1, [_reply([1.0, 1.0, 0.5], 5), _reply([1.0, 3.0, -2.0], 7)])
    saved = strategy_state(s1)
    assert saved, name
    path = rundir.save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(3)}, {}, saved, cfg)
    s2 = make_strategy(RunConfig.from_mapping(cfg), 2)
    load_strategy_state(s2, torch.load(path, weights_only=True)["strategy"])
    for attr in ("m_t", "v_t"):
        for k, v in (getattr(s1, attr, None) or {}).items():
            got = np.asarray(getattr(s2, attr)[k])
            assert got.dtype == np.asarray(v).dtype and got.tobytes() == np.asarray(v).tobytes()
    if name == "fedavgm":
        for a, b in zip(s1.momentum_vector, s2.momentum_vector, strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ----------------------------------------------------------------------------- resume config


def test_a_changed_config_is_refused_with_a_one_line_diff(tmp_path: Path) -> None:
    last = _checkpoint(tmp_path, _cfg())
    changed = _cfg(lr=0.01, strategy="fedprox", **{"num-server-rounds": 50, "resume": True})
    with pytest.raises(ConfigError) as err:
        _checkpoints(tmp_path, changed).start(_initial(), True)[:2]
    text = _one_line_naming(err.value, last)
    assert "lr: 0.003 -> 0.01" in text and "strategy: 'fedavg' -> 'fedprox'" in text
    assert "num-server-rounds" not in text  # more rounds: allowed
    assert "--force-resume" in text


def test_the_override_accepts_a_changed_config(tmp_path: Path, caplog) -> None:
    _checkpoint(tmp_path, _cfg(), rounds=3)
    forced = _cfg(lr=0.01, **{"force-resume": True})
    # The ServerApp (or the runner) checks the resume and the loop starts from that check:
    # the warning is said once.
    checked = resume.Resume(resume.resume_checkpoint(tmp_path, forced, force=True))
    state, _ = _checkpoints(tmp_path, forced).start(_initial(), True, checked)[:2]
    assert state.round == 3
    warned = [r for r in caplog.records if "with a changed config" in r.getMessage()]
    assert len(warned) == 1 and "lr: 0.003 -> 0.01" in warned[0].getMessage()


class _NoGrid:
    """A grid that fails the test when used: the ServerApp got past its checks."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the grid was used ({name})")


def test_the_resume_is_checked_once_and_the_loop_starts_from_that_check(
    tmp_path, monkeypatch
) -> None:
    """One check per run: the ServerApp's (or, in a simulation, the runner's, which the
    ServerApp it starts takes), handed to the loop; no memory across calls, so another
    config or a new checkpoint is checked afresh."""
    from flwr.app import Context, RecordDict

    from server.server_app import app_resuming, main

    checked, real = [], resume.check_resume
    monkeypatch.setattr(resume, "check_resume", lambda *a: checked.append(1) or real(*a))
    out = {"out-dir": str(tmp_path)}
    _checkpoint(tmp_path, _cfg(**out), rounds=2)
    cfg = _cfg(resume=True, **out)
    handed = resume.Resume(resume.resume_checkpoint(tmp_path, cfg))
    assert len(checked) == 1 and handed.checkpoint["state"]["round"] == 2
    state, _ = _checkpoints(tmp_path, cfg).start(_initial(), True, handed)[:2]
    assert state.round == 2 and len(checked) == 1  # the loop takes it: not checked again
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with pytest.raises(AssertionError, match="grid was used"):  # past the resume check
        app_resuming(handed)(_NoGrid(), context)
    assert len(checked) == 1  # the runner's check, taken by the ServerApp it starts
    with pytest.raises(AssertionError, match="grid was used"):
        main(_NoGrid(), context)  # flwr run, a deployment: the ServerApp checks, once
    assert len(checked) == 2
    with pytest.raises(ConfigError, match="resume refused"):
        main(_NoGrid(), dataclasses.replace(context, run_config=_cfg(lr=0.01, resume=True, **out)))
    _checkpoint(tmp_path, _cfg(**out), rounds=3)  # the next round's checkpoint
    assert resume.resume_checkpoint(tmp_path, cfg)["state"]["round"] == 3
    assert len(checked) == 4


def test_only_run_length_waiting_and_outputs_may_change() -> None:
    saved = _cfg()
    same = dict(saved, **{"num-server-rounds": 40, "round-timeout": 5.0, "out-dir": "/x"})
    assert resume.config_changes(saved, same) == []
    assert resume.config_changes(saved, dict(saved, seed=1)) == ["seed: 0 -> 1"]
    assert resume.config_changes(saved, dict(saved, extra=1)) == ["extra: (absent) -> 1"]


def test_cli_resume_with_a_changed_config_is_one_error_line(tmp_path: Path, monkeypatch) -> None:
    """`fedskin simulate --resume` refuses before any site starts, and --force-resume
    gets past the check (to the engine, stubbed here)."""
    from simulations import runner
    from simulations.cli import app

    out = tmp_path / "run"
    tiny = "builtin-images=600 image-size=16 num-server-rounds=2"
    cfg = runner.resolve_config(None, tiny)
    cfg["out-dir"] = str(out)
    started = []
    monkeypatch.setattr(runner, "_run_engine", lambda *a, **k: started.append(1) or 1 / 0)
    _checkpoint(out, dict(cfg, lr=0.5))  # written under another lr
    args = ["simulate", "--run-config", tiny, "--out", str(out), "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lr: 0.5 -> 0.003" in lines[0], result.output
    assert not started
    result = CliRunner().invoke(app, [*args, "--force-resume"])
    assert started and isinstance(result.exception, ZeroDivisionError)


# ----------------------------------------------------------------------------- manifest, TOML


def _manifest(n: int = 40) -> pd.DataFrame:
    sites = ["a", "b", "c", "d"]
    return pd.DataFrame(
        {
            "image_id": [f"img{i:03d}" for i in range(n)],
            "group_id": [f"g{i:03d}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "label_name": [CLASSES[i % 2] for i in range(n)],
            "site": [sites[i % 4] for i in range(n)],
            "split": [("train", "validation", "test")[i % 3] for i in range(n)],
        }
    )


def test_a_truncated_derived_manifest_is_refused(tmp_path: Path) -> None:
    path = write_manifest(_manifest(), tmp_path / "m.csv", seal=True)
    assert len(read_manifest(path)) == 40
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:15]))  # whole rows: a valid CSV of 14 rows instead of 40
    with pytest.raises(DataError) as err:
        read_manifest(path)
    text = _one_line_naming(err.value, path)
    assert "truncated" in text and "14 rows" in text and "40" in text


def test_a_manifest_without_a_seal_is_read_as_before(tmp_path: Path) -> None:
    path = write_manifest(_manifest(), tmp_path / "m.csv")
    assert not rundir.seal_path(path).exists()
    assert len(read_manifest(path)) == 40


def test_a_malformed_toml_config_is_one_line_naming_it(tmp_path: Path) -> None:
    from simulations.cli import app
    from simulations.runner import resolve_config

    bad = tmp_path / "exp.toml"
    bad.write_text('strategy = "fedavg"\nlr = \n')
    with pytest.raises(DataError) as err:
        resolve_config(bad)
    _one_line_naming(err.value, bad)
    result = CliRunner().invoke(app, ["simulate", "-c", str(bad)])
    assert result.exit_code == 2 and str(bad) in result.output, result.output
    with pytest.raises(DataError) as err:  # a run directory's config.toml (evaluate, audit)
        rundir.read_toml(bad)
    _one_line_naming(err.value, bad)


# ----------------------------------------------------------------- hostile run folders


def _state(**extra) -> dict:
    return {"run_tag": "t", "round": 1, "best_round": 1, "best_score": 0.5, "rounds": [], **extra}


@pytest.mark.parametrize(
    ("state", "says"),
    [
        (_state(planted=1), "unknown state key 'planted'"),
        (_state(**{"x\n\x1b[2J": 1}), "unknown state key 'x\\n\\x1b[2J'"),
        (_state(round="3"), "state key 'round' holds str, not int"),
        (_state(round=True), "state key 'round' holds bool"),
        (_state(rounds={"a": 1}), "state key 'rounds' holds dict, not list"),
    ],
)
def test_a_checkpoint_with_a_state_the_loop_cannot_take_is_one_line(
    tmp_path: Path, state: dict, says: str
) -> None:
    last = rundir.save_checkpoint(
        RunDir(tmp_path).checkpoint("last"), {"w": torch.ones(3)}, state, {}, _cfg()
    )
    for load in (rundir.load_checkpoint, lambda _: resume.resume_checkpoint(tmp_path, _cfg())):
        with pytest.raises(DataError) as err:
            load(last)
        text = _one_line_naming(err.value, last)
        assert says in text and "refused" in text, text
    with pytest.raises(DataError) as err:  # what the loop does on resume: no TypeError
        _checkpoints(tmp_path, _cfg()).start(_initial(), True)[:2]
    assert says in _one_line_naming(err.value, last)


def test_a_state_missing_a_required_key_is_refused_on_resume_only(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if k != "run_tag"}
    last = rundir.save_checkpoint(
        RunDir(tmp_path).checkpoint("last"), {"w": torch.ones(3)}, state, {}, _cfg()
    )
    assert rundir.load_checkpoint(last)["state"]["round"] == 1  # audit, evaluate: fine
    with pytest.raises(DataError) as err:
        resume.resume_checkpoint(tmp_path, _cfg())
    assert "state key 'run_tag' is missing" in _one_line_naming(err.value, last)
    fields, required = rundir.state_fields()  # type: ignore[misc]
    assert required == {"run_tag"} and {"round", "best_score", "rounds"} <= set(fields)


def test_checkpoints_are_not_written_through_a_symlinked_folder(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    ckpt = RunDir(run).checkpoint("last")
    with pytest.raises(DataError) as err:
        rundir.save_checkpoint(ckpt, {"w": torch.ones(3)}, _state(), {}, _cfg())
    text = _one_line_naming(err.value, run / "checkpoints")
    assert text.startswith("refusing to write through a symbolic link: ")
    assert not list(elsewhere.iterdir())
    with pytest.raises(DataError, match="symbolic link"):  # the loop's own save
        fed = _checkpoints(run, _cfg())
        state, arrays = fed.start(_initial(), False)[:2]
        fed.save("last", arrays, state, make_strategy(RunConfig.from_mapping(_cfg()), 1))
    assert not list(elsewhere.iterdir())


def test_a_symlinked_target_file_is_refused_not_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    target = tmp_path / "victim.pt"
    target.write_bytes(b"precious")
    ckpt = RunDir(run).checkpoint("best")
    ckpt.parent.mkdir(parents=True)
    ckpt.symlink_to(target)
    with pytest.raises(DataError) as err:
        rundir.save_checkpoint(ckpt, {"w": torch.ones(3)}, _state(), {}, _cfg())
    assert "symbolic link" in _one_line_naming(err.value, ckpt)
    assert target.read_bytes() == b"precious" and ckpt.is_symlink()
    (run / "metrics.json").symlink_to(target)
    with pytest.raises(DataError, match=r"^refusing to write through a symbolic link: .*metrics"):
        rundir.atomic_write_json(run / "metrics.json", {"x": 1})
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt"]  # no temp


def test_run_subfolders_are_guarded_other_folders_are_the_users(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    rundir.atomic_write_text(RunDir(run).config, "seed = 0\n")  # a run folder
    for sub in ("site-state", "external"):
        (run / sub).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match=r"symbolic link: .*site-state$"):
        atomic_write(RunDir(run).site_state / "alpha.json", "{}")
    with pytest.raises(DataError, match=r"symbolic link: .*external$"):
        atomic_write(RunDir(run).external("isic") / "metrics.json", "{}")
    assert not list(elsewhere.iterdir())
    # A folder above the run folder, or a run folder the user linked, is followed as before.
    (tmp_path / "runs").symlink_to(run, target_is_directory=True)
    atomic_write_text(tmp_path / "runs" / "history.csv", "round\n")
    assert (run / "history.csv").read_text() == "round\n"
    user = tmp_path / "data" / "external"  # an "external" folder outside any run folder
    user.parent.mkdir()
    user.symlink_to(elsewhere, target_is_directory=True)
    atomic_write_text(user / "notes" / "a.txt", "ok")
    assert (elsewhere / "notes" / "a.txt").read_text() == "ok"


def test_atomic_write_with_a_root_refuses_a_link_anywhere_below_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(DataError, match=r"symbolic link: .*/b$"):
        atomic_write(tmp_path / "b" / "c" / "f.txt", "x", root=tmp_path)
    assert not (tmp_path / "a" / "c").exists()
    atomic_write(tmp_path / "a" / "c" / "f.txt", "x", root=tmp_path)
    with pytest.raises(ValueError, match="is not inside"):
        atomic_write(tmp_path.parent / "f.txt", "x", root=tmp_path)


# ----------------------------------------------------------- the seal travels with the run


def _sealed_run(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A derived (sealed) manifest and a run that trained one round on it."""
    manifest = write_manifest(_manifest(), tmp_path / "cache" / "m.csv", seal=True)
    cfg = _cfg(manifest=str(manifest))
    run = tmp_path / "run"
    rundir.atomic_copy(manifest, RunDir(run).manifest)  # as the runner does
    _checkpoint(run, cfg)
    return manifest, run, cfg


def _relabel(manifest: Path) -> None:
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df["label"] = df["label"].map({"0": "1", "1": "0"})
    df["label_name"] = df["label"].map({"0": CLASSES[0], "1": CLASSES[1]})
    manifest.write_text(df.to_csv(index=False, lineterminator="\n"))


def test_a_relabelled_manifest_without_its_seal_is_refused_on_resume(tmp_path: Path) -> None:
    manifest, run, cfg = _sealed_run(tmp_path)
    ck = torch.load(RunDir(run).checkpoint("last"), weights_only=True)
    assert ck["manifest"] == {"path": str(manifest), "sha256": rundir.file_sha256(manifest)}
    assert resume.resume_checkpoint(run, cfg) is not None  # unchanged: resumes
    _relabel(manifest)
    rundir.seal_path(manifest).unlink()  # the seal deleted: the file alone passes
    assert len(read_manifest(manifest)) == 40
    for force in (False, True):  # force-resume is for config changes, not the data
        with pytest.raises(DataError) as err:
            resume.resume_checkpoint(run, cfg, force=force)
        text = _one_line_naming(err.value, manifest)
        assert "changed since the run trained on it" in text and "new run" in text
    with pytest.raises(DataError, match="changed since the run trained on it"):
        _checkpoints(run, dict(cfg, resume=True)).start(_initial(), True)[:2]


def test_a_rewritten_seal_does_not_help_either(tmp_path: Path) -> None:
    manifest, run, cfg = _sealed_run(tmp_path)
    _relabel(manifest)
    text = manifest.read_text()
    rows = len(text.splitlines()) - 1
    rundir.atomic_write_json(
        rundir.seal_path(manifest), rundir.manifest_seal(text, rows, 4), indent=1
    )
    assert len(read_manifest(manifest)) == 40  # the seal matches the relabelled file
    with pytest.raises(DataError, match="changed since the run trained on it"):
        resume.resume_checkpoint(run, cfg)


def test_an_older_checkpoint_is_checked_against_the_run_folders_copy(tmp_path: Path) -> None:
    manifest, run, cfg = _sealed_run(tmp_path)
    last = RunDir(run).checkpoint("last")
    ck = torch.load(last, weights_only=True)
    del ck["manifest"]  # written before checkpoints recorded the manifest
    torch.save(ck, last)
    assert resume.resume_checkpoint(run, cfg) is not None
    _relabel(manifest)
    rundir.seal_path(manifest).unlink()
    with pytest.raises(DataError, match="changed since the run trained on it"):
        resume.resume_checkpoint(run, cfg)


def test_hand_written_manifests_still_start_new_runs(tmp_path: Path) -> None:
    """No run knows it yet, no seal: accepted; a run on another manifest file is a config
    change (refused by check_resume unless forced), not a changed manifest."""
    manifest, run, cfg = _sealed_run(tmp_path)
    hand = write_manifest(_manifest(), tmp_path / "hand.csv")
    _relabel(hand)
    assert len(read_manifest(hand)) == 40
    rundir.check_seal(hand, 40, 4)
    other = dict(cfg, manifest=str(hand))
    with pytest.raises(ConfigError, match="manifest"):
        resume.resume_checkpoint(run, other)
    assert resume.resume_checkpoint(run, other, force=True) is not None
    with pytest.raises(DataError, match="changed since the run trained on it"):
        rundir.check_seal(hand, None, None, known_sha256=rundir.file_sha256(manifest))
