"""The site's side of a SecAgg+ round: four train messages answered with Flower's primitives.

The head refit's statistics exchange runs the same four stages as ``query.feature_stats``
messages: at its collect stage the site computes its statistics as in the clear and masks
them, each part divided by the scale the server set at setup (common/secagg.py).

The server learns only the sum of the sites' weighted updates (common/secagg.py says what
travels). What the server can no longer check, the site enforces: it clips its own update
to ``update-norm-cap`` (its node config's, or the run config's where smaller or where the
node config is silent) before masking, and it weighs its update by the weight the server
assigned from its pinned size (a site cannot scale itself up inside the mask by saying it
holds more). A hospital that sets ``require-secure-aggregation = true`` in its node config
answers no plaintext training or statistics request (:func:`refuse_plaintext`).

Secret keys, seeds and the shares of the other sites stay in ``context.state`` (the
SuperNode's memory for the run); they are never put in a reply, except the shares the
unmask stage asks for, each for the role the site's own view allows (a seed share for a
site in ``active``, a key share for one in ``dead``, never both for one site).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from client.message import message_config
from common.config import value_of
from common.errors import SiteConfigError
from common.secagg import (
    COLLECT,
    MASKED,
    PREVIOUS,
    RECORD,
    SETUP,
    SHARE_KEYS,
    STAGE_KEY,
    STAGES,
    add_masks,
    flat_floats,
    float_keys,
    quantised,
    stats_vector,
)

log = logging.getLogger("fedskin")
STATE = "secagg-state"  # the site's record in context.state
REQUIRE_KEY = "require-secure-aggregation"  # node config
Train = Callable[[Message, Context], Message]


def stage_of(msg: Message) -> str | None:
    """The SecAgg+ stage a train message names, or None for a plaintext one."""
    stage = message_config(msg).get(STAGE_KEY)
    if stage is None:
        return None
    if stage not in STAGES:
        raise ValueError(f"the server's message: {STAGE_KEY}={stage!r} is not one of {STAGES}")
    return str(stage)


def requires_secure(context: Context) -> bool:
    """The site's ``require-secure-aggregation``; a value other than true or false fails
    closed (the site refuses, naming the value) rather than reading as false."""
    value = context.node_config.get(REQUIRE_KEY, False)
    if isinstance(value, bool):
        return value
    if (text := str(value).strip().lower()) in ("true", "false"):
        return text == "true"
    raise SiteConfigError(f"node config {REQUIRE_KEY}={value!r}: must be true or false")


def refuse_plaintext(context: Context, what: str) -> None:
    """A site whose node config sets ``require-secure-aggregation = true`` refuses a
    plaintext ``what`` request: one logged line, and the error reply carries no data."""
    if requires_secure(context):
        why = f"site refuses a plaintext {what} request: its node config sets {REQUIRE_KEY}=true"
        log.error(why)
        raise SiteConfigError(why)


def answer(msg: Message, context: Context, stage: str, train: Train) -> Message:
    """The reply to one stage; ValueError naming the defect for a malformed request."""
    sent = msg.content.config_records.get(RECORD)
    if sent is None:
        raise ValueError(f"secagg stage {stage}: the message has no {RECORD!r} record")
    server_round = int(message_config(msg).get("server-round", 0))
    if stage == SETUP:
        return _reply(msg, _setup(context, msg.metadata.dst_node_id, server_round, sent))
    state = context.state.config_records.get(STATE)
    if state is None or state["stage"] != PREVIOUS[stage] or state["round"] != server_round:
        had = "none" if state is None else f"{state['stage']} of round {state['round']}"
        raise ValueError(
            f"secagg stage {stage} of round {server_round} out of order (the site's last "
            f"stage: {had})"
        )
    if stage == SHARE_KEYS:
        out = _share_keys(state, sent)
    elif stage == COLLECT:
        return _collect(msg, context, state, sent, train)
    else:
        out = _unmask(state, sent)
    state["stage"] = stage
    return _reply(msg, out)


def _reply(msg: Message, values: dict[str, Any]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(values)}), reply_to=msg)


def _setup(context: Context, nid: int, server_round: int, sent: ConfigRecord) -> dict:
    """Two key pairs (masking, encrypting shares); the settings of the round kept."""
    keys = ("threshold", "clip-range", "quant-range", "modulus", "weight-q")
    missing = [k for k in keys if k not in sent]
    if missing:
        raise ValueError(f"secagg setup: missing {missing}")
    if not 0 <= int(sent["weight-q"]) <= int(sent["quant-range"]):
        raise ValueError(f"secagg setup: weight-q={sent['weight-q']} outside [0, quant-range]")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {k: sent[k] for k in keys}
    if "scales" in sent:  # a statistics exchange: [counts, sums, moment]
        scales = [float(x) for x in sent["scales"]]
        if len(scales) != 3 or not all(np.isfinite(x) and x > 0 for x in scales):
            raise ValueError(f"secagg setup: scales {scales} are not 3 positive numbers")
        state["scales"] = scales
    state.update(
        round=server_round,
        stage=SETUP,
        nid=int(nid),
        sk1=private_key_to_bytes(sk1),
        pk1=public_key_to_bytes(pk1),
        sk2=private_key_to_bytes(sk2),
        pk2=public_key_to_bytes(pk2),
    )
    context.state.config_records[STATE] = ConfigRecord(state)
    return {"pk1": state["pk1"], "pk2": state["pk2"]}


def _share_keys(state: ConfigRecord, sent: ConfigRecord) -> dict:
    """Check the relayed public keys; Shamir-share a fresh mask seed and the first secret
    key; encrypt each other site's pair of shares for it alone."""
    nids, pk1s, pk2s = list(sent["nids"]), list(sent["pk1"]), list(sent["pk2"])
    if not len(nids) == len(pk1s) == len(pk2s):
        raise ValueError("secagg share-keys: nids, pk1 and pk2 differ in length")
    if len(nids) < int(state["threshold"]):
        raise ValueError(f"secagg share-keys: {len(nids)} sites, below the threshold")
    if len(set(pk1s + pk2s)) != 2 * len(nids) or len(set(nids)) != len(nids):
        raise ValueError("secagg share-keys: repeated node ids or public keys")
    me = nids.index(state["nid"]) if state["nid"] in nids else -1
    if me < 0 or (pk1s[me], pk2s[me]) != (state["pk1"], state["pk2"]):
        raise ValueError("secagg share-keys: this site's own public keys are not relayed as sent")
    seed = os.urandom(32)
    t, n = int(state["threshold"]), len(nids)
    seed_shares, sk1_shares = create_shares(seed, t, n), create_shares(state["sk1"], t, n)
    sk2 = bytes_to_private_key(state["sk2"])
    dsts, ciphertexts = [], []
    for i, nid in enumerate(nids):
        if nid == state["nid"]:
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[i]))
        plain = share_keys_plaintext_concat(state["nid"], nid, seed_shares[i], sk1_shares[i])
        dsts.append(nid)
        ciphertexts.append(encrypt(key, plain))
    state.update(
        {"rd-seed": seed, "nids": nids, "pk1s": pk1s, "pk2s": pk2s}
        | {"owners": [state["nid"]], "seed-shares": [seed_shares[me]]}
        | {"sk1-shares": [sk1_shares[me]]}
    )
    return {"dsts": dsts, "ciphertexts": ciphertexts}


def _collect(
    msg: Message, context: Context, state: ConfigRecord, sent: ConfigRecord, answer_plain: Train
) -> Message:
    """Keep the shares sent to this site; answer the request as in the clear (train, or
    compute the feature statistics); reply with its masked vector and the plaintext part
    (train metrics, or the statistics' noise std and epsilon), never weights or data."""
    srcs, ciphertexts = list(sent["srcs"]), list(sent["ciphertexts"])
    if len(srcs) != len(ciphertexts):
        raise ValueError("secagg collect: srcs and ciphertexts differ in length")
    if len(srcs) + 1 < int(state["threshold"]):
        raise ValueError(f"secagg collect: shares from {len(srcs)} sites, below the threshold")
    _keep_shares(state, srcs, ciphertexts)
    reply = answer_plain(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN:
        factor, values, content = _training(msg, reply, context, state)
    else:
        factor, values, content = _statistics(reply, state)
    modulus, clip, quant = (
        int(state["modulus"]),
        float(state["clip-range"]),
        int(state["quant-range"]),
    )
    vector = quantised(values, factor, clip, quant)
    sk1 = bytes_to_private_key(state["sk1"])
    pk1_of = dict(zip(state["nids"], state["pk1s"], strict=True))
    seeds = [(bytes(state["rd-seed"]), 1)]  # its own mask, then one per site whose shares arrived
    for src in srcs:
        key = generate_shared_key(sk1, bytes_to_public_key(pk1_of[src]))
        seeds.append((key, 1 if state["nid"] > src else -1))
    add_masks(vector, seeds, modulus)  # int64: wraps modulo 2^64, reduced modulo the modulus
    dtype = np.uint32 if modulus <= 2**32 else np.int64
    masked = {
        name: Array(part.astype(dtype, copy=False))
        for name, part in zip(("factor", "vector"), vector, strict=True)
    }
    state["stage"] = COLLECT
    content[MASKED] = ArrayRecord(masked)
    if "site" in reply.content.config_records:
        content["site"] = reply.content.config_records["site"]
    return Message(content, reply_to=msg)


def _training(
    msg: Message, reply: Message, context: Context, state: ConfigRecord
) -> tuple[list[int], np.ndarray, RecordDict]:
    """A trained site's weight factor and its clipped update weighted by ``q / quant``."""
    metrics = reply.content.metric_records["metrics"]
    trained = float(metrics.get("num-examples", 0)) > 0 and not metrics.get("dp-budget-exhausted")
    received, sent_back = msg.content.array_records["arrays"], reply.content.array_records["arrays"]
    keys = float_keys(received)
    update = flat_floats(sent_back, keys) - flat_floats(received, keys)
    update = clipped(update, site_norm_cap(context))
    q = int(state["weight-q"]) if trained else 0
    weighted = update * (q / int(state["quant-range"]))
    clip = float(state["clip-range"])
    if beyond := int((np.abs(weighted) > clip).sum()):
        log.warning(
            "site: %d weighted update entries beyond secagg-clip-range=%g are clipped; the "
            "federation's sum will be off in them",
            beyond,
            clip,
        )
    return [q], weighted, RecordDict({"metrics": metrics})


def _statistics(reply: Message, state: ConfigRecord) -> tuple[list[int], np.ndarray, RecordDict]:
    """The site's feature statistics scaled by the server's scales (common/secagg.py:
    stats_vector), and ``[1, entries beyond the range]`` (they are clipped; the server
    learns only the federation's count)."""
    if "scales" not in state:
        raise ValueError("secagg collect: a statistics request without the setup's scales")
    stats = {k: v.numpy() for k, v in reply.content.array_records["stats"].items()}
    values = stats_vector(stats, [float(x) for x in state["scales"]])
    beyond = int((np.abs(values) > float(state["clip-range"])).sum())
    if beyond:
        log.warning(
            "site: %d feature-statistics entries beyond the SecAgg+ range are clipped", beyond
        )
    return [1, beyond], values, RecordDict()


def _keep_shares(state: ConfigRecord, srcs: list[int], ciphertexts: list[bytes]) -> None:
    """Decrypt the shares other sites sent this one; each must come from the site it names
    and be addressed to this site (ValueError naming the mismatch)."""
    sk2 = bytes_to_private_key(state["sk2"])
    pk2_of = dict(zip(state["nids"], state["pk2s"], strict=True))
    owners, seeds, sk1s = (
        list(state["owners"]),
        list(state["seed-shares"]),
        list(state["sk1-shares"]),
    )
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in pk2_of or src == state["nid"]:
            raise ValueError(f"secagg collect: shares from node {src}, not a site of this round")
        key = generate_shared_key(sk2, bytes_to_public_key(pk2_of[src]))
        try:
            actual, dst, seed_share, sk1_share = share_keys_plaintext_separate(
                decrypt(key, ciphertext)
            )
        except Exception:
            raise ValueError(f"secagg collect: the shares from node {src} do not decrypt") from None
        if actual != src or dst != state["nid"]:
            raise ValueError(
                f"secagg collect: a share for the wrong site (from node {actual} to node {dst}, "
                f"relayed as from node {src} to this site, node {state['nid']})"
            )
        owners.append(src)
        seeds.append(seed_share)
        sk1s.append(sk1_share)
    state.update({"owners": owners, "seed-shares": seeds, "sk1-shares": sk1s})


def _unmask(state: ConfigRecord, sent: ConfigRecord) -> dict:
    """The seed shares of the surviving sites and the key shares of the dropped ones."""
    active, dead = list(sent["active"]), list(sent["dead"])
    if len(active) < int(state["threshold"]):
        raise ValueError(f"secagg unmask: {len(active)} surviving sites, below the threshold")
    if set(active) & set(dead):
        raise ValueError("secagg unmask: a site listed both as surviving and dropped")
    if state["nid"] not in active:
        raise ValueError("secagg unmask: this site is not listed among the survivors")
    index = {nid: i for i, nid in enumerate(state["owners"])}
    unknown = [nid for nid in active + dead if nid not in index]
    if unknown:
        raise ValueError(f"secagg unmask: no shares held for nodes {unknown}")
    shares = [state["seed-shares"][index[n]] for n in active]
    shares += [state["sk1-shares"][index[n]] for n in dead]
    return {"nids": active + dead, "shares": shares}


def site_norm_cap(context: Context) -> float:
    """The norm a site clips its update to: the smaller positive of its node config's
    ``update-norm-cap`` and the run's (0: no cap)."""
    run = value_of(context.run_config, "update-norm-cap")  # one key, no whole config built
    given = context.node_config.get("update-norm-cap") not in (None, "")
    own = value_of(context.node_config, "update-norm-cap") if given else 0.0
    caps = [c for c in (run, own) if c > 0]
    return min(caps) if caps else 0.0


def clipped(update: np.ndarray, cap: float) -> np.ndarray:
    """``update`` scaled down to norm ``cap`` when it is longer (cap 0: as it is)."""
    norm = float(np.linalg.norm(update))
    return update * (cap / norm) if cap > 0 and norm > cap else update
