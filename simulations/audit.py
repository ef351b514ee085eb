"""Empirical privacy audit: membership-inference attacks on a trained model, per site.

A DP guarantee is an upper bound; an attack is a lower bound on what actually leaks. For each
site the attacker tries to tell the site's training images (members) from its held-out
images (non-members: validation + test) using only the final global model. Three attacks:

* ``loss``: score = -cross-entropy of the true label (Yeom et al., CSF 2018). The probability
  of the true label ranks examples identically, so it is not reported twice.
* ``confidence``: score = the largest softmax probability, needing no label (Salem et al.,
  NDSS 2019, "ML-Leaks").
* ``reference`` (optional): an offline, few-shadow-model version of LiRA (Carlini et al.,
  "Membership Inference Attacks From First Principles", IEEE S&P 2022). Reference models are
  trained on held-out data that is *not* used as audit non-members, so they never saw any audited
  image. The score is the target's logit-scaled true-label confidence minus the mean over
  the references, phi(p) = log p_y - log(1 - p_y); with a global variance (the paper's choice
  for few shadow models) the likelihood-ratio test ranks examples exactly like this
  difference. Calibrating by per-example difficulty is what makes the low-FPR regime work.

Members and non-members are balanced by subsampling the larger group with a seeded RNG, so
the ROC AUC is not skewed by the class ratio and 0.5 means "no better than guessing".
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from common.config import RunConfig
from common.data.schema import DataError
from common.fedmetrics import nanmax
from common.figures import pyplot, save_figure, styled
from common.fileio import json_safe
from common.rundir import RunDir, atomic_write_json, load_checkpoint, read_toml

log = logging.getLogger("fedskin")

ATTACKS = ("loss", "confidence", "reference")
LOW_FPR = 0.01
# Fixed log-spaced FPR grid on which ROC curves are stored (compact, and ready to plot).
FPR_GRID = np.logspace(-3, 0, 61)
_TINY = 1e-30


# ------------------------------------------------------------------------------ metrics
def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float = LOW_FPR) -> float:
    """TPR of the ROC curve at ``target`` FPR, linear between ROC vertices.

    Linear interpolation between two vertices is achievable by a randomised threshold, so
    it is a real operating point. At an FPR shared by several vertices (a vertical step),
    the highest TPR counts.
    """
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    i = int(np.searchsorted(fpr, target, side="right")) - 1
    if i < 0:
        return 0.0
    if fpr[i] == target or i == len(fpr) - 1:
        return float(tpr[i])
    f0, f1, t0, t1 = fpr[i], fpr[i + 1], tpr[i], tpr[i + 1]
    return float(t0 + (t1 - t0) * (target - f0) / (f1 - f0))


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """ROC AUC, TPR at 1% FPR and the ROC on :data:`FPR_GRID` (higher score = member).

    TPR at 1% FPR is NaN with fewer than 100 non-members: an FPR of 1% is then below the
    resolution of the empirical ROC (one non-member is already more than 1%), and the
    interpolated value would only reflect how many members beat *every* non-member.
    """
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores].astype(float)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    resolvable = len(nonmember_scores) >= round(1 / LOW_FPR)
    return {
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, LOW_FPR) if resolvable else math.nan,
        "roc_tpr": [round(tpr_at_fpr(fpr, tpr, f), 5) for f in FPR_GRID],
    }


# ------------------------------------------------------------------------------ scores
def _true_label_stats(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example loss, max-confidence and logit-scaled true-label confidence."""
    p = np.asarray(probs, dtype=np.float64)
    idx = np.arange(len(labels))
    p_true = p[idx, labels]
    # 1 - p_y as the sum of the other classes: no cancellation when p_y rounds to 1.
    p_rest = p.sum(axis=1) - p_true
    p_rest = np.where(p_rest > 0, p_rest, np.clip(1.0 - p_true, 0.0, None))
    return {
        "loss": -np.log(np.maximum(p_true, _TINY)),
        "confidence": p.max(axis=1),
        "phi": np.log(np.maximum(p_true, _TINY)) - np.log(np.maximum(p_rest, _TINY)),
    }


def _predict(model: torch.nn.Module, images: np.ndarray, device: str) -> np.ndarray:
    from common.train import predict

    if len(images) == 0:
        return np.zeros((0, 1))
    return predict(model, torch.from_numpy(np.ascontiguousarray(images)), device=device)


def _balanced(
    n_members: int, n_nonmembers: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of an equal-sized subsample of members and non-members (seeded)."""
    n = min(n_members, n_nonmembers)
    mem = np.sort(rng.choice(n_members, size=n, replace=False))
    non = np.sort(rng.choice(n_nonmembers, size=n, replace=False))
    return mem, non


# ------------------------------------------------------------------------------ references
def _train_references(
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    num_classes: int,
    run: RunConfig,
    *,
    n_reference: int,
    epochs: int | None,
    device: str,
    seed: int,
) -> list[torch.nn.Module]:
    """Train reference models (no DP) with the target's recipe on data it never saw.

    Each reference sees a different seeded half of the pool (as LiRA's shadow models do), so
    their mean is a per-example estimate of "how hard is this image for an OUT model".
    """
    from common.models import model_for_run
    from common.train import TrainConfig, train_local

    rounds = run.num_server_rounds
    if epochs is None:
        if run.local_steps > 0:
            steps = rounds * run.local_steps
            per_epoch = max(1, math.ceil(len(pool_labels) / 2 / run.batch_size))
            epochs = max(1, round(steps / per_epoch))
        else:
            epochs = rounds * run.local_epochs
    # plain local training: no DP, and no FedProx term (proximal-mu is the server's to send)
    tcfg = replace(TrainConfig.from_run(run), local_epochs=int(epochs), local_steps=0)
    models = []
    rng = np.random.default_rng([seed, 7])
    for k in range(n_reference):
        subset = np.sort(
            rng.choice(len(pool_labels), size=max(1, len(pool_labels) // 2), replace=False)
        )
        model = model_for_run(run, num_classes)  # the target's architecture
        train_local(
            model,
            torch.from_numpy(np.ascontiguousarray(pool_images[subset])),
            torch.from_numpy(np.ascontiguousarray(pool_labels[subset])),
            tcfg,
            num_classes=num_classes,
            device=device,
            dp=None,
            seed=seed * 1000 + k,
        )
        model.eval()
        models.append(model)
    return models


# ------------------------------------------------------------------------------ audit
def audit_model(
    model: torch.nn.Module,
    site_data_list: Sequence[Any],
    *,
    device: str = "cpu",
    reference: bool = False,
    seed: int = 0,
    run_config: RunConfig | None = None,
    n_reference: int = 2,
    reference_epochs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Attack ``model`` at every site: members = site train split, non-members = held out.

    ``site_data_list`` holds :class:`common.data.site_data.SiteData`-like objects (``site``,
    ``classes``, ``images``/``labels`` per split). With ``reference=True`` each site's
    held-out images are split in two halves (seeded): one half of every site forms the
    reference models' training pool, the other half are the audit non-members, for all
    three attacks alike. ``run_config`` (the run's config: model, lr, epochs, ...) is then
    needed to train the references with the target's recipe.
    """
    if not site_data_list:
        raise ValueError("audit_model needs at least one site")
    if reference and run_config is None:
        raise ValueError("reference=True needs run_config (how to build and train references)")
    model = copy.deepcopy(model).eval()
    rng = np.random.default_rng(seed)
    num_classes = len(site_data_list[0].classes)

    audit_nonmembers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pool_x, pool_y = [], []
    for data in site_data_list:
        x = np.concatenate([data.images["validation"], data.images["test"]])
        y = np.concatenate([data.labels["validation"], data.labels["test"]])
        if reference:
            perm = rng.permutation(len(y))
            half = len(y) // 2
            pool_x.append(x[perm[:half]])
            pool_y.append(y[perm[:half]])
            keep = np.sort(perm[half:])
            x, y = x[keep], y[keep]
        audit_nonmembers[data.site] = (x, y)

    references: list[torch.nn.Module] = []
    if reference:
        px, py = np.concatenate(pool_x), np.concatenate(pool_y)
        if len(py) < 2:
            raise DataError("too few held-out images to train reference models")
        references = _train_references(
            px,
            py,
            num_classes,
            run_config or RunConfig.defaults(),
            n_reference=n_reference,
            epochs=reference_epochs,
            device=device,
            seed=seed,
        )

    results: dict[str, dict[str, Any]] = {}
    for data in site_data_list:
        mx, my = data.images["train"], data.labels["train"]
        nx, ny = audit_nonmembers[data.site]
        if len(my) == 0 or len(ny) == 0:
            log.warning("site %s: no members or no non-members, not audited", data.site)
            continue
        mi, ni = _balanced(len(my), len(ny), rng)
        x = np.concatenate([mx[mi], nx[ni]])
        y = np.concatenate([my[mi], ny[ni]]).astype(np.int64)
        n = len(mi)
        target = _true_label_stats(_predict(model, x, device), y)
        scores = {"loss": -target["loss"], "confidence": target["confidence"]}
        if references:
            ref_phi = np.mean(
                [_true_label_stats(_predict(r, x, device), y)["phi"] for r in references], axis=0
            )
            scores["reference"] = target["phi"] - ref_phi
        site_result: dict[str, Any] = {
            "n_members": int(n),
            "n_nonmembers": int(n),
            "n_members_available": int(len(my)),
            "n_nonmembers_available": int(len(ny)),
            "attacks": {k: attack_metrics(v[:n], v[n:]) for k, v in scores.items()},
        }
        attacks = site_result["attacks"]
        site_result["auc"] = max(a["auc"] for a in attacks.values())
        site_result["tpr_at_1pct_fpr"] = nanmax([a["tpr_at_1pct_fpr"] for a in attacks.values()])
        site_result["min_resolvable_fpr"] = 1.0 / n
        results[data.site] = site_result
    return results


def audit_run(
    run_dir: str | Path,
    *,
    reference: bool | None = None,
    device: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Audit a finished run's best checkpoint at every site; write audit.json and audit.png.

    ``reference`` defaults to the run config's ``audit-reference`` (True when absent).
    """
    from common.data.partition import read_manifest
    from common.data.site_data import load_site, site_names
    from common.models import model_for_run, set_weights
    from common.train import pick_device

    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    cfg_path = paths.config
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: not found; is {run_dir} a run directory?")
    saved = read_toml(cfg_path)  # malformed: one line naming the file
    ckpt = next(
        (paths.checkpoint(n) for n in ("best", "last") if paths.checkpoint(n).is_file()),
        None,
    )
    if ckpt is None:
        raise DataError(f"{paths.checkpoints}: no best.pt or last.pt to audit")
    run = RunConfig.from_flat(saved)  # keys of an older fedskin are left out
    manifest_path = paths.manifest
    if manifest_path.is_file():
        run = run.with_values({"manifest": str(manifest_path.resolve())})
    sites = [
        load_site(run, {"partition-id": i})
        for i in range(len(site_names(read_manifest(Path(run.manifest)))))
    ]
    classes = sites[0].classes
    model = model_for_run(run, len(classes), pretrained=False)
    set_weights(model, load_checkpoint(ckpt)["arrays"])  # weights only: no code runs
    if reference is None:
        reference = run.audit_reference
    seed = run.seed if seed is None else seed
    device = device or str(pick_device())
    log.info("auditing %s (%d sites, reference attack %s)", ckpt, len(sites), reference)
    per_site = audit_model(
        model, sites, device=device, reference=reference, seed=seed, run_config=run
    )
    report = {
        "checkpoint": str(ckpt),
        "model": run.model,
        "dp": run.dp,
        "target_epsilon": run.target_epsilon if run.dp else None,
        "seed": seed,
        "reference": reference,
        "balanced": "the larger of members/non-members is subsampled (seeded) to the smaller",
        "fpr_grid": [float(f) for f in FPR_GRID],
        "sites": per_site,
    }
    atomic_write_json(paths.audit_json, json_safe(report), indent=1)  # NaN: null
    plot_audit(per_site, paths.audit_png, title=f"Membership inference: {run_dir.name}")
    return report


@styled
def plot_audit(per_site: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """ROC curves per site (one panel each, all attacks), log-log axes with the diagonal."""
    plt = pyplot()

    names = list(per_site)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, site in zip(axes.flat, names, strict=False):
        r = per_site[site]
        shown = FPR_GRID >= 1.0 / max(1, r["n_nonmembers"])  # below 1/n the ROC says nothing
        for attack, m in r["attacks"].items():
            tpr1 = m["tpr_at_1pct_fpr"]
            tpr1_txt = "n/a" if tpr1 is None or math.isnan(tpr1) else f"{tpr1:.2f}"
            ax.plot(
                FPR_GRID[shown],
                np.asarray(m["roc_tpr"])[shown],
                label=f"{attack} AUC {m['auc']:.2f}, TPR@1%FPR {tpr1_txt}",
            )
        ax.plot(FPR_GRID, FPR_GRID, "k--", lw=0.8, label="chance")
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(FPR_GRID[0], 1),
            ylim=(FPR_GRID[0], 1.05),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{site} (n={r['n_members']}+{r['n_nonmembers']})",
        )
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
