"""The site's model work for the ClientApp: torch, timm and Opacus live here.

Split from ``client_app`` (as in Flower's examples) so that a message that needs no model,
such as the server's query, does not pay for importing torch and timm: in a deployment every
message runs in a fresh ClientApp process.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.headstats import MAX_CENTRE_ENTRY, MAX_PROJECTION_ENTRY, private_stats
from client.message import ServerAsks
from client.personal import ditto_step, finetune, norm_state, overwrite, save_personal
from common.config import RunConfig
from common.data.site_data import SiteData
from common.fedmetrics import site_summary
from common.headfit import feature_stats
from common.metrics import compute_metrics, scalar_metrics
from common.models import model_for_run, set_weights
from common.personal import personalize_mode
from common.train import TrainConfig, pick_device, place_images, predict, train_local
from common.wire import is_packed, layout_of, pack, unpack

log = logging.getLogger("fedskin")

_MODELS: dict[tuple, torch.nn.Module] = {}
_TENSORS: dict[tuple, tuple[SiteData, torch.Tensor]] = {}


def site_images(data: SiteData, split: str) -> torch.Tensor:
    """A split's uint8 images, moved to the training device once per process, not per round."""
    device = pick_device()
    key = (data.site, split, str(device))
    if key not in _TENSORS or _TENSORS[key][0] is not data:  # same site, reloaded data
        _TENSORS[key] = (data, place_images(torch.from_numpy(data.images[split]), device))
    return _TENSORS[key][1]


def model_for(
    run: RunConfig, num_classes: int, arrays: ArrayRecord
) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """The run's architecture (built once per process) holding the received weights, and
    those weights as a state dict (they arrive packed, see :mod:`common.wire`).

    No pretrained weights are loaded here: the server's initial model carries them, so a
    site never downloads or needs the ``pretrained`` file."""
    key = (num_classes, run.model, run.dp, run.central_dp)
    if key not in _MODELS:
        _MODELS[key] = model_for_run(run, num_classes, pretrained=False)
    state = unpack(arrays, layout_of(_MODELS[key].state_dict()))
    set_weights(_MODELS[key], state)
    return _MODELS[key], state


def site_seed(run: RunConfig, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{run.seed}/{site}/{server_round}".encode()).hexdigest()
    return int(digest[:8], 16)


def dp_seed(run: RunConfig, site: str, server_round: int, session: Any) -> int:
    """The seed of a site's DP randomness (batches, noise): :func:`site_seed` in a simulation
    (reproducible), OS entropy at a deployed site (``session.secure``), where a seed derived
    from the server-written run config would let the server replay and remove the noise."""
    return secrets.randbits(62) if session.secure else site_seed(run, site, server_round)


def train_config(run: RunConfig, msg: Message | ServerAsks) -> TrainConfig:
    """Local training settings; the proximal term only when the server's strategy asks, the
    federation's class counts when the server sent them and ``class-prior`` is "federation".

    FedProx sends ``proximal-mu`` with every train message. A ``proximal-mu`` left in the run
    config must not turn FedAvg (or FedAdam) into FedProx behind the user's back.
    """
    asks = _asks(msg)
    counts = asks.class_counts if run.class_prior == "federation" else None
    return TrainConfig.from_run(
        run, proximal_mu=asks.proximal_mu, server_round=asks.server_round, class_counts=counts
    )


def _asks(msg: Message | ServerAsks) -> ServerAsks:
    return msg if isinstance(msg, ServerAsks) else ServerAsks.of(msg)


def train_site(
    run: RunConfig,
    msg: Message,
    data: SiteData,
    session: Any,
    state: RecordDict | None = None,
    asks: ServerAsks | None = None,
) -> tuple[ArrayRecord, dict[str, float]]:
    """Train the received model on the site's train split; return new weights and metrics.

    Integer buffers (BatchNorm step counters) go back as received: they do not change the
    model's output, and under site-level DP they would dominate the norm that is clipped.

    With ``personalize`` (``state`` is the node's ``context.state``): ``fedbn`` trains the
    received model with the site's own normalisation entries in place and keeps the trained
    ones; ``ditto`` then also trains the site's personal model (see :func:`personal_step`).
    What is sent back is, either way, the full trained model as FedAvg sends it.
    """
    asks = asks or ServerAsks.of(msg)  # the handler's, read once
    mode = personalize_mode(run)
    received: ArrayRecord = msg.content.array_records["arrays"]
    model, start = model_for(run, len(data.classes), received)
    kept = kept_personal(state, None) if mode and state is not None else None
    if mode == "fedbn" and kept:
        set_weights(model, overwrite(start, kept))
    images, labels = site_images(data, "train"), torch.from_numpy(data.labels["train"])
    seed = site_seed(run, data.site, asks.server_round)
    if session is not None:
        seed = dp_seed(run, data.site, asks.server_round, session)
    metrics = train_local(
        model,
        images,
        labels,
        train_config(run, asks),
        num_classes=len(data.classes),
        device=pick_device(),
        dp=session,
        seed=seed,
    )
    sent = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in sent.items():
        if not v.is_floating_point():
            sent[k] = torch.from_numpy(np.array(start[k]))
    # The reply travels the way the weights came: packed from the fedskin server. Packing
    # copies, so the model may be trained on below without touching the reply.
    reply = pack(sent) if is_packed(received) else ArrayRecord(sent)
    if mode and state is not None:
        if mode == "fedbn":
            keep_personal(state, norm_state(model), asks)
        elif mode == "ditto":
            personal = overwrite(start, kept or {})  # v starts as the first received global
            v = personal_step(run, model, personal, start, data, seed, asks.server_round)
            keep_personal(state, v, asks)
    return reply, metrics


def personal_step(
    run: RunConfig,
    model: torch.nn.Module,
    personal: Mapping[str, Any],
    received: Mapping[str, Any],
    data: SiteData,
    seed: int,
    server_round: int = 0,
) -> dict[str, torch.Tensor]:
    """Ditto: the personal model ``v`` trained as many steps as the global was, with
    ``(ditto-lambda/2) ||v - w||^2`` against the received global ``w``; its new state."""
    set_weights(model, personal)
    anchor = {n: torch.from_numpy(np.asarray(received[n])) for n, _ in model.named_parameters()}
    ditto_step(
        model,
        anchor,
        run.ditto_lambda,
        site_images(data, "train"),
        torch.from_numpy(data.labels["train"]),
        TrainConfig.from_run(run, server_round=server_round),  # the global step's rate
        num_classes=len(data.classes),
        device=pick_device(),
        seed=seed,  # the same batches and augmentations as the global model's step
    )
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- personal state at a site
# context.state keeps the site's personal entries (FedBN: its normalisation layers; Ditto:
# its whole personal model) across rounds; none of it is ever put in a reply. The live
# entries date from the site's last training round ("since"). The server picks its best
# round on validation scores, which a personalised site computed with the entries live at
# that round; so that the test scores those same entries, the site keeps one snapshot: the
# entries live from "best-from" to "best-until" (exclusive), no array meaning "none yet".
# (One RecordDict holds all three: its keys are shared across record types.)
PERSONAL, PERSONAL_BEST, PERSONAL_META = "personal", "personal-best", "personal-meta"


def kept_personal(state: RecordDict | None, best_round: int | None) -> dict[str, np.ndarray]:
    """The site's personal entries: the live ones, or those it held at ``best_round``."""
    if state is None or PERSONAL not in state.array_records:
        return {}
    meta = state.config_records[PERSONAL_META]
    record = state.array_records[PERSONAL]
    if best_round is not None and best_round < int(meta["since"]):
        if int(meta["best-from"]) <= best_round < int(meta["best-until"]):
            record = state.array_records.get(PERSONAL_BEST)
            if record is None:
                return {}  # the site had not trained yet at the best round
        else:
            log.warning("no personal entries kept for round %d: the latest ones used", best_round)
    return {k: v.numpy() for k, v in record.items()}


def keep_personal(state: RecordDict, entries: Mapping[str, Any], asks: ServerAsks) -> None:
    """Make ``entries`` the live personal entries (after training in this round).

    The server's best round so far (``best-round`` in the train config) is earlier than this
    round; if the entries being replaced are the ones it was scored with, they become the
    snapshot. (The best round at the end is that one or later, so one snapshot suffices.)
    """
    server_round, best_so_far = asks.server_round, asks.best_round
    if PERSONAL in state.array_records:
        meta = dict(state.config_records[PERSONAL_META])
        if best_so_far >= int(meta["since"]):
            state.array_records[PERSONAL_BEST] = state.array_records[PERSONAL]
            meta.update({"best-from": meta["since"], "best-until": server_round})
    else:
        meta = {"best-from": 0, "best-until": server_round}
    meta["since"] = server_round
    state.array_records[PERSONAL] = ArrayRecord(
        {k: Array(np.array(_numpy(v))) for k, v in entries.items()}  # 0-d kept 0-d
    )
    state.config_records[PERSONAL_META] = ConfigRecord(meta)


def _numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


def finetune_at_site(run: RunConfig, model: torch.nn.Module, data: SiteData, server_round: int):
    """FLamby's fine-tuning on the site's train split (``finetune-steps`` at ``finetune-lr``).
    With ``finetune-select`` the site keeps the fine-tuned model only if it scores higher on
    its own validation split: fine-tuning a small site (33 test images) can lose what the
    federation learned (docs/results.md), and the site can tell from its own data."""
    received, before = None, None
    if run.finetune_select:  # what the site falls back on, and the score to beat
        received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        before = evaluate_site(model, data, "validation")
    cfg = TrainConfig.from_run(run)
    if run.finetune_lr > 0:
        cfg = replace(cfg, lr=run.finetune_lr)
    finetune(
        model,
        site_images(data, "train"),
        torch.from_numpy(data.labels["train"]),
        cfg,
        run.finetune_steps,
        num_classes=len(data.classes),
        device=pick_device(),
        seed=site_seed(run, data.site, server_round),
    )
    if not run.finetune_select:
        return
    try:
        after = evaluate_site(model, data, "validation")
    except ValueError:  # fine-tuning diverged (non-finite scores): the received model stays
        after = {"balanced_accuracy": float("nan")}
    better = after["balanced_accuracy"] > before["balanced_accuracy"]  # NaN never wins
    log.info(
        "site %s: fine-tuning %s (validation balanced accuracy %.3f -> %.3f)",
        data.site,
        "kept" if better else "dropped",
        before["balanced_accuracy"],
        after["balanced_accuracy"],
    )
    if not better:
        model.load_state_dict(received)


def site_feature_stats(
    run: RunConfig,
    msg: Message,
    data: SiteData,
    release: Callable[[], tuple[float, int]] | None = None,
) -> ArrayRecord:
    """The received model's LDA statistics on the train split (common/headfit.py). Under
    DP, ``release`` spends the budget kept for them and returns the noise multiplier and
    the noise's seed (:func:`dp_seed`): it is called once the query is
    known to be well formed, and the statistics go through the Gaussian mechanism in the
    projection the server sent (any projection: the site clips)."""
    model, _ = model_for(run, len(data.classes), msg.content.array_records["arrays"])
    model.to(pick_device())
    images, labels = site_images(data, "train"), data.labels["train"]
    if release is None:
        stats = feature_stats(model, images, labels, len(data.classes))
    else:
        centre, projection = dp_query_projection(msg, model.num_features)
        noise, seed = release()
        rng = np.random.default_rng([seed, 1])
        args = (model, images, labels, len(data.classes), centre, projection, noise)
        stats = private_stats(*args, rng=rng)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})


def dp_query_projection(msg: Message, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre (D,) and projection (D, d) of a DP query; ValueError naming what is wrong.

    Both must be finite and bounded: every projection entry at most
    ``MAX_PROJECTION_ENTRY`` (1e12, above anything ``dp_projection`` sends) in size, every
    centre entry at most float32's largest. The release clips whatever it gets
    (client/headstats.py: clipped_projections); this refuses a malformed query before any
    budget is spent on it."""
    if "projection" not in msg.content.array_records:
        raise ValueError("a DP feature-statistics query needs a 'projection' ArrayRecord")
    record = msg.content.array_records["projection"]
    got = {k: np.asarray(record[k].numpy(), dtype=np.float64) for k in record.keys()}
    centre, projection = got.get("centre"), got.get("projection")
    if centre is None or projection is None or centre.shape != (dim,):
        raise ValueError(f"the projection record needs 'centre' ({dim},) and 'projection'")
    if projection.ndim != 2 or projection.shape[0] != dim or not 1 <= projection.shape[1] <= dim:
        raise ValueError(f"'projection' has shape {projection.shape}, expected ({dim}, d<={dim})")
    for key, value, bound in (
        ("centre", centre, MAX_CENTRE_ENTRY),
        ("projection", projection, MAX_PROJECTION_ENTRY),
    ):
        if not np.isfinite(value).all():
            raise ValueError(f"the projection record's {key!r} is not finite")
        if np.abs(value).max() > bound:
            raise ValueError(f"the projection record's {key!r} has entries above {bound:.3g}")
    return centre, projection


def evaluate_site(model: torch.nn.Module, data: SiteData, split: str) -> dict[str, Any]:
    """Site metrics (scalars) plus the poolable aggregates of :mod:`common.fedmetrics`."""
    probs = predict(model, site_images(data, split), device=pick_device())
    bad = int((~np.isfinite(np.asarray(probs)).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"site {data.site}: the received model gives non-finite scores for {bad} of "
            f"{len(probs)} {split} images (a diverged or over-noised global model)"
        )
    labels = data.labels[split]
    out: dict[str, Any] = {
        k: float(v) for k, v in scalar_metrics(compute_metrics(labels, probs, data.classes)).items()
    }
    out["num-examples"] = int(len(labels))
    out.update(site_summary(labels, probs, len(data.classes)))
    return out


def evaluate_received(
    run: RunConfig,
    msg: Message,
    data: SiteData,
    split: str,
    state: RecordDict | None = None,
    asks: ServerAsks | None = None,
) -> dict:
    """Score the received model, or this site's personalised model, on one split.

    ``fedbn``: the received model with the site's normalisation entries; ``ditto``: the
    site's personal model; ``finetune``: for the test only, the received model fine-tuned on
    the site's train split. At the test, the entries kept at the server's best round.
    """
    asks = asks or ServerAsks.of(msg)  # the handler's, read once
    mode = personalize_mode(run)
    model, received = model_for(run, len(data.classes), msg.content.array_records["arrays"])
    if mode in ("fedbn", "ditto"):
        best = asks.best_round if split == "test" else None
        kept = kept_personal(state, best or None)
        if kept:
            set_weights(model, overwrite(received, kept))
        if split == "test" and run.state_dir:  # for `fedskin evaluate --site` (its test)
            save_personal(run.state_dir, data.site, mode, asks.best_round, kept)
    elif mode == "finetune" and split == "test":
        finetune_at_site(run, model, data, asks.server_round)
        if run.state_dir:  # the fine-tuned model it tests, for `fedskin evaluate --site`
            save_personal(run.state_dir, data.site, mode, asks.best_round, model.state_dict())
    return evaluate_site(model, data, split)
