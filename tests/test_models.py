"""Backbones: build/forward, DP surgery, weight exchange, local pretrained weights."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from timm.layers import BatchNormAct2d, GroupNormAct
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from common.models import (
    SUPPORTED_MODELS,
    DPBasicBlock,
    DPBottleneck,
    build_model,
    get_weights,
    make_dp_compatible,
    set_weights,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The CI box is small and shared: 1 intra-op thread is much faster than 2 contended."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_every_model_builds_and_forwards_plain_and_dp(name: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    plain = build_model(name, 5)
    dp = build_model(name, 5, dp=True)
    for model in (plain, dp):
        model.eval()
        with torch.no_grad():
            assert model(x).shape == (2, 5)
    assert ModuleValidator.validate(dp.train(), strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp.modules())
    assert not any(getattr(m, "inplace", False) is True for m in dp.modules())


def test_unknown_model_lists_supported() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vit_huge", 3)


def test_batchnormact_becomes_groupnormact_with_same_activation() -> None:
    plain = timm.create_model("test_efficientnet", num_classes=3)
    dp = make_dp_compatible(copy.deepcopy(plain))
    dp_modules = dict(dp.named_modules())
    n = 0
    for name, m in plain.named_modules():
        if isinstance(m, BatchNormAct2d):
            gn = dp_modules[name]
            assert isinstance(gn, GroupNormAct) and gn.num_channels == m.num_features
            assert type(gn.act) is type(m.act) and type(gn.drop) is type(m.drop)
            assert torch.equal(gn.weight, m.weight)
            n += 1
    assert n > 5
    # the activation survives: SiLU somewhere inside a norm layer, not dropped as fix() does
    assert any(isinstance(getattr(m, "act", None), nn.SiLU) for m in dp.modules())


@pytest.mark.parametrize(
    ("cls", "dp_cls"), [(BasicBlock, DPBasicBlock), (Bottleneck, DPBottleneck)]
)
def test_out_of_place_resnet_blocks_compute_the_same(cls: type, dp_cls: type) -> None:
    planes = 8
    down = nn.Conv2d(16, planes * cls.expansion, 1)
    block = cls(16, planes, downsample=down).eval()
    twin = copy.deepcopy(block)
    twin.__class__ = dp_cls
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), twin(x))
    # Opacus-style full backward hook on the last norm before the residual add: timm's
    # in-place "x += shortcut" breaks autograd, the out-of-place twin does not
    last_bn = "bn3" if cls is Bottleneck else "bn2"
    for m in (block, twin):
        getattr(m, last_bn).register_full_backward_hook(lambda *a: None)
        m.train()
    with pytest.raises(RuntimeError, match="inplace|in-place"):
        block(x.clone().requires_grad_()).sum().backward()
    twin(x.clone().requires_grad_()).sum().backward()


def test_unknown_inplace_block_is_refused() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            x += y
            return x

    with pytest.raises(NotImplementedError, match="Bad"):
        make_dp_compatible(nn.Sequential(Bad()))


def test_weights_roundtrip_with_numpy_and_strict_errors() -> None:
    a = build_model("test_resnet", 4)
    b = build_model("test_resnet", 4)
    w = get_weights(a)
    assert any("running_mean" in k for k in w)  # buffers included
    assert all(v.device.type == "cpu" for v in w.values())
    set_weights(b, {k: v.numpy() for k, v in w.items()})
    for k, v in get_weights(b).items():
        assert torch.equal(v, w[k]), k
    bad = dict(w)
    key = "fc.weight"
    bad[key] = torch.zeros(3, bad[key].shape[1])
    with pytest.raises(ValueError, match="fc.weight"):
        set_weights(b, bad)
    with pytest.raises(ValueError, match="missing"):
        set_weights(b, {k: v for k, v in w.items() if k != key})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_pretrained_file_loads_backbone_and_drops_head(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        save_file(source.state_dict(), str(path))
    model = build_model("test_resnet", 3, pretrained=str(path))
    ref = source.state_dict()
    got = model.state_dict()
    assert torch.equal(got["conv1.0.weight"], ref["conv1.0.weight"])
    assert got["fc.weight"].shape == (3, ref["fc.weight"].shape[1])
    # DP build: BN affine parameters carry over into the GroupNorm layers
    dp = build_model("test_resnet", 3, pretrained=str(path), dp=True)
    assert torch.equal(dp.state_dict()["bn1.weight"], ref["bn1.weight"])


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_model("test_resnet", 3, pretrained=str(tmp_path / "nope.pth"))
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=3).state_dict(), other)
    with pytest.raises(ValueError, match="wrong architecture"):
        build_model("test_resnet", 3, pretrained=str(other))


def test_cache_mode_uses_local_hub_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # empty caches: random init, nothing downloaded (the box has no internet anyway)
    model = build_model("test_resnet", 3, pretrained="cache")
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # a cached snapshot in the standard HF layout is found and loaded
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), str(snap / "model.safetensors"))
    model = build_model("test_resnet", 3, pretrained="cache")
    np.testing.assert_array_equal(
        model.state_dict()["conv1.0.weight"].numpy(), source.state_dict()["conv1.0.weight"].numpy()
    )
