"""``head-calibration = "lda"``: the best model's classifier refitted from the sites'
feature statistics (common/headfit.py), kept only if it scores higher on validation.

Each site's statistics are checked (shapes, finite, counts = its training images), then
screened (server/headcheck.py) before the solve; under DP the sites send noised statistics
of a projection the server computes from the model alone. Under ``secure-aggregation =
"secagg+"`` the statistics are sums too: they go through SecAgg+ (server/secagg.py:
SecureStats) and the server sees, checks and solves from the survivors' totals only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.config import RunConfig
from common.models import model_for_run, set_weights
from common.protocol import FEATURE_STATS
from common.wire import pack
from server.arrays import array_record, numpy_state
from server.checkpoints import LoopState
from server.headcheck import min_head_noise_std, screen_statistics
from server.lda import dp_projection, feature_bound, lda_head, private_lda_head, stats_error
from server.replies import printable
from server.secagg import SECURE_TOTAL, SecureStats
from server.sizes import SiteInfo
from server.transport import Problems, Send, Wording, by_site

log = logging.getLogger("fedskin")
# (model, split, round, label=name in the log) -> scores
Evaluate = Callable[..., dict[str, Any]]


def with_head(
    arrays: ArrayRecord,
    head: tuple[str, str],
    stats: list[Mapping[str, np.ndarray]],
    private: Mapping[str, Any] | None = None,
) -> ArrayRecord:
    """``arrays`` with the classifier replaced by the LDA head of the summed statistics
    (ValueError from :func:`lda_head` when there is none); ``private``: the noised
    statistics' projection and noise (server/lda.py: private_lda_head)."""
    if private:
        weight, bias = private_lda_head(
            stats, private["centre"], private["projection"], private["noise_std"]
        )
    else:
        weight, bias = lda_head(stats)
    refit = numpy_state(arrays)
    for key, value in zip(head, (weight, bias), strict=True):
        refit[key] = value.astype(refit[key].dtype)
    return array_record(refit)


class HeadRefit:
    """The refit for one run: its config and classes, the sites (``sites``: by name) to
    ask through ``send``, and ``evaluate`` to score the candidate on validation."""

    def __init__(
        self,
        run: RunConfig,
        classes: Sequence[str],
        sites: Sequence[SiteInfo],
        send: Send,
        evaluate: Evaluate,
    ) -> None:
        self.run, self.classes, self.sites = run, list(classes), list(sites)
        self.send, self.evaluate = send, evaluate

    def calibrate(
        self, arrays: ArrayRecord, head: tuple[str, str], state: LoopState
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The model to test and what the refit did: the refitted model only if it scores
        higher on validation than the best round (``kept``; the caller saves it as best)."""
        weight_key, bias_key = head
        if weight_key not in arrays or bias_key not in arrays:
            log.error("head calibration: no classifier %r in the model; head kept", weight_key)
            return arrays, {"method": "lda", "sites": [], "kept": False, "error": "no classifier"}
        try:
            private = self._dp_projection(arrays) if self.run.dp else None
        except (ValueError, RuntimeError) as err:  # nothing was sent: the run's result stands
            log.error("head calibration: no projection for the DP query (%s); head kept", err)
            return arrays, {"method": "lda", "sites": [], "kept": False, "error": str(err)}
        got = self.statistics(arrays, weight_key, state.run_tag, state.round + 1, private)
        stats, problems, noise, members = got
        stats, screened = self._screen(stats, noise if private is not None else None, members)
        sites = sorted(m for key in stats for m in members[key])
        out: dict[str, Any] = {"method": "lda", "sites": sites, "kept": False}
        out |= {"failures": problems.failures, "rejected": problems.rejected}
        out["screened"] = screened
        if self.run.secure_aggregation == "secagg+":
            out["secure-aggregation"] = "secagg+"  # the server saw only the totals
        if private is not None:
            out["epsilon"] = {site: eps for site, (_, eps) in sorted(noise.items())}
            total_std = float(np.sqrt(sum(noise[site][0] ** 2 for site in sites)))
            private = private | {"noise_std": total_std}
        if not stats:
            log.warning("head calibration: no site sent usable statistics; head kept")
            return arrays, out
        try:  # statistics that passed the checks can still be degenerate (or crafted)
            candidate = with_head(arrays, head, [stats[name] for name in sorted(stats)], private)
        except (ValueError, np.linalg.LinAlgError) as err:
            log.error("head calibration failed (%s); head kept", err)
            return arrays, out | {"error": str(err)}
        scored = self.evaluate(
            candidate, "validation", state.round + 1, label="head refit validation"
        )
        after = scored["decision_balanced_accuracy"]
        out |= {"validation_before": state.best_score, "validation_after": after}
        out["kept"] = bool(after > state.best_score)  # NaN never wins
        log.info(
            "head calibration (LDA from %d sites): validation balanced accuracy %.3f -> %.3f, %s",
            len(sites),
            state.best_score,
            after,
            "refitted head kept" if out["kept"] else "previous head kept",
        )
        return (candidate if out["kept"] else arrays), out

    def statistics(
        self,
        arrays: ArrayRecord,
        weight_key: str,
        run_tag: str,
        server_round: int,
        private: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[
        dict[str, dict[str, np.ndarray]],
        Problems,
        dict[str, tuple[float, float]],
        dict[str, list[str]],
    ]:
        """The sites' statistics of this model, checked, by entry; the problems; under DP
        each site's declared noise std and epsilon; and the sites each entry sums. In the
        clear an entry per site; under SecAgg+ one, ``SECURE_TOTAL``, the survivors' total."""
        if self.run.secure_aggregation == "secagg+":  # only the federation's totals
            return self._secure_stats(arrays, weight_key, run_tag, server_round, private)
        stats, problems, noise = self._feature_stats(arrays, weight_key, run_tag, private)
        return stats, problems, noise, {site: [site] for site in stats}

    def _screen(
        self,
        stats: dict[str, dict[str, np.ndarray]],
        noise: Mapping[str, tuple[float, float]] | None,
        members: Mapping[str, list[str]],
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
        """The statistics the refit may use (server/headcheck.py): counts that fit the
        pinned n-train, a symmetric PSD moment (within the declared noise), a declared noise
        no smaller than the run's epsilon allows, and no site that alone moves the head.
        Each entry of ``stats`` sums the statistics of its ``members`` (one site each in
        the clear; under SecAgg+ one total of the survivors, checked against their summed
        sizes and noise: a sum of honest statistics is an honest one)."""
        by_site = {s.site: s.n_train for s in self.sites}
        pinned = {key: sum(by_site[m] for m in members[key]) for key in stats}
        if noise is None:
            kept, dropped = screen_statistics(stats, n_train=pinned)
        else:
            # the floor holds for any dp-head-share a site sets itself (head_share=1)
            floors = {
                key: _root_sum_square(
                    min_head_noise_std(self.run, by_site[m], head_share=1.0) for m in members[key]
                )
                for key in stats
            }
            stds = {key: _root_sum_square(noise[m][0] for m in members[key]) for key in stats}
            kept, dropped = screen_statistics(
                stats, noise_std=stds, min_noise_std=floors, n_train=pinned
            )
        for why in dropped.values():
            log.warning("head calibration: %s; statistics dropped", printable(why))
        return dict(kept), dropped  # type: ignore[arg-type]

    def _dp_projection(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The centre and projection sent with a DP query, from the model alone."""
        model = model_for_run(self.run, len(self.classes), pretrained=False)
        set_weights(model, numpy_state(arrays))
        run = self.run
        centre, projection = dp_projection(model, run.image_size, run.dp_head_dims, run.seed)
        return {"centre": centre, "projection": projection}

    def _feature_stats(
        self,
        arrays: ArrayRecord,
        weight_key: str,
        run_tag: str,
        private: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, dict[str, np.ndarray]], Problems, dict[str, tuple[float, float]]]:
        """Every site's feature statistics of this model (``query.feature_stats``), each
        checked (shapes, finite, counts = its training images) before it is kept. Under DP
        (``private``: the projection sent along) the statistics are noised and projected,
        and each site says its noise's std and its epsilon after the release (returned)."""
        by_node = {s.node_id: s for s in self.sites}
        kind = f"{MessageType.QUERY}.{FEATURE_STATS}"
        content = self._query_content(arrays, run_tag, private)
        messages = [Message(RecordDict(content), n, kind) for n in by_node]
        replies, missing = self.send(messages, "head calibration")
        wording = Wording(
            "head calibration",
            failed="%s: site %s sent no feature statistics: %s",
            rejected="%s: statistics from site %s rejected: %s",
            silent="%s: site %s did not reply in time",
        )
        problems = Problems(wording, self.run.round_timeout)
        problems.missing(missing, by_node)
        stats: dict[str, dict[str, np.ndarray]] = {}
        noise: dict[str, tuple[float, float]] = {}
        k, dim = np.asarray(arrays[weight_key].numpy()).shape
        if private is not None:
            dim = private["projection"].shape[1]

        def take(site: SiteInfo, reply: Message) -> str | None:
            if "stats" not in reply.content.array_records:
                return "no 'stats' ArrayRecord"
            got = numpy_state(reply.content.array_records["stats"])
            if why := stats_error(got, k, dim, None if private is not None else site.n_train):
                return why
            if private is not None:
                meta = reply.content.config_records.get("site", ConfigRecord())
                std, eps = meta.get("noise-std"), meta.get("epsilon")
                if not isinstance(std, float) or not std > 0 or not isinstance(eps, float):
                    return "noised statistics without a positive noise-std and an epsilon"
                noise[site.site] = (std, eps)
            stats[site.site] = got
            return None

        problems.collect(by_site(replies, by_node), by_node, take)
        return stats, problems, noise

    def _secure_stats(
        self,
        arrays: ArrayRecord,
        weight_key: str,
        run_tag: str,
        server_round: int,
        private: Mapping[str, np.ndarray] | None,
    ) -> tuple[
        dict[str, dict[str, np.ndarray]],
        Problems,
        dict[str, tuple[float, float]],
        dict[str, list[str]],
    ]:
        """The statistics exchange under SecAgg+ (server/secagg.py: SecureStats): the
        survivors' summed statistics as one entry (``SECURE_TOTAL``), each survivor's
        declared noise std and epsilon (DP), and the survivors. Each part is scaled at the
        sites by the largest entry an honest site can have (:func:`stats_scales`)."""
        k, dim = np.asarray(arrays[weight_key].numpy()).shape
        if private is not None:
            dim = private["projection"].shape[1]
        scales = self.stats_scales(arrays, private)
        secure = SecureStats(self.run, self.send, server_round, self.sites, (k, dim), scales)
        content = self._query_content(arrays, run_tag, private)
        kind = f"{MessageType.QUERY}.{FEATURE_STATS}"
        got = secure.run(lambda ready: [Message(RecordDict(content), n, kind) for n in ready])
        noise = {secure.by_node[n].site: _declared(m) for n, m in secure.meta.items()}
        if got is None:
            return {}, secure.problems, {}, {}
        sites, total = got
        if secure.clipped:
            log.warning(
                "head calibration: %d entries of the federation's statistics were beyond the "
                "SecAgg+ range and clipped at the sites",
                secure.clipped,
            )
        bound = secure.error_bound(len(sites))
        if private is None and bound[0] < 0.5:  # whole counts, each off by less than 0.5
            total["counts"] = np.round(total["counts"])
        noise = {site: noise[site] for site in sites} if private is not None else {}
        return {SECURE_TOTAL: total}, secure.problems, noise, {SECURE_TOTAL: sites}

    def stats_scales(
        self, arrays: ArrayRecord, private: Mapping[str, np.ndarray] | None
    ) -> list[float]:
        """What each part of a site's statistics is divided by before quantising (counts,
        sums, moment): the largest entry an honest site can have. ``n`` is the largest
        pinned n-train. Under DP every projected feature has norm <= 1, so every entry is
        at most ``n`` before the noise: ``2 n + 50 s`` (``s`` the largest noise std the
        run's budget implies). Without DP, features of norm up to ``B``
        (server/lda.py: feature_bound): ``[n, n B, n B^2]``."""
        n = float(max(s.n_train for s in self.sites))
        if private is not None:
            std = max(min_head_noise_std(self.run, s.n_train) for s in self.sites)
            return [2 * n + 50 * std] * 3
        model = model_for_run(self.run, len(self.classes), pretrained=False)
        set_weights(model, numpy_state(arrays))
        bound = feature_bound(model, self.run.image_size, self.run.seed)
        return [n, n * bound, n * bound**2]

    def _query_content(
        self, arrays: ArrayRecord, run_tag: str, private: Mapping[str, np.ndarray] | None
    ) -> dict[str, Any]:
        """A statistics query's records: the model, the run tag, and the DP projection."""
        content = {"arrays": pack(arrays), "config": ConfigRecord({"run-tag": run_tag})}
        if private is not None:
            content["projection"] = array_record(private)
        return content


def _declared(meta: ConfigRecord) -> tuple[float, float]:
    """A site's declared noise std and epsilon (NaN where it sent none)."""
    std, eps = meta.get("noise-std"), meta.get("epsilon")
    return (
        float(std) if isinstance(std, float) else float("nan"),
        float(eps) if isinstance(eps, float) else float("nan"),
    )


def _root_sum_square(values: Iterable[float]) -> float:
    return float(np.sqrt(sum(v * v for v in values)))
