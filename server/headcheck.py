"""Screening the sites' feature statistics before the server refits the head from them.

The LDA refit (common/headfit.py) sums what every site sends: one site's crafted numbers
move the whole federation's classifier. :func:`screen_statistics` keeps the statistics
that honest sites could have sent and drops the rest, each with a one-line reason naming
the site and what is wrong. Its checks, each a function of its own that returns that
reason ("" when the site passes):

* :func:`counts_error`: class counts that no training split gives. Without DP they are
  whole, non-negative and add up to the pinned training size; under DP (Gaussian noise of
  the site's declared std ``s``) each is above ``-k s`` and their sum within
  ``k s sqrt(K)`` of the pinned size (the sum's noise has std ``s sqrt(K)``).
* :func:`moment_error`: a second moment that is not a sum of outer products. Symmetric to
  float precision (a DP site mirrors its noise, so it too is symmetric), and positive
  semi-definite: without DP its smallest eigenvalue is above ``-1e-6 trace``; under DP the
  noise ``E`` is a symmetric matrix with iid N(0, s^2) entries on and above the diagonal,
  whose largest eigenvalue is at most ``2 s sqrt(D)`` (Wigner's semicircle edge) plus
  Gaussian fluctuations (the eigenvalue is a sqrt(2) s-Lipschitz function of the iid
  entries: exceeding the edge by ``k sqrt(2) s`` has probability below ``exp(-k^2/2)``),
  so ``lambda_min >= -(2 sqrt(D) + k sqrt(2)) s``. Without DP the class scatter
  ``moment - sum_k sums_k sums_k^T / counts_k`` is positive semi-definite too
  (Cauchy-Schwarz: it is a sum of outer products of centred features); under DP that
  check is left out (it divides noise by noisy counts).
* :func:`clipping_error` (DP only): statistics that features clipped to norm 1 cannot
  give: a class sum longer than its count, a moment whose trace exceeds the images (each
  within the noise). This is what catches class sums shifted far under DP, where the class
  scatter cannot be checked.
* :func:`noise_error` (DP only): a declared std below what the run's own budget implies
  (:func:`min_head_noise_std`): such a site either spent more than its budget or lies
  about its noise to weigh more, as ``counts = -1e9`` with ``std = 1e-300`` does; and,
  when the server sets one, a std above ``max_noise_std`` (a site declaring a huge std
  loosens every noise allowance above; a stricter honest budget gives a larger std, so
  there is no bound by default).
* :func:`influence_drops` (four sites or more, :data:`LOO_MIN_SITES`): leave-one-out.
  The head of all kept sites is compared with the head without each site; a site whose
  removal changes the head (:func:`head_change`: the Frobenius change of ``[W | b]``
  relative to the smaller head, over the classes both heads have) by more than
  ``influence_factor`` times the median change of the other sites, and by more than
  ``min_influence``, is dropped, the most influential first, one at a time. This is what
  catches class sums shifted together with a consistent moment (every check above
  passes: the site's own class scatter is honest), which inflates the head many times.

``k`` is :data:`NOISE_SIGMAS` (5): with some 30 noised numbers checked per run, an honest
site is dropped by chance with probability near 1e-5; what 5 noise stds let a site shift
is a few images' worth (the head's noise std is about 2 at the default budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from common.config import RunConfig
from common.headfit import SENSITIVITY
from common.privacy import DPConfig
from common.privacy import calibrate_noise_multiplier as _calibrate
from server.lda import lda_head, private_lda_head, stats_error

Stats = Mapping[str, np.ndarray]
Head = tuple[np.ndarray, np.ndarray]

# How many noise stds an honest noised number may stray (see the module doc).
NOISE_SIGMAS = 5.0
# Without DP: how far below 0 (x trace) the smallest eigenvalue of the moment or of the
# class scatter may go: above float32 round-off (a site that sends float32, 6e-8 per
# entry), far below the 0.1 trace / D that the refit's shrinkage adds (D = 368: 3e-4).
PSD_TOLERANCE = 1e-6
# Asymmetry of the moment allowed, x max(1, its largest entry): float round-off only.
SYMMETRY_TOLERANCE = 1e-6
# A declared std may fall this much (relatively) below the run's minimum: the bisection of
# the calibration stops within 1 % of the target epsilon.
NOISE_RTOL = 0.02
# Leave-one-out: a site is dropped when removing it changes the head by more than this
# many times the median of the other sites' changes...
INFLUENCE_FACTOR = 5.0
# ... and by more than this (:func:`head_change`: twice the smaller head's own size). The
# ratio alone is not enough: where the classes overlap the head is small and removing a
# large site legitimately changes it by about its size; in 200 simulated honest runs of
# four uneven sites (tests/test_headcheck.py's generator) the largest leave-one-out change
# was 0.40 without DP and 1.17 under DP (where the ratio passed 5 in 3 runs), while shifted
# class sums that stop a class being predicted change it by 6 to 100.
MIN_INFLUENCE = 2.0
# Leave-one-out judges a site by the median of the others: with three sites that is two
# heads that both still hold the attacker, and removing a large honest site can let the
# attacker dominate what is left, so that the honest site is blamed (shown in
# tests/test_headcheck.py under DP). From four sites on, no honest site was blamed in the
# simulated attacks.
LOO_MIN_SITES = 4


# ---------------------------------------------------------------------- the run's minimum
def min_head_noise_std(
    run: RunConfig,
    n_train: int | None = None,
    *,
    head_share: float | None = None,
) -> float:
    """The smallest std of the noise on a site's feature statistics that the run's DP
    configuration allows: what :class:`common.privacy.DPSession` calibrates for the head
    release (``target-epsilon x dp-head-share`` for one Gaussian release at sampling rate
    1) times :data:`common.headfit.SENSITIVITY`. With ``target-delta = 0`` the site's delta
    is ``1 / (10 n_train)``: pass the site's ``n_train`` (None: ValueError). A site whose
    own budget is stricter calibrates a larger std. ``head_share`` overrides the run's
    ``dp-head-share`` (a site may set its own; 1.0 gives the bound for a site that spends
    its whole epsilon on the statistics)."""
    cfg = DPConfig.from_run(run)
    share = cfg.head_share if head_share is None else float(head_share)
    if not 0 < share <= 1:
        raise ValueError(f"no head release to bound: dp-head-share={share}")
    if cfg.target_delta > 0:
        delta = cfg.target_delta
    elif n_train is not None and n_train >= 1:
        delta = 1.0 / (10 * int(n_train))
    else:
        raise ValueError("target-delta = 0 sets delta from the site's n_train: pass it")
    return float(_calibrate(cfg.target_epsilon * share, delta, 1.0, 1)) * SENSITIVITY


# ---------------------------------------------------------------------- per-site checks
def counts_error(counts: np.ndarray, n_train: int | None, noise_std: float | None) -> str:
    """Why these class counts cannot be a training split's ("" when they can). Without DP
    (``noise_std`` None): whole, non-negative, summing to ``n_train`` (when pinned). Under
    DP: each above ``-k std``, their sum within ``k std sqrt(K)`` of ``n_train``."""
    c = np.asarray(counts, dtype=np.float64)
    if noise_std is None:
        if (c < 0).any() or (c != np.round(c)).any():
            return f"counts {c.tolist()} are not whole non-negative numbers"
        if n_train is not None and c.sum() != n_train:
            return f"counts sum to {c.sum():g}, not the {n_train} training images pinned"
        return ""
    low = -NOISE_SIGMAS * noise_std
    if (c < low).any():
        return f"count {c.min():.4g} is below {low:.3g} ({NOISE_SIGMAS:g} noise stds)"
    if n_train is not None:
        slack = NOISE_SIGMAS * noise_std * np.sqrt(len(c))
        if abs(c.sum() - n_train) > slack:
            return (
                f"counts sum to {c.sum():.4g}, not within {slack:.3g} of the {n_train} "
                "training images pinned"
            )
    return ""


def _min_eigenvalue(matrix: np.ndarray) -> float:
    return float(np.linalg.eigvalsh((matrix + matrix.T) / 2)[0])


def dp_moment_bound(dim: int, noise_std: float) -> float:
    """How far below 0 the smallest eigenvalue of an honest noised moment may go:
    ``(2 sqrt(D) + k sqrt(2)) std`` (the noise's spectral norm; module doc)."""
    return (2.0 * np.sqrt(dim) + NOISE_SIGMAS * np.sqrt(2.0)) * noise_std


def moment_error(stats: Stats, noise_std: float | None) -> str:
    """Why this second moment is no sum of outer products ("" when it can be): not
    symmetric, or not positive semi-definite within float error (no DP) or within the
    noise's spectral norm (DP, :func:`dp_moment_bound`); without DP, a negative class
    scatter too (module doc)."""
    m = np.asarray(stats["moment"], dtype=np.float64)
    asym = float(np.abs(m - m.T).max(initial=0.0))
    if asym > SYMMETRY_TOLERANCE * max(1.0, float(np.abs(m).max(initial=0.0))):
        return f"moment is not symmetric (asymmetry {asym:.3g})"
    low = _min_eigenvalue(m)
    if noise_std is not None:
        bound = dp_moment_bound(len(m), noise_std)
        if low < -bound:
            return f"moment has eigenvalue {low:.4g}, below the noise's -{bound:.3g}"
        return ""
    tol = PSD_TOLERANCE * max(float(np.trace(m)), 0.0)
    if low < -tol:
        return f"moment is not positive semi-definite (eigenvalue {low:.4g})"
    counts = np.asarray(stats["counts"], dtype=np.float64)
    sums = np.asarray(stats["sums"], dtype=np.float64)
    has = counts > 0
    scatter = m - (sums[has].T / counts[has]) @ sums[has]
    low = _min_eigenvalue(scatter)
    if low < -tol:
        return f"class sums do not fit the moment (class scatter eigenvalue {low:.4g})"
    return ""


def clipping_error(stats: Stats, noise_std: float, n_train: int | None) -> str:
    """Under DP, why these statistics cannot be of features clipped to norm 1 ("" when
    they can): private_stats clips every projected feature, so a class's sum has norm at
    most its count, and the moment's trace (the sum of squared norms) at most the site's
    images. With the noise: ``||sums_k|| <= counts_k + k s + s (sqrt(D) + k)`` (the count's
    noise, and the norm of D-dimensional Gaussian noise, sqrt(D) s on average and
    1-Lipschitz) and ``trace <= n + k s sqrt(D)`` (D noised diagonal entries), ``n`` the
    pinned size, else the counts' sum plus its noise ``k s sqrt(K)``."""
    counts = np.asarray(stats["counts"], dtype=np.float64)
    sums = np.asarray(stats["sums"], dtype=np.float64)
    moment = np.asarray(stats["moment"], dtype=np.float64)
    dim, k = moment.shape[0], NOISE_SIGMAS
    limit = np.maximum(counts + k * noise_std, 0.0) + noise_std * (np.sqrt(dim) + k)
    norms = np.linalg.norm(sums, axis=1)
    if (norms > limit).any():
        c = int(np.argmax(norms - limit))
        return (
            f"class {c}'s sums have norm {norms[c]:.4g}, over the {limit[c]:.4g} that "
            f"{counts[c]:.4g} clipped features can reach"
        )
    n = (
        float(n_train)
        if n_train is not None
        else counts.sum() + k * noise_std * np.sqrt(len(counts))
    )
    bound = n + k * noise_std * np.sqrt(dim)
    if np.trace(moment) > bound:
        return (
            f"moment has trace {np.trace(moment):.4g}, over the {bound:.4g} clipped features reach"
        )
    return ""


def noise_error(
    noise_std: float | None, min_noise_std: float, max_noise_std: float = math.inf
) -> str:
    """Why a declared noise std is not acceptable under DP ("" when it is): missing, not
    a positive finite number, below ``min_noise_std`` by more than :data:`NOISE_RTOL`, or
    above ``max_noise_std``."""
    if noise_std is None or not np.isfinite(noise_std) or not noise_std > 0:
        return f"declared noise std {noise_std!r} is not a positive number"
    if noise_std < min_noise_std * (1 - NOISE_RTOL):
        return f"declared noise std {noise_std:.4g} is below the run's minimum {min_noise_std:.4g}"
    if noise_std > max_noise_std:
        return f"declared noise std {noise_std:.4g} is above the maximum {max_noise_std:.4g}"
    return ""


# ---------------------------------------------------------------------- leave-one-out
def head_change(head: Head, other: Head) -> float:
    """How much two heads differ: ``||A - B||_F / min(||A||_F, ||B||_F)`` of ``[W | b]``
    over the classes both predict (a class a head lacks has a zero weight row and a bias
    1e6 below the rest: losing a class that only one site has is no sign of an attack).
    Symmetric, and large both when a site inflates the head and when it shrinks it."""
    both = np.any(head[0] != 0, axis=1) & np.any(other[0] != 0, axis=1)
    a = np.column_stack([head[0], head[1]])[both]
    b = np.column_stack([other[0], other[1]])[both]
    scale = min(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    return float(np.linalg.norm(a - b) / max(scale, 1e-300))


def head_fitter(
    noise_std: Mapping[str, float] | None = None,
) -> Callable[[Mapping[str, Stats]], Head]:
    """The refit the server makes from some sites' statistics, in the statistics' own
    coordinates: :func:`lda_head`, or under DP (``noise_std`` given)
    :func:`private_lda_head` with the summed noise's std and the identity projection (the
    server's head is this one folded back through the DP query's centre and projection,
    a fixed linear map: comparing heads here spares the fold's scale)."""
    if noise_std is None:
        return lambda stats: lda_head([stats[name] for name in sorted(stats)])
    stds = dict(noise_std)

    def fit(stats: Mapping[str, Stats]) -> Head:
        names = sorted(stats)
        dim = np.asarray(stats[names[0]]["moment"]).shape[0]
        total = float(np.sqrt(sum(stds[name] ** 2 for name in names)))
        return private_lda_head([stats[n] for n in names], np.zeros(dim), np.eye(dim), total)

    return fit


def _try_fit(fit: Callable[[Mapping[str, Stats]], Head], stats: Mapping[str, Stats]) -> Head | None:
    try:
        return fit(stats)
    except (ValueError, np.linalg.LinAlgError):
        return None


def influence(
    stats: Mapping[str, Stats], fit: Callable[[Mapping[str, Stats]], Head]
) -> dict[str, float] | None:
    """Each site's leave-one-out change of the head (:func:`head_change`); None when the
    head of all sites cannot be solved; a site whose removal leaves no solvable head is
    left out (it cannot be measured)."""
    full = _try_fit(fit, stats)
    if full is None:
        return None
    out = {}
    for name in stats:
        without = _try_fit(fit, {n: s for n, s in stats.items() if n != name})
        if without is not None:
            out[name] = head_change(full, without)
    return out


def influence_drops(
    stats: Mapping[str, Stats],
    fit: Callable[[Mapping[str, Stats]], Head],
    *,
    influence_factor: float = INFLUENCE_FACTOR,
    min_influence: float = MIN_INFLUENCE,
    min_sites: int = LOO_MIN_SITES,
) -> dict[str, str]:
    """The sites dropped by leave-one-out ({site: why}), one at a time while
    ``min_sites`` (at least 3) or more remain: the site whose removal changes the head
    most, when that change exceeds ``influence_factor`` x the median of the other sites'
    changes and ``min_influence``. When the head of all sites is unsolvable and removing
    exactly one site makes it solvable, that site is dropped."""
    kept = dict(stats)
    dropped: dict[str, str] = {}
    while len(kept) >= max(min_sites, 3):
        changes = influence(kept, fit)
        if changes is None:
            fixes = [n for n in kept if _try_fit(fit, {m: s for m, s in kept.items() if m != n})]
            if len(fixes) != 1:
                break
            dropped[fixes[0]] = f"site {fixes[0]}: the head is unsolvable only with it"
            del kept[fixes[0]]
            continue
        if len(changes) < 3:
            break
        name = max(changes, key=lambda n: changes[n])
        others = float(np.median([c for n, c in changes.items() if n != name]))
        if changes[name] <= max(influence_factor * others, min_influence):
            break
        dropped[name] = (
            f"site {name}: removing it changes the head by {changes[name]:.3g}, over "
            f"{influence_factor:g} x the other sites' median {others:.3g}"
        )
        del kept[name]
    return dropped


# ---------------------------------------------------------------------- all together
def _shapes(stats: Mapping[str, Stats]) -> tuple[int, int]:
    """The (K, D) most sites' statistics have (what the others are checked against)."""
    seen: dict[tuple[int, int], int] = {}
    for s in stats.values():
        try:
            key = (int(np.shape(s["counts"])[0]), int(np.shape(s["moment"])[0]))
        except (KeyError, IndexError, TypeError):
            continue
        seen[key] = seen.get(key, 0) + 1
    return max(seen, key=lambda k: seen[k]) if seen else (0, 0)


def site_error(
    name: str,
    stats: Stats,
    shape: tuple[int, int],
    *,
    n_train: int | None,
    noise_std: float | None,
    dp: bool,
    min_noise_std: float,
    max_noise_std: float = math.inf,
) -> str:
    """Every per-site check in order; the first reason, prefixed with the site ("" if
    none)."""
    why = stats_error(stats, shape[0], shape[1], None)
    if not why and dp:
        why = noise_error(noise_std, min_noise_std, max_noise_std)
    std = noise_std if dp else None
    if not why:
        why = counts_error(np.asarray(stats["counts"]), n_train, std)
    if not why:
        why = moment_error(stats, std)
    if not why and std is not None:
        why = clipping_error(stats, std, n_train)
    return f"site {name}: {why}" if why else ""


def screen_statistics(
    stats: Mapping[str, Stats],
    *,
    noise_std: Mapping[str, float] | None = None,
    min_noise_std: float | Mapping[str, float] = 0.0,
    max_noise_std: float = math.inf,
    n_train: Mapping[str, int] | None = None,
    influence_factor: float = INFLUENCE_FACTOR,
    min_influence: float = MIN_INFLUENCE,
    min_sites: int = LOO_MIN_SITES,
) -> tuple[dict[str, Stats], dict[str, str]]:
    """The sites' statistics (by site name) an honest site could have sent, and the
    dropped ones with why ({site: one line naming the site}). ``noise_std`` (each site's
    declared std) means DP; ``min_noise_std``: the smallest std the run allows
    (:func:`min_head_noise_std`; one for all sites, or by site); ``max_noise_std``: the
    largest std the server accepts (default none); ``n_train``: the sizes
    pinned at discovery (a site missing from a mapping is not checked against it, except
    ``min_noise_std`` by site: dropped). Per-site checks first, then leave-one-out among
    the kept (:func:`influence_drops`)."""
    dp = noise_std is not None
    shape = _shapes(stats)
    kept: dict[str, Stats] = {}
    dropped: dict[str, str] = {}
    for name in sorted(stats):
        if isinstance(min_noise_std, Mapping) and dp and name not in min_noise_std:
            dropped[name] = f"site {name}: no minimum noise std is known for it"
            continue
        floor = (
            min_noise_std.get(name, 0.0) if isinstance(min_noise_std, Mapping) else min_noise_std
        )
        why = site_error(
            name,
            stats[name],
            shape,
            n_train=None if n_train is None else n_train.get(name),
            noise_std=None if noise_std is None else noise_std.get(name),
            dp=dp,
            min_noise_std=float(floor),
            max_noise_std=max_noise_std,
        )
        if why:
            dropped[name] = why
        else:
            kept[name] = stats[name]
    fit = head_fitter(noise_std)
    loo = influence_drops(
        kept,
        fit,
        influence_factor=influence_factor,
        min_influence=min_influence,
        min_sites=min_sites,
    )
    for name, why in loo.items():
        dropped[name] = why
        del kept[name]
    return kept, dropped


__all__: Sequence[str] = (
    "clipping_error",
    "counts_error",
    "dp_moment_bound",
    "head_change",
    "head_fitter",
    "influence",
    "influence_drops",
    "min_head_noise_std",
    "moment_error",
    "noise_error",
    "screen_statistics",
    "site_error",
)
