"""Sample-level differential privacy at a site (DP-SGD with Opacus), accounted over rounds.

A :class:`DPSession` lives at a site for the whole federated run. It calibrates the noise
once, for the *whole planned* training (``total_rounds * steps_per_round`` Poisson-sampled
steps), and keeps the RDP accountant history across rounds, so ``epsilon()`` after round r
covers rounds 1..r. (Re-creating a PrivacyEngine per round, as Flower's Opacus example does,
reports a per-round epsilon and under-states the real cumulative privacy loss.)

Training itself (``common.train.train_local(..., dp=session)``) uses Opacus' building blocks
directly: a GradSampleModule for per-sample gradients, a DPOptimizer for clipping + noise, and
logical Poisson batches split into physical chunks the way Opacus' BatchMemoryManager does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule, wrap_model
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from common.config import RunConfig, value_of
from common.data.schema import default_home
from common.errors import ConfigError
from common.fileio import atomic_write_text

log = logging.getLogger(__name__)
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)  # Opacus' RDP orders, as its accountant uses

# What "auto" picks, per backbone family. Measured on the CPU (1 thread, process CPU time,
# torch 2.14 / opacus 1.6, dp=True models, 16 images of 32 px, logical = physical batch 16,
# min over repeats), seconds per DP-SGD step:
#   efficientnet_b0        hooks 7.805  functorch 0.831
#   mobilenetv3_small_100  hooks 1.245  functorch 0.378
#   resnet18               hooks 1.470  functorch 2.488
#   convnext_atto          hooks 0.582  functorch 0.586
#   test_efficientnet      hooks 0.104  functorch 0.135  ghost 0.132
#   test_resnet            hooks 0.102  functorch 0.180  ghost 0.110
# Opacus' closed-form conv grad sampler ("hooks") unfolds the input, which is very slow for
# the many depthwise convolutions of EfficientNet/MobileNet: functorch wins there by 3-9x
# (test_efficientnet is too small to show it; the family rule follows the real models).
# ResNet (dense convs) is fastest with hooks; ConvNeXt is a tie. Ghost clipping trades a
# second backward pass for memory: worth choosing explicitly for large batches on a GPU.
AUTO_MODE_BY_FAMILY = {"EfficientNet": "functorch", "MobileNetV3": "functorch"}
AUTO_MODE = "hooks"


_RUN = RunConfig.defaults()  # the schema's defaults: the one place a default is written


@dataclass
class DPConfig:
    """Sample-level DP settings, one per experiment (kebab-case keys in the run config)."""

    target_epsilon: float = _RUN.target_epsilon  # <= 0: no budget (explicit noise_multiplier)
    target_delta: float = _RUN.target_delta  # 0 -> 1 / (10 * n_train), i.e. well below 1 / N
    noise_multiplier: float = _RUN.noise_multiplier  # > 0 overrides target_epsilon
    max_grad_norm: float = _RUN.max_grad_norm
    physical_batch: int = _RUN.dp_physical_batch
    grad_sample_mode: str = _RUN.grad_sample_mode
    total_rounds: int = 1  # planned rounds: the noise is calibrated for all of them
    head_share: float = 0.0  # > 0: this part of target_epsilon is kept for the LDA statistics

    def __post_init__(self) -> None:
        """The run-config keys' own rules (the schema's), then what only this view adds: an
        explicit noise multiplier in place of a budget, and no head share without one."""
        value_of({"grad-sample-mode": self.grad_sample_mode}, "grad-sample-mode")
        value_of({"max-grad-norm": self.max_grad_norm}, "max-grad-norm")
        value_of({"dp-physical-batch": self.physical_batch}, "dp-physical-batch")
        value_of({"num-server-rounds": self.total_rounds}, "num-server-rounds")
        if self.noise_multiplier <= 0 and self.target_epsilon <= 0:
            raise ConfigError("set target-epsilon > 0 or an explicit noise-multiplier > 0")
        if not 0 <= self.head_share < 1 or (self.head_share > 0 and self.noise_multiplier > 0):
            raise ConfigError("dp-head-share must be in [0, 1) and needs target-epsilon")

    @classmethod
    def from_run(cls, run: RunConfig) -> DPConfig:
        """The DP view of the typed run config (its noise is planned for every round)."""
        return cls(
            target_epsilon=run.target_epsilon,
            target_delta=run.target_delta,
            noise_multiplier=run.noise_multiplier,
            max_grad_norm=run.max_grad_norm,
            physical_batch=run.dp_physical_batch,
            grad_sample_mode=run.grad_sample_mode,
            total_rounds=run.num_server_rounds,
            head_share=run.dp_head_share if run.head_calibration == "lda" else 0.0,
        )


def remembered_calibration(
    history_of: Callable[..., list[tuple[float, float, int]]],
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """A noise calibration computed once per argument tuple on this machine: kept in memory
    and as a small file under ``FEDSKIN_HOME/dp-calibration/`` (a bisection over RDP costs
    2-3 CPU-s, and every simulated site, sweep cell and seed repeats the same ones).

    A kept value is used only if it is a positive finite number whose accountant entries
    (``history_of(*args, sigma)``) reach at most the target epsilon (``args[0]``), checked
    with one RDP evaluation: a file that would weaken the guarantee is ignored and
    replaced. The value is the one the calibration returned (JSON keeps a float exactly)."""

    def wrap(calibrate: Callable[..., float]) -> Callable[..., float]:
        @functools.lru_cache(maxsize=256)
        @functools.wraps(calibrate)
        def remembered(*args: float) -> float:
            key = hashlib.sha256(repr((calibrate.__name__, args)).encode()).hexdigest()[:24]
            path = default_home() / "dp-calibration" / f"{key}.json"
            kept = _kept_sigma(path, args)
            if kept is not None and rdp_epsilon(history_of(*args, kept), args[1]) <= args[0]:
                return kept
            sigma = calibrate(*args)
            with contextlib.suppress(OSError):  # a cache: a read-only home only costs time
                atomic_write_text(path, json.dumps({"args": list(args), "sigma": sigma}))
            return sigma

        return remembered

    return wrap


def _kept_sigma(path: Path, args: tuple[float, ...]) -> float | None:
    try:
        saved = json.loads(path.read_text())
        sigma = float(saved["sigma"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = saved.get("args") == list(args) and math.isfinite(sigma) and sigma > 0
    return sigma if ok else None


@remembered_calibration(lambda eps, delta, q, steps, sigma: [(sigma, q, steps)])
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Noise multiplier reaching ``target_epsilon`` after ``steps`` (Opacus' bisection)."""
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
    )


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of RDP accountant entries ``(noise, sample rate, steps)``: what
    Opacus' ``RDPAccountant.get_epsilon`` computes (its orders, its sum of ``steps`` times
    one step's RDP per entry, the same floats), with one step's RDP computed once per
    ``(noise, sample rate)``: a site's history grows by an entry a round, and each costs
    ~0.15 CPU-s afresh, so reporting ε every round was quadratic in the rounds."""
    if not history:
        return 0.0
    rdp = sum(unit_rdp(float(noise), float(q)) * steps for noise, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def unit_rdp(noise: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at Opacus' default orders (read-only: shared by every caller)."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise, steps=1, orders=list(RDP_ORDERS)
    )
    rdp.setflags(write=False)
    return rdp


@remembered_calibration(
    lambda eps, delta, q, steps, head, sigma: [(sigma, q, steps), (head, 1.0, 1)]
)
def _calibrate_with_head(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, head_noise: float
) -> float:
    """DP-SGD's noise multiplier such that its ``steps`` and one release of the feature
    statistics (a Gaussian mechanism at ``head_noise``, sampling rate 1) compose, under RDP,
    to ``target_epsilon``: bisection, as Opacus' get_noise_multiplier does for DP-SGD alone."""
    head = (head_noise, 1.0, 1)

    def eps(sigma: float) -> float:
        return rdp_epsilon([(sigma, sample_rate, steps), head], delta)

    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ValueError(f"target-epsilon={target_epsilon}: too small to train at all")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if mid > 0 and eps(mid) <= target_epsilon else (mid, high)
    return high


class DPSession:
    """Noise calibration + cumulative RDP accounting for one site across rounds."""

    def __init__(
        self,
        cfg: DPConfig,
        n_train: int,
        batch_size: int,
        steps_per_round: int,
        state: str | None = None,
        *,
        secure: bool = False,
    ) -> None:
        if n_train < 1 or batch_size < 1 or steps_per_round < 1:
            raise ValueError(
                f"DP needs n_train, batch_size, steps_per_round >= 1, got "
                f"{n_train}, {batch_size}, {steps_per_round}"
            )
        self.cfg = cfg
        self.n_train = int(n_train)
        self.batch_size = int(batch_size)
        self.steps_per_round = int(steps_per_round)
        # A deployed site draws its batches and noise from OS entropy: seeded from the run
        # config (which the server writes), they could be replayed and the noise removed.
        # Simulations stay seeded (reproducible), as Opacus without secure_mode.
        self.secure = bool(secure)
        self.sample_rate = min(1.0, batch_size / n_train)
        self.delta = cfg.target_delta if cfg.target_delta > 0 else 1.0 / (10 * n_train)
        self.accountant = RDPAccountant()
        # The one release of the LDA statistics (client/headstats.py: private_stats), at its own
        # noise: its budget is set aside from the start, so DP-SGD can never spend it.
        self.head_noise = 0.0
        self.head_released = False
        if state is not None:
            saved = json.loads(state)
            if abs(saved["sample_rate"] - self.sample_rate) > 1e-12:
                raise ValueError(
                    f"saved DP state has sample rate {saved['sample_rate']} but this site now "
                    f"has {self.sample_rate} (n_train or batch size changed): accounting "
                    "would be wrong"
                )
            self.noise_multiplier = float(saved["noise_multiplier"])
            self.accountant.history = [tuple(h) for h in saved["history"]]
            self.head_noise = float(saved.get("head_noise", 0.0))
            self.head_released = bool(saved.get("head_released", False))
        elif cfg.noise_multiplier > 0:
            self.noise_multiplier = float(cfg.noise_multiplier)
        elif cfg.head_share > 0:
            self.head_noise = calibrate_noise_multiplier(
                cfg.target_epsilon * cfg.head_share, self.delta, 1.0, 1
            )
            self.noise_multiplier = _calibrate_with_head(
                cfg.target_epsilon,
                self.delta,
                self.sample_rate,
                cfg.total_rounds * steps_per_round,
                self.head_noise,
            )
        else:
            self.noise_multiplier = calibrate_noise_multiplier(
                cfg.target_epsilon, self.delta, self.sample_rate, cfg.total_rounds * steps_per_round
            )
        log.info(
            "DP: noise multiplier %.4f, q=%.4g, delta=%.3g, %d steps/round, %d planned rounds",
            self.noise_multiplier,
            self.sample_rate,
            self.delta,
            self.steps_per_round,
            cfg.total_rounds,
        )

    # ------------------------------------------------------------------ accounting
    def _head(self, planned: bool) -> list[tuple[float, float, int]]:
        """The statistics' release as an accountant entry: once made, or (``planned``) while
        its budget is still set aside."""
        if self.head_noise > 0 and (self.head_released or planned):
            return [(self.head_noise, 1.0, 1)]
        return []

    def epsilon(self) -> float:
        """Cumulative epsilon (at ``self.delta``) of all steps and releases so far."""
        return rdp_epsilon([*self.accountant.history, *self._head(False)], self.delta)

    def epsilon_after_next_round(self) -> float:
        """Epsilon after one more round, with the statistics' budget still set aside."""
        step = (self.noise_multiplier, self.sample_rate, self.steps_per_round)
        return rdp_epsilon([*self.accountant.history, step, *self._head(True)], self.delta)

    def next_round(self) -> list[tuple[float, float, int]]:
        """The accountant entries of one more round, with the statistics' budget still set
        aside (what :meth:`epsilon_after_next_round` composes onto the history)."""
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round), *self._head(True)]

    def head_release(self) -> list[tuple[float, float, int]]:
        """The accountant entry of the statistics' release (empty: none to make)."""
        return [] if self.head_released else self._head(True)

    def release_head(self) -> float:
        """Record the one release of the LDA statistics; its noise multiplier (the noise's
        std is this times the statistics' sensitivity). ValueError when the session keeps
        no budget for it, or it was made already (a second would spend it again)."""
        if self.head_noise <= 0:
            raise ValueError("no part of the privacy budget is kept for feature statistics")
        if self.head_released:
            raise ValueError("feature statistics were released once in this run already")
        after = rdp_epsilon([*self.accountant.history, *self._head(True)], self.delta)
        if self.cfg.target_epsilon > 0 and after > self.cfg.target_epsilon * (1 + 1e-9):
            raise ValueError(f"releasing them would spend epsilon {after:.3f} > the target")
        self.head_released = True
        return self.head_noise

    def can_train_round(self) -> bool:
        """False when one more round would push epsilon past the target budget."""
        if self.cfg.target_epsilon <= 0:
            return True
        return self.epsilon_after_next_round() <= self.cfg.target_epsilon * (1 + 1e-9)

    def record_steps(self, steps: int) -> None:
        """Add ``steps`` noisy steps at this session's (sigma, q) to the accountant."""
        if steps > 0:
            self.accountant.history.append((self.noise_multiplier, self.sample_rate, int(steps)))

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps(
            {
                "config": {k: v for k, v in asdict(self.cfg).items()},
                "n_train": self.n_train,
                "batch_size": self.batch_size,
                "steps_per_round": self.steps_per_round,
                "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier,
                "history": [list(h) for h in self.accountant.history],
                "head_noise": self.head_noise,
                "head_released": self.head_released,
            }
        )

    @classmethod
    def from_json(cls, s: str, *, secure: bool = False) -> DPSession:
        d = json.loads(s)
        config = DPConfig(**d["config"])
        return cls(config, d["n_train"], d["batch_size"], d["steps_per_round"], s, secure=secure)

    def metrics(self) -> dict[str, float]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
        }


# ---------------------------------------------------------------------- Opacus wiring


def resolve_mode(mode: str, model: nn.Module | None = None) -> str:
    """The per-sample gradient engine: ``auto`` -> the measured fastest for this family."""
    if mode != "auto":
        return mode
    return AUTO_MODE_BY_FAMILY.get(type(model).__name__, AUTO_MODE)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    session: DPSession,
    *,
    generator: torch.Generator | None = None,
) -> tuple[GradSampleModule, DPOptimizer, nn.Module | DPLossFastGradientClipping]:
    """Wrap model/optimizer/criterion for DP-SGD with the session's noise and clipping."""
    mode = resolve_mode(session.cfg.grad_sample_mode, model)
    kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
    if mode == "ghost":
        kwargs["max_grad_norm"] = session.cfg.max_grad_norm
    gsm = wrap_model(model, mode, **kwargs)
    opt_cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    dp_opt = opt_cls(
        optimizer,
        noise_multiplier=session.noise_multiplier,
        max_grad_norm=session.cfg.max_grad_norm,
        expected_batch_size=max(1, round(session.sample_rate * session.n_train)),
        loss_reduction="mean",
        generator=generator,
    )
    if mode == "ghost":
        criterion = DPLossFastGradientClipping(gsm, dp_opt, criterion, loss_reduction="mean")
    return gsm, dp_opt, criterion


_LEFTOVER_ATTRS = ("ft_compute_sample_grad", "activations", "max_batch_len", "_forward_counter")


def unwrap(gsm: GradSampleModule) -> nn.Module:
    """The plain module again: hooks removed, no per-sample attributes left behind."""
    model = gsm.to_standard_module()
    for m in model.modules():
        for attr in (*_LEFTOVER_ATTRS, "autograd_grad_sample_hooks"):
            if attr in m.__dict__:
                delattr(m, attr)
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
    return model


def empty_grad_samples(dp_opt: DPOptimizer) -> None:
    """Give every parameter a zero-length per-sample gradient (an empty Poisson batch).

    An empty logical batch must still produce a noisy step: the accountant counts it.
    """
    for p in dp_opt.params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
