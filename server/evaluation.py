"""Evaluation: every site scores the model; pooled metrics come from their aggregates.

Each reply is checked against the site's pinned split size before it counts. The decision
score (best round, rollback, head refit) weighs each site's counts by its pinned size
capped at ``max-site-weight`` (server/sizes.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.config import RunConfig
from common.wire import pack
from server.pooling import pooled_confusion, pooled_metrics, weighted_balanced_accuracy
from server.replies import evaluate_reply_error
from server.sizes import SiteInfo, scale_factors
from server.transport import Problems, Send, Wording, by_site


def evaluate(
    run: RunConfig,
    classes: Sequence[str],
    sites: Sequence[SiteInfo],
    send: Send,
    arrays: ArrayRecord,
    split: str,
    server_round: int,
    best_round: int = 0,
    label: str = "",
) -> dict[str, Any]:
    """``sites`` score ``arrays`` on ``split``: their scores, failures and rejections, the
    pooled metrics and the decision score.

    At the test, ``best_round`` is the round ``arrays`` come from: a personalising site
    scores the personal state it held then (client/task.py). ``label`` names the exchange
    in the log (default: ``test``, or ``round N validation``)."""
    classes = list(classes)
    by_node = {s.node_id: s for s in sites}
    config = ConfigRecord({"split": split, "server-round": server_round})
    if best_round:
        config["best-round"] = best_round
    wire = pack(arrays)
    messages = [
        Message(RecordDict({"arrays": wire, "config": config}), nid, MessageType.EVALUATE)
        for nid in by_node
    ]
    scores_by_site: dict[str, dict[str, float]] = {}
    summaries = []
    confusions: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    label = label or ("test" if split == "test" else f"round {server_round} {split}")
    replies, missing = send(messages, label)
    wording = Wording(
        split,
        failed="%s evaluation failed at site %s: %s",
        rejected="%s evaluation: reply from site %s rejected: %s",
        silent="%s evaluation: site %s did not reply in time",
    )
    problems = Problems(wording, run.round_timeout)
    problems.missing(missing, by_node)

    def take(site: SiteInfo, reply: Message) -> str | None:
        """One reply, checked (server/replies.py) before anything of it is kept."""
        size = site.n_test if split == "test" else site.n_validation
        if why := evaluate_reply_error(reply.content, classes, size):
            return why
        m = dict(reply.content.metric_records["metrics"])
        confusions[site.site], sizes[site.site] = list(m["confusion"]), size
        summary = {
            "confusion": list(m.pop("confusion")),
            "score-hist": list(m.pop("score-hist")),
        }
        scores = {k: float(v) for k, v in m.items()}
        summaries.append(summary)
        scores_by_site[site.site] = scores
        return None

    problems.collect(by_site(replies, by_node), by_node, take)
    out: dict[str, Any] = {
        "sites": dict(sorted(scores_by_site.items())),
        "failures": problems.failures,
        "rejected": problems.rejected,
    }
    out["global"] = pooled_metrics(summaries, classes) if summaries else {}
    out["decision_balanced_accuracy"] = decision_score(
        run, len(classes), out["global"], confusions, sizes
    )
    out["confusion"] = pooled_confusion(summaries, len(classes)).tolist()
    baccs = [
        v["balanced_accuracy"]
        for v in scores_by_site.values()
        if not math.isnan(v["balanced_accuracy"])
    ]
    out["mean_site_balanced_accuracy"] = float(np.mean(baccs)) if baccs else float("nan")
    return out


def decision_score(
    run: RunConfig,
    num_classes: int,
    pooled: dict[str, Any],
    confusions: dict[str, list[int]],
    sizes: dict[str, int],
) -> float:
    """The pooled balanced accuracy the loop decides by (best round, head refit): each
    site's counts weighed by its pinned size capped at ``max-site-weight``; the pooled
    figure itself (``pooled``) where no site is capped."""
    factors = scale_factors(sizes, run.max_site_weight)
    if all(f >= 1.0 for f in factors.values()):
        return float(pooled.get("balanced_accuracy", float("nan")))
    return weighted_balanced_accuracy(confusions, factors, num_classes)
