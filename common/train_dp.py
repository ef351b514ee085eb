"""DP-SGD for a local round (Opacus): Poisson logical batches in physical chunks, non-finite
per-sample gradients zeroed before the clip, FedProx's term added after the noise."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from common.privacy import empty_grad_samples, make_private, unwrap
from common.train_round import Round, forward, step_progress

if TYPE_CHECKING:
    from common.privacy import DPSession


def check_dp(model: nn.Module, dp: DPSession, n: int) -> None:
    """Refuse a model Opacus cannot privatise or a session accounted for another split."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible (build it with dp=True): {errors[:3]}")
    if dp.n_train != n:
        raise ValueError(f"DP session is for {dp.n_train} images, got {n}")


@dataclass
class _Private:
    """Opacus' wrappers of one DP round (from :func:`make_private`) and the physical chunk
    size a logical batch is split into."""

    gsm: nn.Module
    opt: Any  # DPOptimizer
    criterion: nn.Module
    physical: int


def _attach_prox(
    dp_opt: Any, model: nn.Module, global_params: list[torch.Tensor], mu: float
) -> None:
    """Add FedProx's gradient ``mu (w - w_g)`` after clipping and noise.

    It does not depend on data, so adding it as post-processing is exact and costs no
    privacy.
    """

    def add_prox(opt: Any) -> None:
        with torch.no_grad():
            for p, w0 in zip(model.parameters(), global_params, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - w0, alpha=mu)

    dp_opt.attach_step_hook(add_prox)


def zero_nonfinite_grad_samples(dp_opt: Any) -> None:
    """Replace every sample's per-sample gradient that has a non-finite entry (in any
    parameter) by zero, in place, before Opacus clips them (DPOptimizer.clip_and_accumulate).

    Why: Opacus scales each sample's gradient by ``C / norm``; an infinite entry gives norm
    inf, factor 0, and 0 x inf = NaN in the summed gradient, and NaN plus noise is NaN. A
    model the server crafts can make one image's gradient overflow, and the reply would then
    show, with no noise involved, whether that image was in the batch. Zero is a constant
    that depends on no data, so each sample still adds a vector of norm <= C computed from
    that sample alone: the sensitivity the noise is scaled to holds for any model. (Finite
    but huge gradients need nothing: Opacus' clip maps them to norm <= C or to 0.)

    Works on the per-sample gradients of the ``hooks`` and ``functorch`` engines
    (``p.grad_sample``, one tensor or a list of them per backward pass). ``ghost`` clipping
    never forms them: it is not covered (its second backward pass sums the batch)."""
    with torch.no_grad():
        params = [p for p in dp_opt.params if getattr(p, "grad_sample", None) is not None]
        per_param = [gs if isinstance(gs, list) else [gs] for gs in (p.grad_sample for p in params)]
        for parts in zip(*per_param, strict=True):  # one backward pass's tensors, all params
            n = len(parts[0]) if parts else 0
            if n == 0:
                continue
            bad = torch.zeros(n, dtype=torch.bool, device=parts[0].device)
            for gs in parts:
                bad |= ~torch.isfinite(gs.reshape(n, -1)).all(dim=1).to(bad.device)
            for gs in parts:
                gs.masked_fill_(bad.to(gs.device).view(n, *[1] * (gs.dim() - 1)), 0.0)


def _dp_step(r: Round, private: _Private, idx: torch.Tensor, g: torch.Generator) -> None:
    """One DP-SGD step on one Poisson logical batch: physical chunks accumulate per-sample
    gradients (as Opacus' BatchMemoryManager) and only the last one steps; an empty batch
    still takes its noisy step, which the accountant counts."""
    if len(idx) == 0:
        private.opt.signal_skip_step(do_skip=False)
        empty_grad_samples(private.opt)
        private.opt.step()
        private.opt.zero_grad(set_to_none=True)
        return
    chunks = idx.split(private.physical)
    for i, chunk in enumerate(chunks):
        private.opt.signal_skip_step(do_skip=i < len(chunks) - 1)
        logits, y = forward(r, private.gsm, chunk, g)
        with torch.no_grad():  # Opacus' criterion wraps its loss: tally a plain one
            r.tally.add(r.criterion(logits.detach(), y), logits, y)
        loss = private.criterion(logits, y)
        loss.backward()
        zero_nonfinite_grad_samples(private.opt)  # before Opacus clips them
        private.opt.step()
        private.opt.zero_grad(set_to_none=True)


def train_dp(
    r: Round, dp: DPSession, g: torch.Generator, seed: int, progress: bool | str
) -> nn.Module:
    """DP-SGD: ``dp.steps_per_round`` Poisson logical batches drawn from ``g``, noise from
    its own generator (``seed + 1``); every step taken is recorded in ``dp``, even when a
    later one fails, and the model is unwrapped from Opacus afterwards."""
    noise_gen = torch.Generator(device=r.device).manual_seed(seed + 1)
    gsm, dp_opt, dp_criterion = make_private(
        r.model, r.optimizer, r.criterion, dp, generator=noise_gen
    )
    if r.global_params is not None:
        _attach_prox(dp_opt, r.model, r.global_params, r.mu)
    private = _Private(gsm, dp_opt, dp_criterion, dp.cfg.physical_batch)
    steps = dp.steps_per_round
    sampler = UniformWithReplacementSampler(
        num_samples=dp.n_train, sample_rate=dp.sample_rate, generator=g, steps=steps
    )
    done = 0
    try:
        with step_progress(progress, steps) as advance, warnings.catch_warnings():
            # the stem conv's input needs no grad, so torch notes the hook fires on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for logical in sampler:
                _dp_step(r, private, torch.as_tensor(logical, dtype=torch.long), g)
                done += 1
                advance()
    finally:
        dp.record_steps(done)  # every noisy step taken is spent, even if a later one failed
        model = unwrap(gsm)
        r.optimizer.zero_grad(set_to_none=True)
    return model
