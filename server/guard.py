"""Round guards: checks on an aggregate before it becomes the global model.

Pure functions the rollback guard calls after aggregation (server/rollback.py). Why: the
update norm bounds (server/replies.py) cannot see an update that is harmless by norm but
breaks the model: one BatchNorm ``running_var`` entry, in an update whose norm matched the
honest median, made every honest site fail evaluation in every round under FedAvg and
FedAdam; a fixed-direction or sign-flipped update at 0.9 x the norm bound drove FedAvg's
outputs non-finite. So the aggregate's normalisation statistics are checked against the
previous round's (:func:`statistics_error`), the model's outputs on seeded noise images
against the previous model's (:func:`model_output_error`), and when a round fails,
:func:`leave_one_out` names the site whose update explains it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

VAR_FLOOR = 1e-6  # running variances below this count as this (an honest one can be ~0)
SCALE_FLOOR = 1.0  # logit scales below this count as this (a fresh head's are ~0.01)
NOISE_IMAGES = 8  # seeded uint8 noise images per output check


def statistics_error(
    new: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray],
    statistics: Iterable[str],
    ratio: float = 100.0,
) -> str | None:
    """Why the BatchNorm statistics of ``new`` cannot stand, or None.

    Checked: the names in ``statistics`` (the model's buffer names, as the loop knows them)
    ending in ``running_var`` or ``running_mean`` that ``new`` holds. A running variance
    must be finite and >= 0 (not > 0: an honest one can be tiny), and within a factor
    ``ratio`` of the previous round's (both floored at :data:`VAR_FLOOR`); a running mean
    finite and within ``ratio`` standard deviations of the previous one (the larger of
    the old and new variance, floored). Statistics the previous state lacks get only the
    first checks, as do those of a layer whose previous statistics are PyTorch's initial
    ones (variance 1 and mean 0 everywhere: random init, never estimated). The default 100
    per round is outside what honest statistics moved in one round of training after the
    first (at most 17-fold, efficientnet_b0 on synthetic images) and far inside what one
    crafted entry does to a mean of a few sites (1e30 / 5).

    Returns one line naming the worst statistic and its worst entry (non-finite before
    negative before out of ratio), with how many others fail.
    """
    failures: list[tuple[tuple[int, float], str]] = []
    for name in sorted(set(statistics)):
        if name not in new or not name.endswith(("running_var", "running_mean")):
            continue
        failure = _statistic_error(name, new, previous, ratio)
        if failure is not None:
            failures.append(failure)
    if not failures:
        return None
    failures.sort(key=lambda f: f[0], reverse=True)
    why = failures[0][1]
    if len(failures) > 1:
        why += f" (and {len(failures) - 1} other statistic(s) out of bounds)"
    return why


def _statistic_error(
    name: str, new: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], ratio: float
) -> tuple[tuple[int, float], str] | None:
    """((severity, amount), line) for one statistic, or None when it passes."""
    value = np.asarray(new[name], np.float64).ravel()
    old = np.asarray(previous[name], np.float64).ravel() if name in previous else None
    if old is not None and (old.shape != value.shape or _never_estimated(name, previous)):
        old = None

    def at(i: int) -> str:
        was = f" (previous {old[i]:.4g})" if old is not None else ""
        return f"{name}[{i}] = {value[i]:.4g}{was}"

    bad = ~np.isfinite(value)
    if bad.any():
        i = int(np.argmax(bad))
        return (3, float(bad.sum())), f"statistic {at(i)} is not finite"
    if name.endswith("running_var"):
        if (value < 0).any():
            i = int(np.argmin(value))
            return (2, -float(value[i])), f"running variance {at(i)} is negative"
        if old is None or not np.isfinite(old).all():
            return None
        change = np.abs(np.log(np.maximum(value, VAR_FLOOR)) - np.log(np.maximum(old, VAR_FLOOR)))
        i = int(np.argmax(change))
        if change[i] > math.log(ratio):
            return (1, float(change[i])), (
                f"running variance {at(i)} changed by a factor {math.exp(change[i]):.3g} "
                f"(> {ratio:g})"
            )
        return None
    if old is None or not np.isfinite(old).all():
        return None
    var_name = name[: -len("running_mean")] + "running_var"
    spread = np.full_like(value, VAR_FLOOR)
    for source in (previous, new):
        if var_name in source and np.shape(source[var_name]) == np.shape(new[name]):
            var = np.asarray(source[var_name], np.float64).ravel()
            spread = np.maximum(spread, np.where(np.isfinite(var), var, 0.0))
    if var_name not in previous and var_name not in new:
        spread = np.maximum(spread, 1.0)  # no variance known: absolute units
    shift = np.abs(value - old) / np.sqrt(spread)
    i = int(np.argmax(shift))
    if shift[i] > ratio:
        return (1, math.log(float(shift[i]))), (
            f"running mean {at(i)} moved {shift[i]:.3g} standard deviations (> {ratio:g})"
        )
    return None


def _never_estimated(name: str, previous: Mapping[str, np.ndarray]) -> bool:
    """Whether ``name``'s layer holds PyTorch's initial statistics (variance exactly 1 and
    mean exactly 0 everywhere): a randomly initialised model's, which the first round
    replaces by the real ones (efficientnet_b0's stem variance rose 258-fold in one round
    of training from random init), so there is nothing to compare with."""
    prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
    var, mean = previous.get(prefix + "running_var"), previous.get(prefix + "running_mean")
    if var is None or mean is None:
        return False
    return bool((np.asarray(var) == 1).all() and (np.asarray(mean) == 0).all())


def noise_images(image_size: int, seed: int, count: int = NOISE_IMAGES) -> torch.Tensor:
    """``count`` seeded uint8 NHWC noise images, as server/lda.py's dp_projection."""
    rng = np.random.default_rng(seed)
    shape = (count, image_size, image_size, 3)
    return torch.from_numpy(rng.integers(0, 256, shape, np.uint8))


def model_output_error(
    model: torch.nn.Module,
    image_size: int,
    seed: int,
    previous_scale: float | None = None,
    factor: float = 1e3,
) -> tuple[str | None, float]:
    """(why the model's outputs cannot stand or None, the scale of its outputs).

    The model runs in eval mode without gradients (its training mode is restored) on
    :data:`NOISE_IMAGES` seeded uint8 noise images, normalised as for evaluation
    (common/augment.py: to_float). The scale is the median over images of each image's
    largest |logit|: one class blowing up on every image moves it, one odd image does not.
    Refused: any non-finite output, and a scale above ``factor`` x ``previous_scale``
    (floored at :data:`SCALE_FLOOR`, so a fresh head's logits of ~0.01 may grow to
    normal ones; the previous model's scale on the same images: same ``seed``). 1e3 is
    far above what a round of training does to logits and far below what a diverging
    aggregate reaches before it overflows.
    """
    from common.augment import to_float

    images = noise_images(image_size, seed)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(to_float(images.to(device))).double().cpu().numpy()
    finally:
        model.train(was_training)
    finite = np.isfinite(out)
    if not finite.all():
        bad = int((~finite.all(axis=1)).sum())
        return f"outputs on {bad} of {len(out)} noise images are not finite", math.inf
    scale = float(np.median(np.abs(out).max(axis=1)))
    if previous_scale is not None and math.isfinite(previous_scale):
        limit = factor * max(previous_scale, SCALE_FLOOR)
        if scale > limit:
            return (
                f"output scale {scale:.4g} on noise images is more than {factor:g} x the "
                f"previous model's {previous_scale:.4g}",
                scale,
            )
    return None, scale


def weighted_mean(
    updates: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """The weighted mean of the sites' states, each array cast back to its dtype (the
    BatchNorm step counters stay integers). Sites in sorted order: reproducible sums."""
    names = sorted(updates)
    w = np.array([float(weights[n]) for n in names], np.float64)
    w = w / w.sum()
    first = updates[names[0]]
    out = {}
    for key in first:
        stacked = np.stack([np.asarray(updates[n][key], np.float64) for n in names])
        mean = np.tensordot(w, stacked, axes=1)
        out[key] = mean.astype(np.asarray(first[key]).dtype)
    return out


def leave_one_out(
    updates: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, float],
    check: Callable[[dict[str, np.ndarray]], str | None],
) -> str | None:
    """The site whose update explains a failed round, or None.

    ``updates``: the round's usable updates (site -> state dict of numpy arrays), with
    their aggregation ``weights``; ``check``: why a state cannot stand, or None. When the
    weighted mean of all passes, None (nothing to explain). Otherwise each site is left
    out in turn (a site whose exclusion leaves no positive weight is skipped); if exactly
    one exclusion makes the mean pass, that site. If several do (a failing mean can be
    tipped by removing any of a few), the one farthest from the others' coordinate-wise
    median (L2 over the floating-point arrays, non-finite entries infinitely far): the
    update least like the rest. None when no single exclusion helps (two bad sites, or a
    failure the sites share).
    """
    names = sorted(updates)
    if not names or check(weighted_mean(updates, weights)) is None:
        return None
    helped = []
    for name in names:
        others = [n for n in names if n != name]
        if not others or sum(float(weights[n]) for n in others) <= 0:
            continue
        if check(weighted_mean({n: updates[n] for n in others}, weights)) is None:
            helped.append(name)
    if len(helped) <= 1:
        return helped[0] if helped else None
    return max(helped, key=lambda name: _distance_from_others(name, updates))


def _distance_from_others(name: str, updates: Mapping[str, Mapping[str, Any]]) -> float:
    """L2 distance of ``name``'s floating-point arrays from the others' median."""
    total = 0.0
    others = [n for n in sorted(updates) if n != name]
    for key, value in updates[name].items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        median = np.median(np.stack([np.asarray(updates[n][key], np.float64) for n in others]), 0)
        diff = array.astype(np.float64) - median
        if not np.isfinite(diff).all():
            return math.inf
        total += float(np.sum(diff * diff))
    return math.sqrt(total)
