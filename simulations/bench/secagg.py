"""6. The cost of SecAgg+: round time, bytes a site sends, server memory, with and without.

Round time and the driver's peak memory come from real Flower simulations (the ServerApp
runs in this process; the sites in Ray actors), run plain and under SecAgg+ back to back with
the same settings; the round time is the last round's (the first includes warm-up). Bytes
are the protobuf sizes (Flower's own serde) of the records one site sends in a round, built
with the same primitives the site uses (client/secagg.py): plain, its packed weights; under
SecAgg+, its two public keys, one encrypted pair of shares per other site, the masked vector
(factor and vector, int64 under the default modulus) and its unmask shares. The train
metrics, sent alike in both, are left out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from rich.console import Console

from common.config import RunConfig
from common.models import build_model
from common.secagg import MASKED, RECORD, float_keys
from common.wire import pack
from server.results import load_results
from simulations.bench.measure import SectionTable, fmt
from simulations.bench.memory import reset_peak_rss, vm_kb
from simulations.bench.settings import NUM_CLASSES, TARGETS, BenchSettings
from simulations.runner import simulate

MODES = ("none", "secagg+")


def bench_secagg(
    s: BenchSettings, console: Console, workdir: Path
) -> tuple[dict[str, Any], SectionTable]:
    """Plain against SecAgg+ rounds for each model and number of sites in ``s``."""
    rows: list[dict[str, Any]] = []
    for model in s.secagg_models:
        for sites in s.secagg_sites:
            for mode in MODES:
                console.log(f"[6] {model}, {sites} sites, secure-aggregation={mode}")
                row = _simulated(s, model, sites, mode, workdir / f"{model}-{sites}-{mode}")
                row["bytes_per_site"] = reply_bytes(model, sites, mode)
                rows.append(row)
    return {"rows": rows, "cpu_count": os.cpu_count() or 1}, _table(s, rows)


def _simulated(s: BenchSettings, model: str, sites: int, mode: str, out: Path) -> dict[str, Any]:
    overrides = {
        "model": model,
        "image-size": s.image_size,
        "batch-size": s.batch_size,
        "num-server-rounds": s.secagg_rounds,
        "builtin-images": max(s.secagg_images_per_site * sites, 300),
        "scheme": "iid",
        "num-sites": sites,
        "local-epochs": 1,
        "local-steps": 0,
        "run-name": "bench-secagg",
        "strategy": "fedavg",
        "secure-aggregation": mode,
    }
    measured = reset_peak_rss()
    t0 = time.perf_counter()
    simulate(overrides=overrides, out=out)
    rounds = load_results(out).rounds
    return {
        "model": model,
        "sites": sites,
        "mode": mode,
        "total_seconds": time.perf_counter() - t0,
        "round_seconds": float(rounds[-1].seconds),
        "aggregated": sum(r.aggregated for r in rounds),
        "rounds": len(rounds),
        "driver_peak_rss_mb": vm_kb("VmHWM") / 1024 if measured else float("nan"),
    }


def _size(records: dict[str, Any]) -> int:
    return int(recorddict_to_proto(RecordDict(records)).ByteSize())


def reply_bytes(model: str, sites: int, mode: str) -> int:
    """Protobuf bytes of the records one of ``sites`` sites sends in one round."""
    state = build_model(model, NUM_CLASSES).state_dict()
    if mode == "none":
        return _size({"arrays": pack(state)})
    length = sum(int(state[k].numel()) for k in float_keys(state))
    masked = {"factor": np.zeros(1, np.int64), "vector": np.zeros(length, np.int64)}
    masked_rec = ArrayRecord({k: Array(v) for k, v in masked.items()})
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    keys = ConfigRecord({"pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2)})
    t = max(2, round(RunConfig().secagg_threshold * sites))
    seed_shares = create_shares(os.urandom(32), t, sites)
    sk1_shares = create_shares(private_key_to_bytes(sk1), t, sites)
    _, other_pk = generate_key_pairs()
    shared = generate_shared_key(sk2, other_pk)
    plain = share_keys_plaintext_concat(1, 2, seed_shares[1], sk1_shares[1])
    ciphertexts = [encrypt(shared, plain) for _ in range(sites - 1)]
    shares = ConfigRecord({"dsts": list(range(sites - 1)), "ciphertexts": ciphertexts})
    unmask = ConfigRecord({"nids": list(range(sites)), "shares": seed_shares})
    return sum(
        _size(r) for r in ({RECORD: keys}, {RECORD: shares}, {MASKED: masked_rec}, {RECORD: unmask})
    )


def _table(s: BenchSettings, rows: list[dict[str, Any]]) -> SectionTable:
    table = SectionTable(
        f"6. SecAgg+ cost: last of {s.secagg_rounds} FedAvg rounds, 1 local epoch, "
        f"{s.secagg_images_per_site} images per site at {s.image_size} px, Flower "
        "Simulation Engine",
        [
            "model",
            "sites",
            "plain round s",
            "SecAgg+ round s",
            "ratio",
            "plain MB/site",
            "SecAgg+ MB/site",
            "plain server MB",
            "SecAgg+ server MB",
        ],
    )
    plain = {(r["model"], r["sites"]): r for r in rows if r["mode"] == "none"}
    for r in rows:
        if r["mode"] == "none":
            continue
        p = plain[(r["model"], r["sites"])]
        table.rows.append(
            [
                r["model"],
                str(r["sites"]),
                fmt(p["round_seconds"], 2),
                fmt(r["round_seconds"], 2),
                fmt(r["round_seconds"] / p["round_seconds"], 2) + "x",
                fmt(p["bytes_per_site"] / 1e6, 2),
                fmt(r["bytes_per_site"] / 1e6, 2),
                fmt(p["driver_peak_rss_mb"], 0),
                fmt(r["driver_peak_rss_mb"], 0),
            ]
        )
    table.notes.append(
        "round s: the last round's wall time (training, the SecAgg+ stages, validation at "
        "every site); server MB: the driver's peak RSS (VmHWM, ServerApp and simulation "
        "driver together); MB/site: protobuf bytes of what one site sends in one round "
        "(weights, or keys + encrypted shares + masked vector + unmask shares)"
    )
    table.notes.append(
        f"target: a 6-site regnetx_002 SecAgg+ round <= {TARGETS['secagg_round_ratio']}x "
        f"the plain round; {os.cpu_count()} CPU cores, shared with other jobs: ratios, "
        "not absolute times, carry over"
    )
    return table
