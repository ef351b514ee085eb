"""Robust aggregation (strategy=fedmedian/fedtrimmedavg/krum/multikrum/bulyan, fedavgm).

Replies are built as the server loop receives them: the weights packed one array per dtype
(common/wire.py) in an ArrayRecord "arrays", the site's metrics (with "num-examples") in a
MetricRecord "metrics".
"""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from scipy.stats import norm

from common.config import ConfigError, RunConfig
from common.wire import pack, unpack
from server.strategies import (
    load_strategy_state,
    make_strategy,
    statistics_averaged_plainly,
    strategy_state,
    updates_needed,
    with_mean_statistics,
)
from server.strategy_registry import largest_f, min_sites

ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
POISON = 1e3
SHAPES = {"conv.weight": (4, 3, 3, 3), "bn.weight": (4,), "fc.weight": (2, 16)}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


def state_dict(rng: np.random.Generator, shift: float = 0.0, steps: int = 10) -> dict:
    """A model's state: float32 weights and an int64 BatchNorm counter (packed separately)."""
    out = {k: (rng.normal(size=s) + shift).astype(np.float32) for k, s in SHAPES.items()}
    out["bn.num_batches_tracked"] = np.array(steps, np.int64)
    return out


def reply(state: dict, num_examples: int) -> Message:
    content = RecordDict(
        {"arrays": pack(state), "metrics": MetricRecord({"num-examples": num_examples})}
    )
    return Message(content, dst_node_id=1, message_type="train")


def flat(record_or_state) -> np.ndarray:
    """The floating-point weights as one vector (the unpacked model, counters left out)."""
    layout = {k: (s, np.dtype(np.float32)) for k, s in SHAPES.items()}
    layout["bn.num_batches_tracked"] = ((), np.dtype(np.int64))
    state = record_or_state
    if not isinstance(state, dict):
        state = unpack(record_or_state, layout)
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in SHAPES])


def sites(n: int = 5, poison_examples: int = 100):
    """``n - 1`` honest updates (base + small noise, different step counts), one poisoned
    (base + 1e3) that may claim more examples; and the honest sites' mean."""
    rng = np.random.default_rng(0)
    base = state_dict(rng)
    honest = []
    for i in range(n - 1):
        noisy = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        noisy["bn.num_batches_tracked"] = np.array(10 + 40 * i, np.int64)
        honest.append(noisy)
    poisoned = {k: v + np.float32(POISON) for k, v in base.items() if k in SHAPES}
    poisoned["bn.num_batches_tracked"] = np.array(70, np.int64)
    honest_mean = np.mean([flat(s) for s in honest], axis=0)
    # the poisoned site in the middle: no strategy may rely on the order of the replies
    states = [*honest[:2], poisoned, *honest[2:]]
    counts = [100, 100, poison_examples] + [100] * (n - 3)
    return [reply(s, c) for s, c in zip(states, counts, strict=True)], honest_mean


def aggregate(name: str, replies: list[Message]) -> np.ndarray:
    n = len(replies)
    strategy = make_strategy(
        RunConfig.from_mapping({"strategy": name}), n, n
    )  # robust-malicious: 1 by default
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, name
    return flat(arrays)


@pytest.mark.parametrize("poison_examples", [100, 1000])
def test_one_poisoned_site_of_five_pulls_fedavg_but_not_the_robust_strategies(poison_examples):
    replies, honest = sites(5, poison_examples)
    moved = np.linalg.norm(aggregate("fedavg", replies) - honest)
    assert moved > 100, moved
    for name in ROBUST:
        # Bulyan needs 4f+3 = 7 sites for f = 1 (with 5 it uses f = 0); each strategy
        # gets fresh replies, as FedMedian and Bulyan take the arrays out of them.
        replies, honest = sites(7 if name == "bulyan" else 5, poison_examples)
        dist = np.linalg.norm(aggregate(name, replies) - honest)
        assert dist < 0.01 * POISON, (name, dist)


def test_krum_picks_by_weights_not_by_batchnorm_step_counts():
    """Three sites agree on the weights, two others on the step count; Krum sides with the
    three. Over all packed arrays the int64 counters (steps 0/100/200 vs 100/100) would
    outweigh the weights and Krum would pick one of the two."""
    rng = np.random.default_rng(2)
    base = state_dict(rng)
    states = []
    for i, (shift, steps) in enumerate([(0, 0), (0, 100), (0, 200), (1, 100), (1, 100)]):
        s = {
            k: v + shift + 0.01 * np.random.default_rng(i).normal(size=v.shape)
            for k, v in base.items()
            if k in SHAPES
        }
        states.append(
            {
                **{k: v.astype(np.float32) for k, v in s.items()},
                "bn.num_batches_tracked": np.array(steps, np.int64),
            }
        )
    chosen = aggregate("krum", [reply(s, 100) for s in states])
    assert min(np.linalg.norm(chosen - flat(s)) for s in states[:3]) < 1e-6
    assert np.linalg.norm(chosen - flat(base)) < 1


def test_multikrum_averages_all_but_f_of_this_rounds_replies():
    replies, honest = sites(5)
    del replies[0]  # a site dropped out: 4 replies, 1 of them poisoned
    strategy = make_strategy(RunConfig.from_mapping({"strategy": "multikrum"}), 5, 5)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.linalg.norm(flat(arrays) - honest) < 0.01 * POISON


def test_site_count_conditions_adapt_f_and_refuse_only_below_f0():
    """Too few sampled sites for the configured f no longer stop the run: each round lowers
    f to what its updates allow (server/robust.py). Only a count that even f = 0 cannot
    use, or a multikrum-select that all sites cannot meet, is a one-line error."""
    assert make_strategy(
        RunConfig.from_mapping({"strategy": "bulyan", "robust-malicious": 1}), 5, 5
    )
    assert make_strategy(RunConfig.from_mapping({"strategy": "bulyan", "robust-malicious": 1}), 7)
    for name in ("krum", "multikrum"):
        assert make_strategy(RunConfig.from_mapping({"strategy": name}), 4)
        assert make_strategy(RunConfig.from_mapping({"strategy": name}), 5)
    rules = {"krum": "n > 2f+2", "multikrum": "n > 2f+2", "bulyan": "n >= 4f+3"}
    for name, rule in rules.items():
        with pytest.raises(ValueError) as err:
            make_strategy(RunConfig.from_mapping({"strategy": name}), 2)
        assert str(err.value) == (
            f"strategy={name} needs at least 3 sampled sites even with f=0 ({rule}); "
            "2 are sampled per round"
        )
    with pytest.raises(ValueError, match=r"^multikrum-select=5 is more than"):
        make_strategy(RunConfig.from_mapping({"strategy": "multikrum", "multikrum-select": 5}), 5)
    with pytest.raises(ValueError, match=r"^multikrum-select=5 is more than the 4 .* <= 4 "):
        make_strategy(
            RunConfig.from_mapping({"strategy": "multikrum", "multikrum-select": 5}), 4
        )  # f=0 with 4
    assert make_strategy(
        RunConfig.from_mapping({"strategy": "multikrum", "multikrum-select": 4}), 4
    )
    assert make_strategy(RunConfig.from_mapping({"strategy": "fedtrimmedavg"}), 4)
    assert make_strategy(RunConfig.from_mapping({"strategy": "fedtrimmedavg"}), 1)


def test_min_sites_and_updates_needed():
    table = {"krum": (3, 5, 7), "multikrum": (3, 5, 7), "bulyan": (3, 7, 11)}
    table |= {"fedtrimmedavg": (1, 3, 5), "fedmedian": (1, 3, 5), "fedavg": (1, None, None)}
    for name, counts in table.items():
        for f, count in enumerate(counts):
            if count is None:
                with pytest.raises(ValueError, match="tolerates no malicious"):
                    min_sites(name, f)
                continue
            assert min_sites(name, f) == count, (name, f)
            assert largest_f(name, count) == f and largest_f(name, count - 1) == f - 1
    for name, needed in [("krum", 3), ("multikrum", 3), ("bulyan", 3), ("fedtrimmedavg", 1)]:
        assert (
            updates_needed(RunConfig.from_mapping({"strategy": name, "robust-malicious": 2}))
            == needed
        )
    assert (
        updates_needed(RunConfig.from_mapping({"strategy": "multikrum", "multikrum-select": 4}))
        == 3
    )
    assert updates_needed(RunConfig.from_mapping({"strategy": "fedavg"})) == 1


@pytest.fixture
def fedskin_log(caplog):
    """The "fedskin" logger's records (propagating: a runner may have stopped that)."""
    logger = logging.getLogger("fedskin")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.INFO, logger="fedskin"):
        yield caplog
    logger.propagate = propagate


def lowered(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tolerates f=" in r.getMessage()]


@pytest.mark.parametrize("sampled", [5, 4])
@pytest.mark.parametrize("name", ["krum", "multikrum", "fedtrimmedavg"])
def test_four_of_five_sites_still_aggregate_and_leave_the_poisoned_one_out(
    name, sampled, fedskin_log
):
    """One honest site of five missing (sampled: 5 built for, or only 4 at the start): 4
    updates, 1 poisoned. The trimmed mean still cuts 1 at each end (f = 1); Krum needs
    n > 2f+2, so it scores with f = 0 (logged) and still picks a central update; MultiKrum
    scores with f = 0 but averages all but the configured f = 1, leaving the poison out."""
    replies, honest = sites(5)
    del replies[0]
    strategy = make_strategy(RunConfig.from_mapping({"strategy": name}), sampled, 5)
    arrays, _ = strategy.aggregate_train(3, replies)
    assert np.linalg.norm(flat(arrays) - honest) < 0.01 * POISON
    expected = (
        []
        if name == "fedtrimmedavg"
        else [f"round 3: {name} with 4 updates tolerates f=0 (configured 1; n > 2f+2)"]
    )
    assert lowered(fedskin_log) == expected


def test_f_is_logged_only_when_lowered(fedskin_log):
    for name in ("krum", "multikrum", "fedtrimmedavg"):  # 5 updates allow f = 1
        replies, honest = sites(5)
        arrays, _ = make_strategy(RunConfig.from_mapping({"strategy": name}), 5).aggregate_train(
            1, replies
        )
        assert np.linalg.norm(flat(arrays) - honest) < 0.01 * POISON
    assert lowered(fedskin_log) == []
    replies, _ = sites(5)  # Bulyan with 5: f = 0, a plain mean (the poison pulls it)
    arrays, _ = make_strategy(RunConfig.from_mapping({"strategy": "bulyan"}), 5).aggregate_train(
        2, replies
    )
    assert arrays is not None
    replies, _ = sites(3)  # the trimmed mean of 2: nothing can be cut
    arrays, _ = make_strategy(
        RunConfig.from_mapping({"strategy": "fedtrimmedavg"}), 3
    ).aggregate_train(4, replies[1:])
    assert arrays is not None
    assert lowered(fedskin_log) == [
        "round 2: bulyan with 5 updates tolerates f=0 (configured 1; n >= 4f+3)",
        "round 4: fedtrimmedavg with 2 updates tolerates f=0 (configured 1, from "
        "trim-beta=0.2; n >= 2f+1)",
    ]


def test_a_round_with_too_few_updates_for_f0_is_not_aggregated(fedskin_log):
    replies, _ = sites(3)
    for name in ("krum", "bulyan"):
        strategy = make_strategy(RunConfig.from_mapping({"strategy": name}), 3)
        assert strategy.aggregate_train(5, replies[:2]) == (None, None)
        assert f"round 5: {name} cannot aggregate 2 updates even with f=0" in fedskin_log.text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trim-beta": 0.6}, "trim-beta=0.6: must be >= 0 and < 0.5"),
        ({"robust-malicious": -1}, "robust-malicious=-1: must be >= 0"),
        ({"server-momentum": 1.0}, "server-momentum=1.0: must be >= 0 and < 1"),
        ({"multikrum-select": -2}, "multikrum-select=-2: must be >= 0"),
    ],
)
def test_config_refuses_bad_robust_values(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert str(err.value) == message


def test_fedavgm_momentum_follows_the_loops_model_and_survives_a_restart():
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2]})()
    rng = np.random.default_rng(1)
    start = state_dict(rng)
    step = {k: np.full_like(v, 0.5) for k, v in start.items()}
    updated = {k: v - step[k] for k, v in start.items()}
    s1 = make_strategy(RunConfig.from_mapping({"strategy": "fedavgm", "server-momentum": 0.9}), 2)
    list(s1.configure_train(1, pack(start), ConfigRecord(), grid))
    arrays, _ = s1.aggregate_train(1, [reply(updated, 5), reply(updated, 5)])
    np.testing.assert_allclose(flat(arrays), flat(updated), rtol=1e-6)  # lr 1, 1st round
    saved = strategy_state(s1)
    assert "momentum_vector" in saved
    s2 = make_strategy(RunConfig.from_mapping({"strategy": "fedavgm", "server-momentum": 0.9}), 2)
    load_strategy_state(s2, saved)
    # round 2 from the loop's model: step 0.5 again plus 0.9 * the first step
    for s in (s1, s2):
        list(s.configure_train(2, pack(updated), ConfigRecord(), grid))
        twice = {k: v - step[k] for k, v in updated.items()}
        arrays, _ = s.aggregate_train(2, [reply(twice, 5), reply(twice, 5)])
        expected = {k: v - 1.9 * step[k] for k, v in updated.items()}
        np.testing.assert_allclose(flat(arrays), flat(expected), rtol=1e-5)


def test_server_momentum_would_push_a_falling_variance_below_zero_so_statistics_are_averaged():
    """FedAvgM (and FedAdam, FedYogi) move every array with a server optimizer; a BatchNorm
    running variance that falls from round to round overshoots below zero (the model's
    scores turn NaN). The loop gives statistics FedAvg's weighted mean instead."""
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2]})()
    rng = np.random.default_rng(2)
    start = {**state_dict(rng), "bn.running_var": np.ones(4, np.float32)}
    strategy = make_strategy(
        RunConfig.from_mapping({"strategy": "fedavgm", "server-momentum": 0.9}), 2
    )
    model = start
    for rnd, variances in enumerate([(0.2, 0.1), (0.05, 0.02)], start=1):
        sites = []
        for var, n in zip(variances, (1, 3), strict=True):
            sites.append(({**model, "bn.running_var": np.full(4, var, np.float32)}, n))
        list(strategy.configure_train(rnd, pack(model), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, [reply(s, n) for s, n in sites])
        layout = {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in start.items()}
        # as the loop does (server/updates.py: Aggregation): back to the layout's dtypes
        raw = {k: np.asarray(v).astype(layout[k][1]) for k, v in unpack(arrays, layout).items()}
        model = with_mean_statistics(raw, sites, {"bn.running_var", "bn.num_batches_tracked"})
        mean = (variances[0] * 1 + variances[1] * 3) / 4
        np.testing.assert_allclose(model["bn.running_var"], mean, rtol=1e-6)
        assert model["bn.running_var"].dtype == np.float32
        for k in SHAPES:  # the weights keep the server optimizer's step
            np.testing.assert_array_equal(model[k], raw[k])
    assert (raw["bn.running_var"] < 0).all()  # round 2 without the mean: 0.125 - 0.8 ...


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"strategy": "fedavgm"}, True),
        ({"strategy": "fedadam"}, True),
        ({"strategy": "fedyogi"}, True),
        ({"strategy": "fedavg"}, False),
        ({"strategy": "fedadam", "central-dp": "server-fixed"}, False),
    ],
)
def test_which_strategies_average_statistics_plainly(values, expected):
    assert statistics_averaged_plainly(RunConfig.from_mapping(values)) is expected


def test_the_server_names_the_models_buffers_as_statistics():
    from server.server_app import initial_model, statistics_of

    model = initial_model(RunConfig.from_mapping({"model": "test_resnet"}), 7)
    names = statistics_of(model)
    assert any(n.endswith("running_var") for n in names)
    assert names <= set(model.state_dict())
    assert not names & {n for n, _ in model.named_parameters()}


def alie(n: int, z: float) -> tuple[list[Message], np.ndarray, np.ndarray, np.ndarray]:
    """ "A little is enough" (Baruch et al., 2019): ``n - 1`` honest updates as in
    :func:`sites`, the attacker sends their mean - z * std per coordinate. The replies, the
    honest mean and std, and the attacker's weights."""
    rng = np.random.default_rng(0)
    base = state_dict(rng)
    honest = []
    for i in range(n - 1):
        noisy = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        noisy["bn.num_batches_tracked"] = np.array(10 + 40 * i, np.int64)
        honest.append(noisy)
    attack = {
        k: np.mean([h[k] for h in honest], 0) - z * np.std([h[k] for h in honest], 0, ddof=1)
        for k in SHAPES
    }
    attack = {k: v.astype(np.float32) for k, v in attack.items()}
    attack["bn.num_batches_tracked"] = np.array(70, np.int64)
    flats = np.stack([flat(h) for h in honest])
    states = [*honest[:2], attack, *honest[2:]]
    return [reply(s, 100) for s in states], flats.mean(0), flats.std(0, ddof=1), flat(attack)


def alie_bias(name: str, n: int, z: float) -> tuple[float, bool]:
    """How far the aggregate moves toward the attacker, per coordinate in honest std (the
    honest mean's own error is std / sqrt(n - 1)), and whether it *is* the attacker's."""
    replies, mean, std, attack = alie(n, z)
    arrays, _ = make_strategy(RunConfig.from_mapping({"strategy": name}), n).aggregate_train(
        1, replies
    )
    agg = flat(arrays)
    return float(np.mean((mean - agg) / std)), bool(np.allclose(agg, attack))


def test_alie_one_attacker_of_five_is_not_removed_by_any_robust_rule():
    """Documents (does not endorse) what one ALIE attacker of five does in one round, at the
    paper's z for n = 5, f = 1 (Phi^-1(3/5) = 0.25) and at z = 1. Observed (fedavg's bias
    z/5): Krum adopts the attacker's update verbatim (bias z, 5x FedAvg's); MultiKrum
    averages it in (about FedAvg's); the median and the trimmed mean move *more* than
    FedAvg (0.15 vs 0.05 at z = 0.25); Bulyan uses f = 0 with 5 sites: FedAvg's mean. All
    but Krum stay within the honest mean's own error (0.5 std) in a round, but the bias
    has the same sign on every coordinate and every round. At z = 1.5 the attacker is an
    outlier again and Krum/MultiKrum leave it out."""
    for z in (norm.ppf(3 / 5), 1.0):
        fedavg, _ = alie_bias("fedavg", 5, z)
        assert fedavg == pytest.approx(z / 5, rel=1e-3)
        bias, is_attacker = alie_bias("krum", 5, z)
        assert is_attacker and bias == pytest.approx(z, rel=1e-3)
        assert alie_bias("multikrum", 5, z)[0] > 0.5 * fedavg
        for name in ("fedmedian", "fedtrimmedavg"):
            assert alie_bias(name, 5, z)[0] > fedavg, (name, z)
        assert alie_bias("bulyan", 5, z)[0] == pytest.approx(fedavg, rel=1e-3)
        assert max(alie_bias(n, 5, z)[0] for n in ("multikrum", "fedmedian")) < 0.5
    # Bulyan with f = 1 (7 sites, 1 attacker) at z = 1: biased more than FedAvg too
    assert alie_bias("bulyan", 7, 1.0)[0] > alie_bias("fedavg", 7, 1.0)[0]
    for name in ("krum", "multikrum"):
        assert abs(alie_bias(name, 5, 1.5)[0]) < 0.05, name
