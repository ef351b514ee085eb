"""Local training at a site: plain, FedProx, or sample-level DP (Opacus), plus evaluation.

The whole site split arrives as one uint8 N×H×W×3 tensor (from the cache). It is moved to the
device once when it fits; mini-batches are index tensors gathered with ``images[idx]`` and
augmented on the device, so the hot loop has no per-sample Python and no DataLoader workers.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from rich.progress import (
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from common.augment import augment_batch, to_float
from common.config import RunConfig, run_config_of, steps_for
from common.losses import make_loss
from common.metrics import compute_metrics
from common.names import OPTIMIZERS
from common.privacy import empty_grad_samples, make_private, unwrap

if TYPE_CHECKING:
    from common.privacy import DPSession

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Local training hyper-parameters (kebab-case keys in the Flower run config)."""

    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local_epochs
    loss: str = "weighted-ce"
    focal_gamma: float = 2.0
    proximal_mu: float = 0.0
    # The federation's training class counts (class-prior = "federation", sent by the
    # server); None: the loss's prior or weights come from the images trained on.
    class_counts: tuple[int, ...] | None = None
    augment: bool = True
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_size < 1 or self.lr <= 0 or self.proximal_mu < 0:
            raise ValueError("batch-size must be >= 1, lr > 0 and proximal-mu >= 0")
        if self.local_steps <= 0 and self.local_epochs < 1:
            raise ValueError("set local-epochs >= 1 or local-steps >= 1")

    @classmethod
    def from_run(
        cls,
        run: RunConfig,
        proximal_mu: float = 0.0,
        server_round: int = 0,
        class_counts: tuple[int, ...] | None = None,
    ) -> TrainConfig:
        """The training view of the typed run config. ``proximal_mu`` is FedProx's, which
        the server sends with each train message: the run config's ``proximal-mu`` is the
        strategy's to read (a site trains without the term unless the server asks).
        ``server_round`` sets the round's learning rate (:func:`round_lr`);
        ``class_counts`` are the federation's (see ``class-prior``)."""
        return cls(
            optimizer=run.optimizer,
            lr=round_lr(run.lr, run.lr_schedule, server_round, run.num_server_rounds),
            momentum=run.momentum,
            weight_decay=run.weight_decay,
            batch_size=run.batch_size,
            local_epochs=run.local_epochs,
            local_steps=run.local_steps,
            loss=run.loss,
            focal_gamma=run.focal_gamma,
            proximal_mu=proximal_mu,
            class_counts=class_counts,
            augment=run.augment,
            amp=run.amp,
            channels_last=run.channels_last,
            compile=run.compile,
            seed=run.seed,
        )

    @classmethod
    def from_run_config(cls, cfg: RunConfig | Mapping[str, Any]) -> TrainConfig:
        """:meth:`from_run` of a flat run config (checked; other keys ignored)."""
        return cls.from_run(run_config_of(cfg))

    def steps_per_round(self, n_train: int) -> int:
        return steps_for(n_train, self.batch_size, self.local_epochs, self.local_steps)


def round_lr(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based; 0: no round, the base rate).

    ``cosine`` anneals it from ``lr`` in round 1 towards 0 over the run's rounds. Under label
    skew, FedAvg settles where the sites' local steps pull apart, at a distance that grows
    with the step size: annealing the step shrinks that distance round by round, and the
    pooled and local baselines follow the same schedule (simulations/baselines.py).
    """
    if schedule == "constant" or server_round < 1 or rounds < 1:
        return lr
    t = (min(server_round, rounds) - 1) / rounds
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def proximal_term(
    model: nn.Module, global_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx penalty ``(mu/2) * sum ||w - w_global||^2`` over the trainable parameters.

    ``global_params`` is the round's global model, frozen at the start of local training
    (a list aligned with ``model.parameters()`` or a name -> tensor mapping).
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if isinstance(global_params, Mapping):
        pairs = [(p, global_params[n]) for n, p in named]
    else:
        if len(global_params) != len(named):
            raise ValueError(f"{len(global_params)} global tensors for {len(named)} parameters")
        pairs = [(p, g) for (_, p), g in zip(named, global_params, strict=True)]
    total = torch.zeros((), device=named[0][1].device)
    for p, g in pairs:
        if p.requires_grad:
            total = total + (p - g.to(p.device, p.dtype)).pow(2).sum()
    return 0.5 * mu * total


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the whole split to the GPU once if it takes under 30% of free memory."""
    if device.type != "cuda" or images.device == device:
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < 0.3 * free:
        return images.to(device, non_blocking=True)
    log.info("images (%.1f GB) kept on the CPU, gathered per batch", images.nbytes / 1e9)
    return images.pin_memory() if not images.is_pinned() else images


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t.to(device)`` without blocking the host (pinned staging for CPU -> CUDA)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def epoch_batches(
    n: int, batch_size: int, steps: int, g: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """``steps`` index batches from successive seeded permutations (epochs) of 0..n-1.

    Each epoch's permutation is drawn on the CPU from ``g`` (the same random stream on every
    device, interleaved with the augmentation draws exactly as before) and moved to
    ``device`` in one non-blocking copy; the batches are slices of it, so no step pays a
    host-to-device copy of its indices.
    """
    done = 0
    while done < steps:
        perm = _to(torch.randperm(n, generator=g), device)
        for idx in perm.split(batch_size):
            yield idx
            done += 1
            if done == steps:
                return


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 N×H×W×3 tensor, got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no training images at this site")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {lo}..{hi}")


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    dp: DPSession | None = None,
    seed: int | None = None,
    progress: bool | str = False,
) -> dict[str, float]:
    """Train ``model`` in place on this site's split; return training metrics.

    With ``dp`` the round runs ``dp.steps_per_round`` Poisson-sampled DP-SGD steps and records
    them in the session's accountant. With ``cfg.proximal_mu > 0`` the FedProx penalty
    against the weights at entry (the round's global model) is applied at every step.
    """
    _check_inputs(images, labels, num_classes)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda:
        return _train_local(model, images, labels, cfg, num_classes, device, dp, seed, progress)
    # cuDNN autotuning pays off when shapes repeat: without DP every step has the full batch
    # shape except one smaller last batch per epoch, and cuDNN caches its choice per shape, so
    # that batch is tuned once per process (per distinct size), not every epoch. DP-SGD's
    # Poisson batches change size at every step and would be re-tuned for each new size, so
    # autotuning is off there. The previous setting is restored afterwards.
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dp is None
    try:
        return _train_local(model, images, labels, cfg, num_classes, device, dp, seed, progress)
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass
class _Tally:
    """Running sums of the data loss and correct predictions over the round's batches.

    The sums stay on the device so nothing in the loop waits for the GPU; they are read once,
    after the last step.
    """

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def on(cls, device: torch.device) -> _Tally:
        return cls(
            loss_sum=torch.zeros((), device=device),
            correct=torch.zeros((), device=device, dtype=torch.long),
        )

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's (data) loss and correct count."""
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(y)
            self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)


@dataclass
class _Round:
    """What every step of one local round shares, built once before the seeded loop: the
    model and its optimiser, the split on its device, the loss, FedProx's anchor and the
    running tallies. The step functions take it instead of a dozen loose arguments."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor  # long, on the images' device
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    global_params: list[torch.Tensor] | None  # the weights at entry, when FedProx is on
    memory_format: torch.memory_format
    autocast: Any
    tally: _Tally

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mu(self) -> float:
        return self.cfg.proximal_mu


def _check_dp(model: nn.Module, dp: DPSession, n: int) -> None:
    """Refuse a model Opacus cannot privatise or a session accounted for another split."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible (build it with dp=True): {errors[:3]}")
    if dp.n_train != n:
        raise ValueError(f"DP session is for {dp.n_train} images, got {n}")


def loss_counts(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """The class counts that set the loss's prior or weights: the federation's when the
    server sent them, else those of the images trained on.

    Why the federation's: a site's own prior makes balanced-softmax learn scores balanced
    *within that site*. When classes live at different sites (akiec and bcc almost only at
    one HAM10000 source), those within-site scores are not balanced across the federation;
    with the federation's prior the sites' losses sum to the pooled model's. Why not always:
    a site's own prior leaves the classes it lacks alone, which the personalised models and
    short runs gained from (docs/results.md has both, measured).
    """
    if cfg.class_counts is None:
        return np.bincount(labels.cpu().numpy().astype(np.int64), minlength=num_classes)
    counts = np.asarray(cfg.class_counts, dtype=np.int64)
    if counts.shape != (num_classes,) or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(
            f"class counts {list(cfg.class_counts)} are not {num_classes} non-negative "
            "counts with a positive sum"
        )
    return counts


def _prepare_round(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
) -> _Round:
    """Move the model and the split to ``device`` and build the loss and optimiser."""
    cuda = device.type == "cuda"
    model.to(device)
    memory_format = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    images = place_images(images, device)
    # Indices and labels live where the images are (the GPU, unless the split did not fit):
    # a batch is then gathered without any per-step copy of its indices.
    labels_src = _to(labels.to(dtype=torch.long), images.device)
    counts = loss_counts(cfg, labels, num_classes)
    criterion = make_loss(cfg.loss, counts, cfg.focal_gamma).to(device)
    optimizer = _make_optimizer(model, cfg)
    mu = cfg.proximal_mu
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()
    return _Round(
        model=model,
        cfg=cfg,
        device=device,
        images=images,
        labels=labels_src,
        criterion=criterion,
        optimizer=optimizer,
        global_params=global_params,
        memory_format=memory_format,
        autocast=autocast,
        tally=_Tally.on(device),
    )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed the round's randomness without disturbing the caller's: the global RNGs (dropout,
    drop-path) are forked and seeded, and the yielded CPU generator drives the batch order,
    the Poisson sampling and the augmentation, in the order the loop consumes them."""
    cuda_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)  # dropout / drop-path draws
        yield torch.Generator().manual_seed(seed)


def _forward(
    r: _Round, net: nn.Module, idx: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather, augment and forward one batch; the logits come back in fp32."""
    idx = _to(idx, r.images.device)
    x = r.images[idx].to(r.device, non_blocking=True)
    y = r.labels[idx].to(r.device, non_blocking=True)
    x = augment_batch(x, g) if r.cfg.augment else to_float(x)
    x = x.contiguous(memory_format=r.memory_format)
    with r.autocast:
        logits = net(x)
    return logits.float(), y  # the loss in fp32 under bf16 autocast (a no-op otherwise)


def _plain_step(r: _Round, net: nn.Module, idx: torch.Tensor, g: torch.Generator) -> None:
    """One optimiser step on one batch, with the FedProx term when it is on."""
    logits, y = _forward(r, net, idx, g)
    loss = r.criterion(logits, y)
    r.tally.add(loss, logits, y)  # the data loss, before the FedProx term
    if r.global_params is not None:
        loss = loss + proximal_term(r.model, r.global_params, r.mu)
    r.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    r.optimizer.step()


def _train_plain(r: _Round, g: torch.Generator, steps: int, progress: bool | str) -> None:
    """``steps`` steps over successive seeded epochs of the split."""
    net = torch.compile(r.model) if r.cfg.compile and r.cuda else r.model
    batches = epoch_batches(len(r.images), r.cfg.batch_size, steps, g, r.images.device)
    with _progress(progress, steps) as advance:
        for idx in batches:
            _plain_step(r, net, idx, g)
            advance()


def _train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    dp: DPSession | None,
    seed: int | None,
    progress: bool | str,
) -> dict[str, float]:
    """:func:`train_local` once the inputs are checked and the cuDNN setting is chosen."""
    seed = cfg.seed if seed is None else seed
    model.train()
    if dp is not None:
        _check_dp(model, dp, len(images))
    r = _prepare_round(model, images, labels, cfg, num_classes, device)
    t0 = time.perf_counter()
    with _seeded(seed, device) as g:
        if dp is None:
            steps = cfg.steps_per_round(len(images))
            _train_plain(r, g, steps, progress)
        else:
            steps = dp.steps_per_round
            _train_dp(r, dp, g, seed, progress)
    if r.cuda:
        torch.cuda.synchronize(device)
    return _round_metrics(r.tally, len(images), steps, time.perf_counter() - t0, dp)


def _round_metrics(
    tally: _Tally, n: int, steps: int, seconds: float, dp: DPSession | None
) -> dict[str, float]:
    """The metrics a round reports (the only point where the device-side sums are read)."""
    out = {
        "train_loss": float(tally.loss_sum) / max(tally.seen, 1),
        "train_accuracy": float(tally.correct) / max(tally.seen, 1),
        "num_examples": float(n),
        "steps": float(steps),
        "seconds": seconds,
        "images_per_second": tally.seen / max(seconds, 1e-9),
    }
    if dp is not None:
        out.update(dp.metrics())
    return out


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


def _dp_step(r: _Round, private: _Private, idx: torch.Tensor, g: torch.Generator) -> None:
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
        logits, y = _forward(r, private.gsm, chunk, g)
        with torch.no_grad():  # Opacus' criterion wraps its loss: tally a plain one
            r.tally.add(r.criterion(logits.detach(), y), logits, y)
        loss = private.criterion(logits, y)
        loss.backward()
        zero_nonfinite_grad_samples(private.opt)  # before Opacus clips them
        private.opt.step()
        private.opt.zero_grad(set_to_none=True)


def _train_dp(
    r: _Round, dp: DPSession, g: torch.Generator, seed: int, progress: bool | str
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
        with _progress(progress, steps) as advance, warnings.catch_warnings():
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


class _progress:
    """A rich progress bar when asked (``progress`` True or a label), else a no-op; yields an
    ``advance()`` callable. Shows steps done, elapsed time and the ETA."""

    def __init__(self, enabled: bool | str, total: int) -> None:
        self.bar = None
        if enabled:
            columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn()]
            columns += [TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA")]
            self.bar = Progress(*columns, TimeRemainingColumn(), transient=True)
        self.label = enabled if isinstance(enabled, str) else "local training"
        self.total = total

    def __enter__(self) -> Any:
        if self.bar is None:
            return lambda: None
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Softmax probabilities (N, C) for a uint8 N×H×W×3 tensor, in eval mode."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.to(device).eval()
    out: list[torch.Tensor] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        out.append(F.softmax(logits.float(), dim=1))  # stays on the device: no sync per batch
    model.train(was_training)
    if not out:
        n_classes = _num_outputs(model)
        return np.zeros((0, n_classes), dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def _num_outputs(model: nn.Module) -> int:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return int(getattr(head, "out_features", 0))


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, Any]:
    """``compute_metrics`` plus the mean (unweighted) cross-entropy ``loss`` and ``n``."""
    probs = predict(model, images, device=device, batch_size=batch_size)
    y = labels.cpu().numpy().astype(np.int64)
    metrics = compute_metrics(y, probs, classes)
    if len(y):
        p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
        metrics["loss"] = float(-np.log(p_true).mean())
    else:
        metrics["loss"] = math.nan
    metrics["n"] = len(y)
    return metrics
