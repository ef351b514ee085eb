"""Pretrained backbones: only the server loads them; `fedskin weights save`; offline hub."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import client.task
from client.task import model_for
from common.config import RunConfig
from common.models import build_model, get_weights
from common.wire import pack
from server.server_app import initial_model
from simulations.cli import app

HEAD = ("classifier.weight", "classifier.bias")  # test_efficientnet's head


def _source(seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=1000).state_dict()


@pytest.fixture(params=[".pth", ".safetensors"])
def weights_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict]:
    state = _source()
    path = tmp_path / f"effnet{request.param}"
    if request.param == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def _assert_backbone_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for key, value in ref.items():
        if key in HEAD:
            assert got[key].shape != value.shape  # fresh 7-class head
        else:
            assert torch.equal(got[key], value), key


def test_build_model_loads_file_backbone(weights_file: tuple[Path, dict]) -> None:
    path, ref = weights_file
    _assert_backbone_equal(
        build_model("test_efficientnet", 7, pretrained=str(path)).state_dict(), ref
    )


def test_initial_global_model_carries_pretrained(weights_file: tuple[Path, dict]) -> None:
    path, ref = weights_file
    cfg = {"model": "test_efficientnet", "seed": 0, "pretrained": str(path)}
    _assert_backbone_equal(get_weights(initial_model(RunConfig.from_mapping(cfg), 7)), ref)
    # under DP the BN affine parameters carry over into GroupNorm, running stats do not
    dp = get_weights(initial_model(RunConfig.from_mapping({**cfg, "dp": True}), 7))
    assert torch.equal(dp["bn1.weight"], ref["bn1.weight"])
    assert "bn1.running_mean" not in dp


def test_sites_never_read_the_pretrained_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client.task, "_MODELS", {})  # really build the site's model here
    path = tmp_path / "server_only.pth"
    torch.save(_source(), path)
    cfg = {"model": "test_efficientnet", "seed": 0, "pretrained": str(path)}
    run = RunConfig.from_mapping(cfg)
    glob = get_weights(initial_model(run, 7))
    path.unlink()  # a site has no such file
    model, _ = model_for(run, 7, pack(glob))
    for key, value in get_weights(model).items():
        assert torch.equal(value, glob[key]), key


def test_weights_save_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src.pth"
    state = _source(7)
    torch.save({"state_dict": state}, src)  # a wrapped checkpoint, as training scripts write
    out = tmp_path / "x.safetensors"
    args = ["weights", "save", "test_efficientnet", "--source", str(src), "--out", str(out)]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"wrote {len(state)} tensors" in res.output and str(out) in res.output
    saved = load_file(str(out))
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    _assert_backbone_equal(
        build_model("test_efficientnet", 7, pretrained=str(out)).state_dict(), state
    )


def test_hub_offline_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # offline mode and an empty cache: huggingface_hub refuses at once, no network touched
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="fedskin weights save test_resnet") as err:
        build_model("test_resnet", 3, pretrained="hub")
    assert "\n" not in str(err.value) and "pretrained=FILE" in str(err.value)
    out = tmp_path / "w.pth"
    res = CliRunner().invoke(
        app, ["weights", "save", "test_resnet", "--out", str(out)], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2
    assert "could not download" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_model_refused(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["weights", "save", "vit_huge", "--out", str(tmp_path / "w.pth")],
        env={"COLUMNS": "300"},
    )
    assert res.exit_code == 2
    assert "unknown model 'vit_huge'" in res.output and "efficientnet_b0" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_simulate_names_a_missing_weights_file_in_one_line(tmp_path) -> None:
    """`fedskin simulate` refuses a missing pretrained file before any data or Ray work."""
    from typer.testing import CliRunner

    from simulations.cli import app

    missing = tmp_path / "nope.safetensors"
    result = CliRunner().invoke(app, ["simulate", "--run-config", f"pretrained='{missing}'"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.safetensors" in lines[0] and "Traceback" not in result.output
