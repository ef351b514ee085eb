"""Backbones (timm), weight exchange with Flower, and the DP-compatible model surgery.

Pretrained weights come from a local file, from the local Hugging Face / torch hub caches
(``"cache"``) or, only with ``"hub"``, from timm's download. Only the server (the initial
global model) and the centralised baselines load them: the sites receive them in round 1.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import timm
import torch
from timm.layers import BatchNormAct2d, GroupNormAct
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from common.config import RunConfig

log = logging.getLogger(__name__)

SUPPORTED_MODELS: list[str] = [
    "efficientnet_b0",
    "resnet18",
    "resnet50",
    "mobilenetv3_small_100",
    "convnext_atto",
    "regnetx_002",
    "test_efficientnet",
    "test_resnet",
]


# ----------------------------------------------------------------------------- build


def model_for_run(run: RunConfig, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The run's backbone, GroupNorm instead of BatchNorm under either kind of DP.

    Sample-level DP needs it for Opacus; site-level DP adds noise to every tensor the sites
    send, and noised BatchNorm running variances go negative (NaN predictions).
    ``pretrained=False`` builds the architecture only (the run's ``pretrained`` key is not
    read): for sites and evaluation, whose weights all arrive from the server or a checkpoint.
    """
    source = run.pretrained if pretrained else ""
    return build_model(run.model, num_classes, pretrained=source, dp=run.private)


def build_model(
    name: str, num_classes: int, *, pretrained: str = "", dp: bool = False
) -> nn.Module:
    """Create a timm backbone with a fresh ``num_classes`` head.

    ``pretrained`` is a local ``.pth``/``.safetensors``/``.bin`` file, ``"cache"`` (use the
    local hub cache if it holds the weights), ``"hub"`` (timm's download; needs internet) or
    ``""`` (random init). With ``dp=True`` the model is made Opacus-compatible *before* the
    weights are loaded, so affine norm parameters carry over from BatchNorm to GroupNorm while
    BN running statistics are ignored.
    """
    _check_name(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if dp:
        model = make_dp_compatible(model)
    if not pretrained:
        log.info("%s: random init (no pretrained weights given)", name)
        return model
    state = pretrained_state(name, pretrained)
    if state is None:
        log.info("no cached pretrained weights for %s: random init (nothing downloaded)", name)
    else:
        load_pretrained(model, state, label=pretrained)
    return model


def _check_name(name: str) -> None:
    if name not in SUPPORTED_MODELS:
        raise ValueError(f"unknown model {name!r}; supported: {', '.join(SUPPORTED_MODELS)}")


def pretrained_state(name: str, source: str) -> dict[str, torch.Tensor] | None:
    """The tensors of ``source`` for model ``name``: ``"hub"``, ``"cache"`` or a local file.

    None when ``"cache"`` finds nothing in the local caches (nothing is downloaded then).
    """
    if source == "hub":
        return _hub_state(name)
    if source == "cache":
        cached = _cached_weights(name)
        return None if cached is None else _read_state(cached)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    return _read_state(path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict (.safetensors by extension, else torch; EMA preferred)."""
    return timm.models.load_state_dict(str(path), use_ema=True, device="cpu")


def _hub_state(name: str) -> dict[str, torch.Tensor]:
    """timm's own pretrained weights for ``name`` (its HF hub / URL download, cache first).

    Any failure (no network, offline mode, missing file) becomes one line saying what to do.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"timm has no pretrained weights for {name}")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as err:  # any download failure gets the same advice
        raise ValueError(
            f"could not download timm's pretrained weights for {name} "
            f"({type(err).__name__}); on a machine with internet run `fedskin weights save "
            f"{name} --source hub --out {name}.safetensors`, copy the file here and use "
            f"pretrained=FILE"
        ) from None


def _cached_weights(name: str) -> Path | None:
    """Locate this model's default pretrained file in the local HF or torch hub cache only."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    label: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load matching tensors from a checkpoint file or state_dict; returns those loaded.

    The classifier (shape mismatch) is skipped. Raises ValueError when almost nothing
    matches, which means the weights are for another architecture: silently training from
    scratch would be a nasty surprise.
    """
    if isinstance(source, (str, Path)):
        label = label or str(source)
        state: Mapping[str, torch.Tensor] = _read_state(Path(source))
    else:
        state = source
    label = label or "state_dict"
    own = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if key in own and tuple(own[key].shape) == tuple(value.shape):
            keep[key] = value
        elif key in own:
            skipped.append(key)
    n_params = sum(1 for k, _ in model.named_parameters())
    n_loaded_params = sum(1 for k, _ in model.named_parameters() if k in keep)
    if n_loaded_params < 0.5 * n_params:
        raise ValueError(
            f"{label}: only {n_loaded_params}/{n_params} parameters match this model "
            f"({type(model).__name__}); wrong architecture?"
        )
    model.load_state_dict(keep, strict=False)
    log.info(
        "loaded %d/%d tensors from %s (skipped shape mismatches: %s)",
        len(keep),
        len(own),
        label,
        ", ".join(skipped) or "none",
    )
    return keep


def export_weights(name: str, source: str, out: str | Path) -> int:
    """Save model ``name``'s pretrained weights from ``source`` (hub, cache or a file) to
    ``out`` as a timm state_dict (.safetensors, else torch .pth/.pt/.bin); returns the count.

    The weights are checked against the architecture (its default head) first; a file's
    tensors that do not fit (another head) are left out.
    """
    _check_name(name)
    out = Path(out).expanduser()
    if out.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"{out}: use a .safetensors, .pth, .pt or .bin file name")
    state = pretrained_state(name, source)
    if state is None:
        raise ValueError(
            f"no weights for {name} in the local Hugging Face / torch hub caches; "
            "use --source hub on a machine with internet"
        )
    kept = load_pretrained(timm.create_model(name, pretrained=False), state, label=source)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in kept.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out))
    else:
        torch.save(tensors, out)
    return len(tensors)


# ----------------------------------------------------------------------------- weights


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state_dict (parameters and buffers) as detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Load a full state_dict, refusing missing/extra keys or any shape mismatch by name."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(
            f"state does not match model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}"
        )
    new: dict[str, torch.Tensor] = {}
    for key, ref in own.items():
        value = state[key]
        tensor = torch.from_numpy(np.asarray(value)) if not torch.is_tensor(value) else value
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: got {tuple(tensor.shape)}, "
                f"model expects {tuple(ref.shape)}"
            )
        new[key] = tensor.to(dtype=ref.dtype)
    model.load_state_dict(new, strict=True)


# ----------------------------------------------------------------------------- DP surgery


class DPBasicBlock(BasicBlock):
    """timm ResNet BasicBlock with the residual add done out of place.

    timm's ``x += shortcut`` modifies the output of the preceding module in place, which
    Opacus' full backward hooks forbid. Swapping ``__class__`` (not monkeypatching an
    instance ``forward``) keeps the module picklable, deep-copyable and the state_dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(self.aa(x)))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class DPBottleneck(Bottleneck):
    """timm ResNet Bottleneck with the residual add done out of place (see DPBasicBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


_OUT_OF_PLACE: dict[type[nn.Module], type[nn.Module]] = {
    BasicBlock: DPBasicBlock,
    Bottleneck: DPBottleneck,
}
# In-place tensor updates in a forward() ("x += y", "x.add_(y)"); integer counters excluded.
_INPLACE_RE = re.compile(r"^\s*x\s*[-+*/]=|\.(add|mul|sub|div|clamp)_\(", re.MULTILINE)


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    """GroupNorm with gcd(32, C) groups (Opacus' choice; always divides C), affine copied."""
    num_channels = bn.num_features
    groups = math.gcd(32, num_channels)
    if isinstance(bn, BatchNormAct2d):
        gn: nn.GroupNorm = GroupNormAct(
            num_channels, num_groups=groups, eps=bn.eps, affine=bn.affine, apply_act=False
        )
        gn.act = bn.act  # keep the very same activation / drop modules
        gn.drop = bn.drop
    else:
        gn = nn.GroupNorm(groups, num_channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def _inplace_offenders(model: nn.Module) -> list[str]:
    """Module classes whose forward() source still updates a tensor in place."""
    bad: set[str] = set()
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch.") or "forward" not in cls.__dict__:
            continue
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if _INPLACE_RE.search(src):
            bad.add(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(bad)


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Make a timm model trainable with Opacus per-sample gradients, in place.

    * every BatchNorm (incl. timm's ``BatchNormAct2d``, which ``ModuleValidator.fix`` would
      turn into a bare GroupNorm, dropping its activation) becomes GroupNorm(+act);
    * every ``inplace`` flag is cleared and ResNet blocks' ``x += shortcut`` is made out of
      place, because Opacus' backward hooks fail on outputs modified in place;
    * a source check refuses unknown blocks that still update tensors in place, so a timm
      upgrade fails loudly here instead of deep inside a backward pass.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _group_norm_for(module))
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
        new_cls = _OUT_OF_PLACE.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    offenders = _inplace_offenders(model)
    if offenders:
        raise NotImplementedError(
            f"blocks with in-place tensor updates break Opacus hooks: {offenders}; "
            "add an out-of-place subclass in common/models.py"
        )
    from opacus.validators import ModuleValidator  # only DP models: ~0.8 CPU-s to import

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        model = ModuleValidator.fix(model)
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model still not Opacus-compatible: {errors}")
    return model
