"""SecAgg+ rounds (server/secagg.py, client/secagg.py) through the real ClientApp.

Each site is the real ``client.client_app.app`` on a simulated partition of the built-in
synthetic set, answered in process by :class:`AppGrid` (a FakeGrid); the server is the real
``Federation``. The same round is run in the clear and under SecAgg+, and the global models
compared array by array within the quantisation bound the settings imply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Error, Message, MessageType, RecordDict

from client.client_app import app
from client.message import message_config
from common.config import ConfigError, RunConfig
from common.data.schema import HAM_CLASSES
from common.protocol import FEATURE_STATS
from common.secagg import (
    COLLECT,
    MASKED,
    RECORD,
    SHARE_KEYS,
    STAGE_KEY,
    add_masks,
    mask,
    stats_vector,
    step,
)
from common.wire import pack
from server.arrays import array_record
from server.lda import classifier_keys, dp_projection, lda_head
from server.loop import Federation
from server.refit import HeadRefit
from server.secagg import SECURE_TOTAL, settings, stats_settings
from server.server_app import initial_model, statistics_of
from server.transport import exchange
from tests.helpers import TINY, FakeGrid, assign_message_id

SITES = 3
STATS_KIND = f"{MessageType.QUERY}.{FEATURE_STATS}"
RUN = {
    **TINY,
    "num-server-rounds": 1,
    "local-epochs": 1,
    "local-steps": 2,
    "max-site-weight": 1.0,
    "round-timeout": 1.0,  # a silent site costs this much
    "secagg-threshold": 2,
}


@pytest.fixture(autouse=True)
def _identity():
    from simulations.flower_adapter import task_identity

    with task_identity(run_id=1):
        yield


class AppGrid(FakeGrid):
    """Every node is the real ClientApp with its own context; ``silent`` maps a node to
    the stage (or "train") from which it stops answering; every reply is recorded."""

    def __init__(self, run: Mapping[str, Any], node: Mapping[int, dict] | None = None) -> None:
        node = node or {}
        contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": SITES, **node.get(i, {})},
                state=RecordDict(),
                run_config=dict(run),
            )
            for i in range(SITES)
        }
        super().__init__(contexts)
        self.silent: dict[int, str] = {}
        self.received: list[Message] = []
        self.tamper: Any = None  # (message, reply) -> reply, for forged replies

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids, out = set(message_ids), []
        for m in self.outbox:
            if m.metadata.message_id not in ids or self._silent(m):
                continue
            reply = self.answer(m)
            if self.tamper is not None:
                reply = self.tamper(m, reply)
            self.received.append(reply)
            out.append(reply)
        return out

    def _silent(self, m: Message) -> bool:
        """Silent from a training stage (``collect``...) or a statistics one
        (``feature_stats:collect``...); a plaintext request counts as its collect."""
        stage = message_config(m).get(STAGE_KEY, COLLECT)
        if m.metadata.message_type == STATS_KIND:
            stage = f"{FEATURE_STATS}:{stage}"
        elif m.metadata.message_type != MessageType.TRAIN:
            return False
        return self.silent.get(m.metadata.dst_node_id) == stage

    def answer(self, msg: Message) -> Message:
        try:
            return app(msg, self.nodes[msg.metadata.dst_node_id])
        except Exception as err:  # what Flower's runtime sends back for a raising app
            return Message(Error(code=0, reason=str(err)), reply_to=msg)


def run_round(tmp: Path, grid_values: dict, node: dict | None = None, silent=None, tamper=None):
    """One round of a real Federation; the new global model's state, the grid, the run."""
    run = RunConfig.from_mapping({**RUN, **grid_values})
    flat = run.to_flat()
    grid = AppGrid(flat, node)
    grid.silent, grid.tamper = dict(silent or {}), tamper
    fed = Federation(grid, RunConfig.from_flat(flat), tmp, list(HAM_CLASSES))  # type: ignore[arg-type]
    fed.discover(expected=SITES, wait=0)
    model = initial_model(run, len(HAM_CLASSES))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = classifier_keys(model)  # refitted only with head-calibration = lda
    result = fed.run(initial, 1, resume=False, statistics=statistics_of(model), head=head)
    arrays = torch.load(tmp / "checkpoints" / "last.pt", weights_only=True)["arrays"]
    return {k: v.numpy() for k, v in arrays.items()}, initial, grid, result


def quantisation_bound(result: dict, sizes: dict[str, float], run: RunConfig) -> float:
    """Each element of the survivors' mean update is off by less than n steps over the
    summed weight share (stochastic rounding: < 1 step per site and element)."""
    trained = result["rounds"][0]["train"]
    top = max(sizes.values())
    ratio = sum(sizes[s] / top for s in trained)
    return len(trained) * step(run.secagg_clip_range, run.secagg_quant_range) / ratio


def sizes_of(grid: AppGrid) -> dict[str, float]:
    out = {}
    for ctx in grid.nodes.values():
        query = Message(RecordDict({}), dst_node_id=ctx.node_id, message_type=MessageType.QUERY)
        info = app(assign_message_id(query, "q"), ctx).content.config_records["info"]
        out[str(info["site"])] = float(info["n-train"])
    return out


CASES = {
    "fedavg": {},
    "fedavg-dp": {"dp": True, "noise-multiplier": 0.5, "target-epsilon": 1000.0},
    "fedbn": {"personalize": "fedbn"},
    "fedprox": {"strategy": "fedprox", "proximal-mu": 0.1},  # the sites' term: same sum
    "fedavgm": {"strategy": "fedavgm", "server-lr": 1.0},  # momentum starts from the mean
    "ditto": {"personalize": "ditto"},  # the personal model stays in the site's state
    "finetune": {"personalize": "finetune", "finetune-steps": 2},  # at the site, for the test
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_secure_round_equals_the_plaintext_round(case: str, tmp_path: Path) -> None:
    values = CASES[case]
    plain, initial, grid, _ = run_round(tmp_path / "plain", values)
    secure, _, secure_grid, result = run_round(
        tmp_path / "secure", {**values, "secure-aggregation": "secagg+"}
    )
    run = RunConfig.from_mapping({**RUN, **values})
    bound = quantisation_bound(result, sizes_of(grid), run)
    assert result["rounds"][0]["aggregated"] and sorted(result["rounds"][0]["train"])
    # no weights leave a site (a personal model least of all): only masked vectors
    assert all(set(r.content.array_records) <= {MASKED} for r in secure_grid.received)
    if values.get("personalize") in ("ditto", "fedbn"):  # personal state kept at each site
        assert all(ctx.state.array_records for ctx in secure_grid.nodes.values())
    moved = 0.0
    for k, ref in plain.items():
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(secure[k], ref, rtol=0, atol=bound + 1e-6, err_msg=k)
            moved = max(moved, float(np.abs(ref - initial[k].numpy()).max()))
        else:
            np.testing.assert_array_equal(secure[k], ref, err_msg=k)
    assert moved > 100 * bound  # the round did move the model: the comparison means something


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_fedadam_steps_from_the_unmasked_mean(strategy: str, tmp_path: Path) -> None:
    """FedAdam's (and FedYogi's) step is sign-like (m / sqrt(v)) where the mean update is
    tiny, so the two runs are compared where the plaintext mean update is far above the
    quantisation bound, and the server learning rate bounds the step everywhere."""
    values = {"strategy": strategy}
    plain, initial, grid, _ = run_round(tmp_path / "plain", values)
    secure, _, _, result = run_round(
        tmp_path / "secure", {**values, "secure-aggregation": "secagg+"}
    )
    plain_avg, _, _, _ = run_round(tmp_path / "avg", {})  # the same sites' FedAvg mean
    run = RunConfig.from_mapping({**RUN, **values})
    bound = quantisation_bound(result, sizes_of(grid), run)
    compared = 0
    for k, ref in plain.items():
        if not np.issubdtype(ref.dtype, np.floating) or k in statistics_of(initial_model(run, 7)):
            continue
        mean = plain_avg[k].astype(np.float64) - initial[k].numpy()
        clear = np.abs(mean) > 1000 * bound
        # there Adam's step moves by at most server-lr x the mean's relative error (< 1e-3)
        atol = 2e-3 * run.server_lr + 1e-6
        np.testing.assert_allclose(secure[k][clear], ref[clear], rtol=0, atol=atol, err_msg=k)
        assert np.abs(secure[k] - ref).max() <= 2.5 * run.server_lr, k
        compared += int(clear.sum())
    assert compared > 100


def masked_replies(grid: AppGrid) -> list[Message]:
    return [r for r in grid.received if r.has_content() and MASKED in r.content.array_records]


def test_the_server_sees_only_masked_vectors_and_the_right_sum(tmp_path: Path) -> None:
    """Every reply of a SecAgg+ round: no weights in any; each masked vector is
    uncorrelated with its site's true update and spread uniformly over the modulus."""
    plain, initial, plain_grid, _ = run_round(tmp_path / "plain", {})
    secure, _, grid, result = run_round(tmp_path / "secure", {"secure-aggregation": "secagg+"})
    assert all(
        not r.content.array_records or set(r.content.array_records) == {MASKED}
        for r in grid.received
        if r.has_content() and not r.content.config_records.get("info")
    )
    wire = pack(initial)
    keys = sorted(k for k in wire.keys() if "f" in k)
    truth = {}
    for r in plain_grid.received:
        if r.has_content() and "arrays" in r.content.array_records:
            arrays = r.content.array_records["arrays"]
            site = str(r.content.config_records["site"]["site"])
            truth[site] = np.concatenate(
                [arrays[k].numpy().astype(np.float64) - wire[k].numpy() for k in keys]
            )
    masked = masked_replies(grid)
    assert len(masked) == SITES == len(truth)
    modulus = RunConfig.defaults().secagg_modulus
    for r in masked:
        site = str(r.content.config_records["site"]["site"])
        vector = r.content.array_records[MASKED]["vector"].numpy().astype(np.float64)
        corr = np.corrcoef(vector, truth[site])[0, 1]
        assert abs(corr) < 0.05, (site, corr)
        # uniform over [0, modulus): mean and spread as a uniform's, whatever the update
        assert (
            abs(vector.mean() / modulus - 0.5) < 0.02
            and abs(vector.std() / modulus - 0.2887) < 0.02
        )
    for k, ref in plain.items():  # and yet the sum is the plaintext one
        np.testing.assert_allclose(secure[k], ref, atol=1e-4)


def test_a_site_dropping_after_the_key_exchange_leaves_the_survivors_mean(
    tmp_path: Path, caplog
) -> None:
    gone = {102: COLLECT}  # vidir_molemax answers the key exchange, then nothing
    plain, _, grid, _ = run_round(tmp_path / "plain", {}, silent=gone)
    secure, _, _, result = run_round(
        tmp_path / "secure", {"secure-aggregation": "secagg+"}, silent=gone
    )
    record = result["rounds"][0]
    assert record["aggregated"] and sorted(record["train"]) == ["rosendahl", "vidir_modern"]
    assert "vidir_molemax" in record["failures"]
    bound = quantisation_bound(result, sizes_of(grid), RunConfig.from_mapping(RUN))
    for k, ref in plain.items():
        np.testing.assert_allclose(secure[k], ref, atol=bound + 1e-6, err_msg=k)


def test_below_the_threshold_the_round_is_skipped_and_the_model_kept(
    tmp_path: Path, caplog
) -> None:
    values = {"secure-aggregation": "secagg+", "secagg-threshold": 3}
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        secure, initial, _, result = run_round(tmp_path, values, silent={101: COLLECT})
    assert not result["rounds"][0]["aggregated"]
    for k, v in initial.items():
        np.testing.assert_array_equal(secure[k], v.numpy(), err_msg=k)
    line = next(r.getMessage() for r in caplog.records if "below the threshold" in r.getMessage())
    assert "2 of 3 sites left" in line and "missing: vidir_modern" in line and "model kept" in line


def test_a_site_requiring_secure_aggregation_refuses_plaintext(tmp_path: Path, caplog) -> None:
    node = {0: {"require-secure-aggregation": True}}
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        _, _, grid, result = run_round(tmp_path / "plain", {}, node=node)
    assert "rosendahl" in result["rounds"][0]["failures"]
    refused = [r for r in grid.received if r.has_error()]
    assert len(refused) == 1 and "require-secure-aggregation=true" in refused[0].error.reason
    assert not refused[0].has_content()  # nothing of the site's leaves with the refusal
    said = [r for r in caplog.records if r.getMessage().startswith("site refuses a plaintext")]
    assert len(said) == 1 and said[0].module == "secagg"
    _, _, _, result = run_round(tmp_path / "secure", {"secure-aggregation": "secagg+"}, node=node)
    assert sorted(result["rounds"][0]["train"]) == ["rosendahl", "vidir_modern", "vidir_molemax"]


def test_a_misspelt_requirement_fails_closed_naming_the_value(tmp_path: Path) -> None:
    node = {0: {"require-secure-aggregation": "yes"}}  # not true/false: never read as false
    _, _, grid, result = run_round(tmp_path / "plain", {}, node=node)
    assert "rosendahl" in result["rounds"][0]["failures"]
    refused = [r for r in grid.received if r.has_error()]
    assert len(refused) == 1 and "require-secure-aggregation='yes'" in refused[0].error.reason
    assert not refused[0].has_content()


def test_a_threshold_above_the_sites_stops_the_run_before_any_site_trains(tmp_path) -> None:
    values = {"secure-aggregation": "secagg+", "secagg-threshold": 4}
    with pytest.raises(ConfigError, match=r"^secagg-threshold=4 needs 4 sites to unmask, but 3"):
        run_round(tmp_path, values)


def test_bad_settings_each_give_one_line() -> None:
    run = RunConfig.from_mapping({"secure-aggregation": "secagg+", "secagg-threshold": 5})
    with pytest.raises(ConfigError) as err:
        settings(run, 4)
    assert str(err.value) == (
        "secagg-threshold=5 needs 5 sites to unmask, but 4 are sampled per round (secure "
        "aggregation needs at least 2)"
    )
    for strategy in ("fedmedian", "krum", "bulyan"):
        with pytest.raises(ConfigError, match=f"strategy={strategy} needs each site's update"):
            RunConfig.from_mapping({"secure-aggregation": "secagg+", "strategy": strategy})
    with pytest.raises(ConfigError, match="power of 2"):
        RunConfig.from_mapping({"secure-aggregation": "secagg+", "secagg-modulus": 3 * 2**30})


def truncate_shares(msg: Message, reply: Message) -> Message:
    """vidir_modern's key-sharing reply loses its last ciphertext."""
    if msg.metadata.dst_node_id == 101 and message_config(msg).get(STAGE_KEY) == SHARE_KEYS:
        record = reply.content.config_records[RECORD]
        record["dsts"], record["ciphertexts"] = record["dsts"][:-1], record["ciphertexts"][:-1]
    return reply


def test_a_truncated_stage_reply_rejects_that_site_by_name(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        _, _, _, result = run_round(
            tmp_path, {"secure-aggregation": "secagg+"}, tamper=truncate_shares
        )
    record = result["rounds"][0]
    assert record["aggregated"] and sorted(record["train"]) == ["rosendahl", "vidir_molemax"]
    assert (
        "share-keys: shares for 1 sites, expected one for each of 2"
        in record["rejected"]["vidir_modern"]
    )


def test_a_share_for_the_wrong_site_is_refused_by_the_site(tmp_path: Path, caplog) -> None:
    """The server relays to rosendahl the shares vidir_modern encrypted for vidir_molemax:
    rosendahl cannot decrypt them and says so in one line; the others go on."""
    original = AppGrid.push_messages

    def swap(self: AppGrid, messages):
        messages = list(messages)
        for m in messages:
            if message_config(m).get(STAGE_KEY) == COLLECT and m.metadata.dst_node_id == 100:
                record = m.content.config_records[RECORD]
                record["ciphertexts"] = [self.stolen] + list(record["ciphertexts"])[1:]
            if message_config(m).get(STAGE_KEY) == COLLECT and m.metadata.dst_node_id == 102:
                self.stolen = m.content.config_records[RECORD]["ciphertexts"][0]
        return original(self, messages)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AppGrid, "push_messages", swap)
        mp.setattr(AppGrid, "stolen", b"", raising=False)
        _, _, _, result = run_round(tmp_path, {"secure-aggregation": "secagg+"})
    record = result["rounds"][0]
    assert "secagg collect" in record["failures"]["rosendahl"]
    assert record["aggregated"] and sorted(record["train"]) == ["vidir_modern", "vidir_molemax"]


def mean_update_norm(new: dict[str, np.ndarray], initial: dict[str, torch.Tensor]) -> float:
    return float(
        np.sqrt(
            sum(
                float(((new[k].astype(np.float64) - v.numpy()) ** 2).sum())
                for k, v in initial.items()
                if v.is_floating_point()
            )
        )
    )


def test_sites_clip_to_the_norm_cap_and_the_server_checks_the_sum(tmp_path: Path, caplog) -> None:
    """Each site clips its own update to update-norm-cap (the smaller of its node
    config's and the run's): the mean update stays within the cap. Sites that do not clip
    (here: none of them) give a sum above it: the round is dropped, the model kept."""
    cap = 1e-3  # far below what two Adam steps move the tiny model
    values = {"secure-aggregation": "secagg+", "update-norm-cap": 1.0}
    node = {i: {"update-norm-cap": cap} for i in range(SITES)}
    secure, initial, _, result = run_round(tmp_path / "clipped", values, node=node)
    assert result["rounds"][0]["aggregated"]
    assert 0.5 * cap < mean_update_norm(secure, initial) <= cap * 1.01
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.ERROR, logger="fedskin"):
        mp.setattr("client.secagg.site_norm_cap", lambda context: 0.0)
        kept, initial, _, result = run_round(
            tmp_path / "unclipped", {**values, "update-norm-cap": cap}
        )
    assert not result["rounds"][0]["aggregated"]
    assert mean_update_norm(kept, initial) == 0.0
    line = next(
        r.getMessage() for r in caplog.records if "exceeds update-norm-cap" in r.getMessage()
    )
    assert "round dropped, global model kept" in line and "cannot be named under SecAgg+" in line


def forged_vector(msg: Message, reply: Message) -> Message:
    """vidir_modern's masked vector replaced by random values of the right form."""
    if msg.metadata.dst_node_id == 101 and reply.has_content() and MASKED in reply.content:
        vector = reply.content.array_records[MASKED]["vector"].numpy()
        rng = np.random.default_rng(0)
        forged = rng.integers(0, RunConfig.defaults().secagg_modulus, vector.shape)
        reply.content.array_records[MASKED]["vector"] = Array(forged.astype(vector.dtype))
    return reply


def test_a_forged_masked_vector_drops_the_round(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        kept, initial, _, result = run_round(
            tmp_path, {"secure-aggregation": "secagg+"}, tamper=forged_vector
        )
    assert not result["rounds"][0]["aggregated"]
    assert mean_update_norm(kept, initial) == 0.0
    line = next(r.getMessage() for r in caplog.records if "out of range" in r.getMessage())
    assert "a forged share or masked vector" in line and "cannot be named" in line


# ------------------------------------------------------------------ the head refit's statistics
def stats_exchange(tmp: Path, values: dict, node: dict | None = None, silent=None):
    """One statistics exchange of a real HeadRefit with the real ClientApp sites, on the
    run's initial model: (entries, problems, noise, members), the refit, the grid."""
    run = RunConfig.from_mapping({**RUN, "head-calibration": "lda", **values})
    flat = run.to_flat()
    grid = AppGrid(flat, node)
    grid.silent = dict(silent or {})
    fed = Federation(grid, RunConfig.from_flat(flat), tmp, list(HAM_CLASSES))  # type: ignore[arg-type]
    fed.discover(expected=SITES, wait=0)
    model = initial_model(run, len(HAM_CLASSES))
    arrays = array_record({k: v.detach().numpy() for k, v in model.state_dict().items()})
    private = None
    if run.dp:  # the query's projection, from the model alone (as the refit makes it)
        centre, projection = dp_projection(model, run.image_size, run.dp_head_dims, run.seed)
        private = {"centre": centre, "projection": projection}
    refit = HeadRefit(
        run,
        list(HAM_CLASSES),
        fed.ordered_sites(),
        lambda messages, what: exchange(grid, messages, run.round_timeout),  # type: ignore[arg-type]
        lambda *args, **kwargs: {},
    )
    got = refit.statistics(arrays, classifier_keys(model)[0], "tag", 2, private)
    return got, refit, grid, (arrays, private)


def summed(stats: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    stats = list(stats)
    return {k: sum(np.asarray(s[k], np.float64) for s in stats) for k in stats[0]}


def head_bound(stats: Mapping[str, np.ndarray], err: list[float], shrinkage: float = 0.1) -> float:
    """A bound on the change of the LDA head ``[W | b]`` (Frobenius) when the summed counts
    are exact and every class sum and moment entry moves by at most ``err[1]``,
    ``err[2]``: perturbation of ``W = means C^-1`` (server/lda.py: lda_head) through the
    means (``err / count``), the scatter, the shrunk covariance and the solve."""
    n, s, m = (np.asarray(stats[k], np.float64) for k in ("counts", "sums", "moment"))
    present = n > 0
    dim, k = m.shape[0], int(present.sum())
    means = s[present] / n[present][:, None]
    d_means = np.sqrt(dim * ((err[1] / n[present]) ** 2).sum())  # Frobenius bound
    # scatter = moment - sum_k s_k s_k^T / n_k: entrywise change bound
    d_scatter = err[2] + sum(
        (2 * np.abs(s[c]).max() * err[1] + err[1] ** 2) / n[c] for c in np.flatnonzero(present)
    )
    d_cov = d_scatter / (n.sum() - k)
    d_shrunk = dim * ((1 - shrinkage) * d_cov + shrinkage * d_cov)  # Frobenius bound
    cov = (m - (means.T * n[present]) @ means) / (n.sum() - k)
    shrunk = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    low = float(np.linalg.eigvalsh(shrunk)[0])
    assert low > 2 * d_shrunk  # the bound below holds only for a small perturbation
    d_weight = (d_means + np.linalg.norm(means) * d_shrunk / low) / (low - d_shrunk)
    weight = np.linalg.solve(shrunk, means.T).T
    d_bias = 0.5 * (d_weight * (np.linalg.norm(means) + d_means) + np.linalg.norm(weight) * d_means)
    return float(d_weight + d_bias)


DP_STATS = {"dp": True, "target-epsilon": 1000.0, "noise-multiplier": 0.0}


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_the_refit_from_secure_statistics_equals_the_plaintext_refit(
    dp: bool, tmp_path: Path
) -> None:
    """(a) SecAgg+ totals equal the sum of the sites' plaintext statistics (noised, under
    DP: the simulated sites' noise is seeded, so both exchanges draw the same) within the
    quantisation bound the settings give, and so does the LDA head solved from them; (b)
    no reply the server gets holds one site's statistics: each masked vector is
    uncorrelated with its site's scaled statistics and uniform over the modulus."""
    values = DP_STATS if dp else {}
    (plain, _, plain_noise, _), _, _, _ = stats_exchange(tmp_path / "plain", values)
    secure_values = {**values, "secure-aggregation": "secagg+"}
    (secure, problems, noise, members), refit, grid, (arrays, private) = stats_exchange(
        tmp_path / "secure", secure_values
    )
    assert sorted(plain) == members[SECURE_TOTAL] and list(secure) == [SECURE_TOTAL]
    assert not problems.failures and not problems.rejected
    assert noise == plain_noise and (len(noise) == SITES if dp else not noise)
    truth, total = summed(plain.values()), secure[SECURE_TOTAL]
    scales = refit.stats_scales(arrays, private)
    s = stats_settings(RunConfig.from_mapping({**RUN, **secure_values}), SITES)
    err = [SITES * step(s.clip, s.quant) * scale for scale in scales]  # < 1 step a site
    if not dp:
        np.testing.assert_array_equal(total["counts"], truth["counts"])  # rounded: whole
    for i, part in enumerate(("counts", "sums", "moment")):
        np.testing.assert_allclose(total[part], truth[part], rtol=0, atol=err[i], err_msg=part)
    assert np.abs(total["moment"] - truth["moment"]).max() > 0  # quantised, not copied
    if not dp:
        w_plain, b_plain = lda_head([truth])
        w_secure, b_secure = lda_head([total])
        change = np.sqrt(((w_secure - w_plain) ** 2).sum() + ((b_secure - b_plain) ** 2).sum())
        bound = head_bound(truth, err)
        assert change <= bound < 1e-3 * np.linalg.norm(w_plain), (change, bound)
    # (b): what the server received: keys, shares, masked vectors, no statistics
    stats_replies = [r for r in grid.received if r.metadata.message_type == STATS_KIND]
    assert len(stats_replies) == 4 * SITES
    assert all(r.has_content() and "stats" not in r.content.array_records for r in stats_replies)
    masked = [r for r in stats_replies if MASKED in r.content.array_records]
    for r in masked:
        site = str(r.content.config_records["site"]["site"])
        vector = r.content.array_records[MASKED]["vector"].numpy().astype(np.float64)
        own = stats_vector(plain[site], scales)
        assert vector.shape == own.shape
        wide = 5 / np.sqrt(vector.size)  # 5 standard errors of a uniform sample's figures
        assert abs(np.corrcoef(vector, own)[0, 1]) < wide, site
        assert abs(vector.mean() / s.modulus - 0.5) < 0.2887 * wide
        assert abs(vector.std() / s.modulus - 0.2887) < 0.129 * wide
    assert len(masked) == SITES


def test_a_site_dropping_in_the_statistics_exchange_leaves_the_survivors_totals(
    tmp_path: Path, caplog
) -> None:
    """(c) A site that answers the key exchange and then nothing: the total is the two
    survivors' (counts exact), the dropped site named; below the threshold the refit gets
    nothing and the log says so."""
    gone = {102: f"{FEATURE_STATS}:{COLLECT}"}  # vidir_molemax
    (plain, _, _, _), _, _, _ = stats_exchange(tmp_path / "plain", {})
    values = {"secure-aggregation": "secagg+"}
    (secure, problems, _, members), _, _, _ = stats_exchange(
        tmp_path / "secure", values, silent=gone
    )
    assert members[SECURE_TOTAL] == ["rosendahl", "vidir_modern"]
    assert "vidir_molemax" in problems.failures
    truth = summed(plain[s] for s in members[SECURE_TOTAL])
    np.testing.assert_array_equal(secure[SECURE_TOTAL]["counts"], truth["counts"])
    np.testing.assert_allclose(secure[SECURE_TOTAL]["sums"], truth["sums"], rtol=1e-9, atol=1e-9)
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        (secure, _, _, _), _, _, _ = stats_exchange(
            tmp_path / "below", {**values, "secagg-threshold": 3}, silent=gone
        )
    assert secure == {}
    line = next(r.getMessage() for r in caplog.records if "below the" in r.getMessage())
    assert line.startswith("head calibration: secure aggregation stopped at the masked vectors")
    assert "missing: vidir_molemax" in line and "head kept" in line


def test_a_site_requiring_secure_aggregation_sends_no_plaintext_statistics(
    tmp_path: Path, caplog
) -> None:
    """(d) require-secure-aggregation=true: a plaintext statistics request is refused with
    one logged line and an error reply without content; under SecAgg+ the site takes part."""
    node = {0: {"require-secure-aggregation": True}}
    with caplog.at_level(logging.ERROR, logger="fedskin"):
        (plain, problems, _, _), _, grid, _ = stats_exchange(tmp_path / "plain", {}, node=node)
    assert sorted(plain) == ["vidir_modern", "vidir_molemax"]
    assert "require-secure-aggregation=true" in problems.failures["rosendahl"]
    refused = [r for r in grid.received if r.has_error()]
    assert len(refused) == 1 and not refused[0].has_content()
    said = [r for r in caplog.records if r.getMessage().startswith("site refuses a plaintext")]
    assert len(said) == 1 and "feature-statistics" in said[0].getMessage()
    values = {"secure-aggregation": "secagg+"}
    (_, _, _, members), _, _, _ = stats_exchange(tmp_path / "secure", values, node=node)
    assert members[SECURE_TOTAL] == ["rosendahl", "vidir_modern", "vidir_molemax"]


def test_a_secure_run_refits_the_head_from_the_totals(tmp_path: Path) -> None:
    """head-calibration with SecAgg+ end to end: no longer refused, the refit reports the
    three sites it summed, and no statistics record reached the server."""
    values = {"secure-aggregation": "secagg+", "head-calibration": "lda"}
    _, _, grid, result = run_round(tmp_path, values)
    calibration = result["test"]["head_calibration"]
    assert calibration["sites"] == ["rosendahl", "vidir_modern", "vidir_molemax"]
    assert calibration["secure-aggregation"] == "secagg+" and "error" not in calibration
    assert "validation_after" in calibration
    assert not any(r.has_content() and "stats" in r.content.array_records for r in grid.received)


def test_a_mask_depends_on_the_whole_seed_not_on_32_bits_of_it() -> None:
    """Flower's pseudo_rand_gen XORs a seed's 32-bit words together before seeding NumPy, so
    two keys with the same fold give the same mask and 2^32 guesses find any mask. fedskin's
    masks (AES-256-CTR under a hash of the whole seed) differ for such keys, are the same
    for the same key at both ends, and are uniform over the modulus."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = bytes(32)
    b = (1).to_bytes(4, "little") * 2 + bytes(24)  # the two words cancel: the same fold
    modulus, n = 2**40, 20_000
    flower = [pseudo_rand_gen(key, modulus, [(1,), (n,)])[1] for key in (a, b)]
    assert np.array_equal(*flower)  # the weakness, shown on Flower's own generator
    ours_a, ours_b = mask(a, modulus, n)[1], mask(b, modulus, n)[1]
    assert not np.array_equal(ours_a, ours_b)
    assert np.array_equal(ours_a, mask(a, modulus, n)[1])  # both ends derive the same mask
    assert ours_a.dtype == np.int64 and 0 <= ours_a.min() and ours_a.max() < modulus
    # uniform: the mean of n draws is within 5 standard errors of modulus / 2
    assert abs(ours_a.mean() - modulus / 2) < 5 * (modulus / np.sqrt(12 * n))
    with pytest.raises(ValueError, match="power of 2"):
        mask(a, 10**12, 3)


@pytest.mark.parametrize("modulus", [2**40, 2**32, 2**62])
def test_masks_added_in_one_pass_equal_each_mask_added_modulo_the_modulus(modulus: int) -> None:
    """Both ends add or remove a round's masks in one pass (the keystreams summed modulo
    2^64, reduced at the end): the same integers as adding each :func:`mask` by hand."""
    rng = np.random.default_rng(1)
    n = 5_000
    parts = [np.array([7, 3], np.int64), rng.integers(0, modulus, n, dtype=np.int64)]
    seeds = [(bytes([i]) * 32, sign) for i, sign in enumerate([1, -1, -1, 1])]
    by_hand = [int(v) for part in parts for v in part]
    for seed, sign in seeds:
        flat = [int(v) for m in mask(seed, modulus, n, factors=2) for v in m]
        by_hand = [(x + sign * m) % modulus for x, m in zip(by_hand, flat, strict=True)]
    add_masks(parts, seeds, modulus)
    assert [int(v) for part in parts for v in part] == by_hand
