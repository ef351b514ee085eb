"""The server's side of a SecAgg+ round: it learns only the sum of the sites' updates.

``secure-aggregation = "secagg+"`` turns a training round into four exchanges of train
messages through the same transport (server/transport.py), so they run unchanged under the
Simulation Engine and between real SuperLink and SuperNodes: ``setup`` (public keys),
``share-keys`` (each site's encrypted Shamir shares, relayed), ``collect`` (the strategy's
own train messages, with the shares for each site; the sites train and send masked
vectors) and ``unmask`` (the survivors' shares: their mask seeds, and the keys of the sites
that dropped after the key exchange). The server then removes the masks of the *sum* and
divides by the summed weight (common/secagg.py: what is masked; client/secagg.py: the
site). Flower's primitives do the cryptography (Shamir sharing, ECDH, Fernet, the seeded
mask generator, quantisation); every site shares with every other (SecAgg+ with a complete
graph, fine for tens of hospitals).

The weights are the sites' pinned sizes, capped (server/sizes.py), assigned by the server
at setup: a site cannot weigh itself up. Dead sites are those that replied at the key
exchange but sent no usable masked vector. Fewer than ``secagg-threshold`` sites at any
stage: the round is skipped and the model kept, the missing sites named. The threat model
is an honest-but-curious server: public keys are relayed unsigned (docs/privacy.md).

:class:`SecureSum` is the protocol over any vector; :class:`SecureRound` sums the weighted
updates of a training round, :class:`SecureStats` the head refit's feature statistics
(the same four stages as ``query.feature_stats`` messages; server/refit.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    public_key_to_bytes,
)

from common.config import ConfigError, RunConfig
from common.protocol import FEATURE_STATS
from common.secagg import (
    COLLECT,
    MASKED,
    RECORD,
    SETUP,
    SHARE_KEYS,
    STAGE_KEY,
    STATS_CLIP,
    STATS_FACTORS,
    STATS_MODULUS,
    STATS_QUANT,
    UNMASK,
    add_masks,
    float_keys,
    recovered,
    stats_length,
    stats_of_vector,
)
from server.arrays import numpy_state
from server.replies import train_reply_error
from server.sizes import SiteInfo, capped
from server.transport import Problems, Send, Wording
from server.updates import SecureUpdates

log = logging.getLogger("fedskin")
Configure = Callable[[list[int]], list[Message]]
SECURE_TOTAL = "secagg+ sum"  # the one "site" of a SecAgg+ statistics exchange: the total


@dataclass(frozen=True)
class Settings:
    """One exchange's SecAgg+ parameters: sites needed to unmask, clip and quantisation
    ranges, and the modulus the masked sums live in."""

    threshold: int
    clip: float
    quant: int
    modulus: int


def threshold_of(run: RunConfig, sampled: int) -> int:
    """Sites needed to unmask among ``sampled``; ConfigError in one line when it cannot be
    met (a threshold above the sites, or fewer than 2 sites)."""
    share = run.secagg_threshold
    t = max(2, round(share * sampled) if share <= 1 else int(share))
    if sampled < 2 or t > sampled:
        raise ConfigError(
            f"secagg-threshold={share:g} needs {t} sites to unmask, but {sampled} are sampled "
            "per round (secure aggregation needs at least 2)"
        )
    return t


def settings(run: RunConfig, sampled: int) -> Settings:
    """A training round's settings for ``sampled`` sites; ConfigError in one line when the
    run's cannot work: a threshold above the sites, or a modulus the sums would wrap around."""
    t = threshold_of(run, sampled)
    if sampled * run.secagg_quant_range >= run.secagg_modulus:
        raise ConfigError(
            f"secagg-modulus={run.secagg_modulus}: the sum of {sampled} sites' values up to "
            f"secagg-quant-range={run.secagg_quant_range} would wrap around it"
        )
    return Settings(t, run.secagg_clip_range, run.secagg_quant_range, run.secagg_modulus)


def stats_settings(run: RunConfig, sites: int) -> Settings:
    """The statistics exchange's settings: the run's threshold; the fixed-point form of
    common/secagg.py (entries scaled into [-1, 1], 2^50 levels, modulo 2^62)."""
    if sites * STATS_QUANT >= STATS_MODULUS:
        raise ConfigError(f"{sites} sites: a SecAgg+ statistics sum would wrap around 2^62")
    return Settings(threshold_of(run, sites), STATS_CLIP, STATS_QUANT, STATS_MODULUS)


class SecureSum:
    """The four SecAgg+ exchanges over ``chosen`` sites, as ``kind`` messages: the unmasked
    sum of their masked vectors (``factors`` exact integers, then the quantised vector)."""

    kind: str = MessageType.TRAIN
    factors: int = 1

    def __init__(
        self, label: str, send: Send, server_round: int, chosen: list[SiteInfo], timeout: float
    ) -> None:
        self.label, self.send, self.round = label, send, server_round
        self.by_node = {s.node_id: s for s in chosen}
        self.settings, self.refused = Settings(2, 1.0, 2, 4), ""
        wording = Wording(
            label,
            failed="%s: site %s failed in secure aggregation: %s",
            rejected="%s: secure-aggregation reply from site %s rejected: %s",
            silent="%s: site %s did not reply in time (secure aggregation)",
        )
        self.problems = Problems(wording, timeout)
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # node -> (pk1, pk2)
        self.ciphertexts: dict[tuple[int, int], bytes] = {}  # (src, dst) -> shares
        self.masked: dict[int, list[np.ndarray]] = {}
        self.shares: dict[int, list[bytes]] = {}  # owner -> shares collected at unmask
        self.length = 0
        self.asked: set[int] = set()  # the owners whose shares the unmask stage asks for

    def unmasked_sum(self, configure: Configure) -> tuple[list[int], list[np.ndarray]] | None:
        """The survivors and the unmasked sum of their ``[factor, vector]`` (modulo the
        modulus), or None (logged) when the protocol stopped."""
        if self.refused:
            log.error("%s: secure aggregation skipped: %s", self.label, self.refused)
            return None
        active = self._stage(SETUP, list(self.by_node), self._setup_message, self._take_keys)
        if not self._enough(active, "setup"):
            return None
        ready = self._stage(SHARE_KEYS, active, self._keys_message(active), self._take_shares)
        if not self._enough(ready, "the key exchange"):
            return None
        messages = [self._with_shares(m, ready) for m in configure(ready)]
        survivors = self._exchange(COLLECT, messages, self._take_masked)
        if not self._enough(survivors, "the masked vectors"):
            return None
        dead = sorted(set(ready) - set(survivors))
        unmask = self._unmask_message(survivors, dead)
        answered = self._stage(UNMASK, survivors, unmask, self._take_unmask_shares)
        if not self._enough(answered, "unmasking"):
            return None
        total = self._unmask(survivors, dead)
        return None if total is None else (survivors, total)

    # ------------------------------------------------------------------ hooks
    def _setup_values(self, nid: int) -> dict[str, Any]:
        """What a site's setup message says besides the settings."""
        return {}

    def _take_plain(self, site: SiteInfo, reply: Message) -> str | None:
        """The plaintext part of a site's collect reply, checked and kept."""
        return None

    # ------------------------------------------------------------------ exchanges
    def _message(self, nid: int, stage: str, values: Mapping[str, Any]) -> Message:
        config = ConfigRecord({STAGE_KEY: stage, "server-round": self.round})
        content = RecordDict({"config": config, RECORD: ConfigRecord(dict(values))})
        return Message(content, dst_node_id=nid, message_type=self.kind)

    def _stage(
        self,
        stage: str,
        nodes: list[int],
        make: Callable[[int], Message],
        take: Callable[[SiteInfo, Message], str | None],
    ) -> list[int]:
        return self._exchange(stage, [make(nid) for nid in nodes], take)

    def _exchange(
        self, stage: str, messages: list[Message], take: Callable[[SiteInfo, Message], str | None]
    ) -> list[int]:
        """Send one stage, check each reply (``take``: why it is refused, or None); the
        nodes whose replies were usable, in node order."""
        what = f"{self.label} secure aggregation ({stage})"
        replies, missing = self.send(messages, what)
        got: list[int] = []

        def keep(site: SiteInfo, reply: Message) -> str | None:
            why = take(site, reply)
            if why is None:
                got.append(site.node_id)
            return None if why is None else f"{stage}: {why}"

        self.problems.collect(sorted(replies.items()), self.by_node, keep)
        self.problems.missing(missing, self.by_node)
        return sorted(got)

    def _enough(self, nodes: list[int], stage: str) -> bool:
        t = self.settings.threshold
        if len(nodes) >= t:
            return True
        absent = sorted(s.site for nid, s in self.by_node.items() if nid not in nodes)
        log.error(
            "%s: secure aggregation stopped at %s: %d of %d sites left, below the "
            "threshold %d (missing: %s); %s",
            self.label,
            stage,
            len(nodes),
            len(self.by_node),
            t,
            ", ".join(absent),
            self.kept_what,
        )
        return False

    kept_what = "global model kept"

    # ------------------------------------------------------------------ stage 0: keys
    def _setup_message(self, nid: int) -> Message:
        s = self.settings
        values = {"threshold": s.threshold, "clip-range": s.clip, "quant-range": s.quant}
        values |= {"modulus": s.modulus} | self._setup_values(nid)
        return self._message(nid, SETUP, values)

    def _take_keys(self, site: SiteInfo, reply: Message) -> str | None:
        record = _config(reply, RECORD)
        if record is None:
            return f"no {RECORD!r} record"
        pk1, pk2 = record.get("pk1"), record.get("pk2")
        if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
            return "public keys missing or not bytes"
        try:
            bytes_to_public_key(pk1), bytes_to_public_key(pk2)
        except Exception:
            return "public keys unreadable"
        taken = {k for pair in self.keys.values() for k in pair}
        if pk1 in taken or pk2 in taken or pk1 == pk2:
            return "public keys repeated"
        self.keys[site.node_id] = (pk1, pk2)
        return None

    # ------------------------------------------------------------------ stage 1: shares
    def _keys_message(self, active: list[int]) -> Callable[[int], Message]:
        values = {
            "nids": active,
            "pk1": [self.keys[n][0] for n in active],
            "pk2": [self.keys[n][1] for n in active],
        }
        return lambda nid: self._message(nid, SHARE_KEYS, values)

    def _take_shares(self, site: SiteInfo, reply: Message) -> str | None:
        record = _config(reply, RECORD)
        if record is None:
            return f"no {RECORD!r} record"
        dsts, cts = list(record.get("dsts", [])), list(record.get("ciphertexts", []))
        expected = set(self.keys) - {site.node_id}
        if len(dsts) != len(cts) or set(dsts) != expected or len(set(dsts)) != len(dsts):
            return f"shares for {len(dsts)} sites, expected one for each of {len(expected)}"
        if not all(isinstance(c, bytes) for c in cts):
            return "ciphertexts are not bytes"
        for dst, ct in zip(dsts, cts, strict=True):
            self.ciphertexts[(site.node_id, dst)] = ct
        return None

    def _with_shares(self, msg: Message, ready: list[int]) -> Message:
        """The caller's collect message (a strategy's train message, a statistics query),
        with the shares the other ready sites sent its site (a new content: the
        strategy's messages share one)."""
        nid = msg.metadata.dst_node_id
        srcs = [s for s in ready if s != nid and (s, nid) in self.ciphertexts]
        config = ConfigRecord(dict(msg.content.config_records["config"]))
        config[STAGE_KEY], config["server-round"] = COLLECT, self.round
        content = RecordDict(dict(msg.content.items()))
        content["config"] = config
        content[RECORD] = ConfigRecord(
            {"srcs": srcs, "ciphertexts": [self.ciphertexts[(s, nid)] for s in srcs]}
        )
        meta = msg.metadata
        return Message(
            content, dst_node_id=nid, message_type=meta.message_type, group_id=meta.group_id
        )

    # ------------------------------------------------------------------ stage 2: masked
    def _take_masked(self, site: SiteInfo, reply: Message) -> str | None:
        masked = reply.content.array_records.get(MASKED)
        if masked is None or set(masked.keys()) != {"factor", "vector"}:
            return f"no {MASKED!r} ArrayRecord with 'factor' and 'vector'"
        parts = [np.asarray(masked[k].numpy()) for k in ("factor", "vector")]
        shapes = [(self.factors,), (self.length,)]
        if [p.shape for p in parts] != shapes:
            return f"masked vector of shapes {[p.shape for p in parts]}, expected {shapes}"
        if any(not np.issubdtype(p.dtype, np.integer) for p in parts):
            return "masked vector is not integer"
        if any(p.size and (p.min() < 0 or p.max() >= self.settings.modulus) for p in parts):
            return f"masked values outside [0, modulus={self.settings.modulus})"
        if why := self._take_plain(site, reply):
            return why
        self.masked[site.node_id] = [p.astype(np.int64, copy=False) for p in parts]
        return None

    # ------------------------------------------------------------------ stage 3: unmask
    def _unmask_message(self, survivors: list[int], dead: list[int]) -> Callable[[int], Message]:
        self.asked = set(survivors) | set(dead)
        return lambda nid: self._message(nid, UNMASK, {"active": survivors, "dead": dead})

    def _take_unmask_shares(self, site: SiteInfo, reply: Message) -> str | None:
        record = _config(reply, RECORD)
        if record is None:
            return f"no {RECORD!r} record"
        nids, shares = list(record.get("nids", [])), list(record.get("shares", []))
        if len(nids) != len(shares) or len(set(nids)) != len(nids) or set(nids) != self.asked:
            return f"shares for nodes {sorted(nids)[:5]} not asked for"
        if not all(isinstance(s, bytes) and len(s) > 4 for s in shares):
            return "truncated or non-bytes shares"
        for owner, share in zip(nids, shares, strict=True):
            self.shares.setdefault(owner, []).append(share)
        return None

    def _unmask(self, survivors: list[int], dead: list[int]) -> list[np.ndarray] | None:
        """Remove the masks from the survivors' sum: each survivor's own mask from its
        reconstructed seed, and each dead site's pairwise masks from its reconstructed
        key (checked against the public key it sent). A failure: None (logged). Sums of
        int64 may wrap modulo 2^64: the result modulo the (power of 2) modulus holds."""
        s = self.settings
        total = [np.zeros_like(part) for part in self.masked[survivors[0]]]
        for nid in survivors:  # summed in place, modulo 2^64: no stack of every vector
            for t, part in zip(total, self.masked[nid], strict=True):
                t += part
        seeds: list[tuple[bytes, int]] = []
        try:
            for owner in survivors + dead:
                shares = self.shares.get(owner, [])
                if len(shares) < s.threshold:
                    raise ValueError(f"{len(shares)} shares for {self._name(owner)}")
                # any threshold shares determine the secret (Lagrange over t points, not
                # all: quadratic in the shares combined; a forged one fails either way)
                secret = combine_shares(shares[: s.threshold])
                if owner in survivors:
                    seeds.append((secret, -1))  # its own mask
                else:
                    seeds += self._pairwise(owner, secret, survivors)
        except ValueError as err:
            self._dropped(f"the masks could not be removed ({err}; a forged or truncated share)")
            return None
        add_masks(total, seeds, s.modulus)
        return total

    def _pairwise(self, dead: int, secret: bytes, survivors: list[int]) -> list[tuple[bytes, int]]:
        """The dead site's pairwise masks left in the survivors' sum, as (seed, sign) that
        remove them, from its key (checked against the public key it sent)."""
        sk1 = bytes_to_private_key(secret)
        if public_key_to_bytes(sk1.public_key()) != self.keys[dead][0]:
            raise ValueError(f"the key of {self._name(dead)} does not match its public key")
        return [
            (
                generate_shared_key(sk1, bytes_to_public_key(self.keys[nid][0])),
                1 if dead > nid else -1,
            )
            for nid in survivors
        ]

    def _dropped(self, why: str) -> None:
        log.error(
            "%s: secure aggregation dropped the %s: %s; %s (the culprit cannot be named "
            "under SecAgg+)",
            self.label,
            "round" if self.kind == MessageType.TRAIN else "exchange",
            why,
            self.kept_what,
        )

    def _name(self, nid: int) -> str:
        return f"site {self.by_node[nid].site}" if nid in self.by_node else f"node {nid}"


class SecureRound(SecureSum):
    """The four exchanges of one SecAgg+ training round over the sampled sites."""

    def __init__(
        self, run: RunConfig, send: Send, server_round: int, chosen: list[SiteInfo], timeout: float
    ) -> None:
        super().__init__(f"round {server_round}", send, server_round, chosen, timeout)
        try:  # checked at the run's start; fewer sites later (rollback exclusions): skipped
            self.settings = settings(run, len(chosen))
        except ConfigError as err:
            self.refused = str(err)
        if run.update_norm_factor > 0 and server_round == 1:
            log.warning(
                "update-norm-factor=%g compares each site's update, which SecAgg+ hides: not "
                "applied (each site clips its update to update-norm-cap before masking)",
                run.update_norm_factor,
            )
        weights = capped({s.site: s.n_train for s in chosen}, run.max_site_weight)
        self.top = max(weights.values()) or 1.0  # the largest weight maps to quant-range
        self.q = {
            s.node_id: round(weights[s.site] / self.top * self.settings.quant) for s in chosen
        }
        self.metrics: dict[int, MetricRecord] = {}

    def run(self, configure: Configure, wire: ArrayRecord) -> SecureUpdates:
        """The round's updates: the unmasked mean update of the survivors, or none."""
        updates = SecureUpdates(self.round, numpy_state(wire), self.problems)
        reference = updates.reference
        self.length = sum(reference[k].size for k in float_keys(reference))
        got = self.unmasked_sum(configure)
        if got is not None:
            self._mean(updates, *got)
        return updates

    def _setup_values(self, nid: int) -> dict[str, Any]:
        return {"weight-q": self.q[nid]}

    def _take_plain(self, site: SiteInfo, reply: Message) -> str | None:
        metrics = reply.content.metric_records.get("metrics")
        # the metrics checked as a train reply's; no weights travel (an empty record
        # against an empty layout: nothing to decode or compare per site)
        checked = RecordDict({"arrays": ArrayRecord()})
        if metrics is not None:
            checked["metrics"] = metrics
        if why := train_reply_error(checked, {}, site.n_train):
            return why
        self.metrics[site.node_id] = metrics
        return None

    def _mean(self, updates: SecureUpdates, survivors: list[int], total: list[np.ndarray]) -> None:
        """The survivors' mean update from their unmasked weighted sum; a weight or values
        that honest masked vectors cannot give drop the round."""
        s = self.settings
        q_total, summed = recovered(total, len(survivors), s.clip, s.quant)
        # the weight factors are exact integers: the sum is that of the sites that trained
        expected = sum(self.q[nid] for nid in survivors if _trained(self.metrics[nid]))
        if expected == 0:
            log.error("round %d: no surviving site trained; global model kept", self.round)
            return
        if q_total != expected or total[1].max() > len(survivors) * s.quant:
            self._dropped(
                f"the unmasked sum is out of range (weight {q_total}, expected {expected}): "
                "a forged share or masked vector"
            )
            return
        ratio = q_total / s.quant
        updates.unmasked(
            {self.by_node[nid].site: self.metrics[nid] for nid in survivors},
            summed / ratio,
            ratio * self.top,
            bound=len(survivors) * s.clip * 2 / s.quant / ratio,
        )


class SecureStats(SecureSum):
    """The head refit's statistics exchange under SecAgg+ (server/refit.py): the server
    learns the survivors' summed counts, class sums and moment (each part scaled by
    ``scales`` at the sites: common/secagg.py), never one site's. ``meta`` keeps each
    survivor's plaintext ``site`` record (its noise std and epsilon under DP)."""

    kind = f"{MessageType.QUERY}.{FEATURE_STATS}"
    factors = STATS_FACTORS
    kept_what = "head kept"

    def __init__(
        self,
        run: RunConfig,
        send: Send,
        server_round: int,
        chosen: list[SiteInfo],
        shape: tuple[int, int],
        scales: list[float],
    ) -> None:
        super().__init__("head calibration", send, server_round, chosen, run.round_timeout)
        try:
            self.settings = stats_settings(run, len(chosen))
        except ConfigError as err:
            self.refused = str(err)
        self.shape, self.scales = shape, [float(x) for x in scales]
        self.length = stats_length(*shape)
        self.meta: dict[int, ConfigRecord] = {}
        self.clipped = 0
        self.require_noise = run.dp  # under DP each site declares its noise std and epsilon

    def run(self, configure: Configure) -> tuple[list[str], dict[str, np.ndarray]] | None:
        """The sites whose statistics are in the total, and the total; None (logged) when
        the exchange stopped or its sum is one honest sites cannot give."""
        got = self.unmasked_sum(configure)
        if got is None:
            return None
        survivors, total = got
        s = self.settings
        sites, summed = recovered(total, len(survivors), s.clip, s.quant)
        self.clipped = int(total[0][1])
        if sites != len(survivors) or total[1].max() > len(survivors) * s.quant:
            self._dropped(
                f"the unmasked sum is out of range ({sites} sites summed, expected "
                f"{len(survivors)}): a forged share or masked vector"
            )
            return None
        names = sorted(self.by_node[nid].site for nid in survivors)
        return names, stats_of_vector(summed, *self.shape, self.scales)

    def error_bound(self, sites: int) -> list[float]:
        """How far each summed entry of ``sites`` sites may be from the exact sum, by part
        (counts, sums, moment): each site's entry rounds by less than one step, 2 clip /
        quant of its scale (stochastic rounding; no entry clipped)."""
        step = 2.0 * self.settings.clip / self.settings.quant
        return [sites * step * scale for scale in self.scales]

    def _setup_values(self, nid: int) -> dict[str, Any]:
        return {"weight-q": 1, "scales": self.scales}

    def _take_plain(self, site: SiteInfo, reply: Message) -> str | None:
        meta = reply.content.config_records.get("site", ConfigRecord())
        std, eps = meta.get("noise-std"), meta.get("epsilon")
        if self.require_noise and not (isinstance(std, float) and std > 0):
            return "noised statistics without a positive noise-std and an epsilon"
        if self.require_noise and not isinstance(eps, float):
            return "noised statistics without a positive noise-std and an epsilon"
        self.meta[site.node_id] = meta
        return None


def _trained(metrics: MetricRecord) -> bool:
    """Whether a site's collect reply says it trained (as the site weighs itself)."""
    return float(metrics.get("num-examples", 0)) > 0 and not metrics.get("dp-budget-exhausted")


def _config(reply: Message, name: str) -> ConfigRecord | None:
    return reply.content.config_records.get(name)
