"""The strategy registry (server/strategies.py): its names, and each strategy's declared
state surviving a restart.

Replies are built as the server loop receives them (tests/test_robust.py): the weights packed
one array per dtype (common/wire.py) in an ArrayRecord "arrays", the site's metrics in a
MetricRecord "metrics" ("site-weight" for site-level DP, "norm_bit" for client-side
adaptive clipping).
"""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import rundir
from common.config import CENTRAL_DP, STRATEGIES, ConfigError, RunConfig
from common.names import CENTRAL_DP as NAMED_CENTRAL_DP
from common.wire import pack, unpack
from server.central_dp import CENTRAL_DP_WRAPPERS
from server.strategies import SERVER_OPTIMIZERS, load_strategy_state, make_strategy, strategy_state
from server.strategy_registry import (
    NAME_ATTR,
    REGISTRY,
    WRAPPER_STATE_KEYS,
    StrategySpec,
    register_strategy,
    strategy_spec,
)

SHAPES = {"conv.weight": (4, 3, 3, 3), "bn.weight": (4,), "fc.weight": (2, 16)}
LAYOUT = {k: (s, np.dtype(np.float32)) for k, s in SHAPES.items()}
LAYOUT["bn.num_batches_tracked"] = ((), np.dtype(np.int64))
SITES = 7  # Bulyan tolerates f = 1 (n >= 4f+3), Krum too (n > 2f+2)
GRID = type("G", (), {"get_node_ids": lambda self: list(range(1, SITES + 1))})()
# server-side DP: clipping before the aggregate; server-lr large enough to move FedAdam's
# moments visibly; central-noise small, the noise seeded per round (np.random: Flower's)
DP = {"central-noise": 0.01, "central-clip": 0.5}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


def initial(counter: bool = True) -> dict[str, np.ndarray]:
    """A model's state: float32 weights and (``counter``) an int64 BatchNorm counter,
    which site-level DP models do not have (Opacus: no BatchNorm)."""
    rng = np.random.default_rng(0)
    out = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    if counter:
        out["bn.num_batches_tracked"] = np.array(10, np.int64)
    return out


def replies(model: dict[str, np.ndarray], server_round: int) -> list[Message]:
    """Each site's update: the model moved by a round- and site-specific step (one site
    further out), with its own example count and step counter."""
    out = []
    for i in range(SITES):
        rng = np.random.default_rng(100 * server_round + i)
        scale = 0.3 if i == 3 else 0.05
        state = {
            k: (v + scale * rng.normal(size=v.shape) + 0.02 * server_round).astype(np.float32)
            for k, v in model.items()
            if k in SHAPES
        }
        if "bn.num_batches_tracked" in model:
            state["bn.num_batches_tracked"] = np.array(10 + 20 * i, np.int64)
        metrics = {"num-examples": 50 + 10 * i, "site-weight": 1, "norm_bit": int(i % 2 == 0)}
        content = RecordDict({"arrays": pack(state), "metrics": MetricRecord(metrics)})
        out.append(Message(content, dst_node_id=i + 1, message_type="train"))
    return out


def model_of(arrays: ArrayRecord, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The aggregate as the loop keeps it: unpacked, back to the dtypes of the model
    ``like`` it."""
    layout = {k: LAYOUT[k] for k in like}
    return {k: np.asarray(v).astype(layout[k][1]) for k, v in unpack(arrays, layout).items()}


def train_round(strategy, server_round: int, model: dict[str, np.ndarray]) -> ArrayRecord:
    list(strategy.configure_train(server_round, pack(model), ConfigRecord(), GRID))
    np.random.seed(server_round)  # the DP wrappers' noise (Flower draws from np.random)
    arrays, _ = strategy.aggregate_train(server_round, replies(model, server_round))
    assert arrays is not None
    return arrays


def as_bytes(arrays: ArrayRecord) -> dict[str, tuple[str, tuple, bytes]]:
    return {
        k: (str(v.numpy().dtype), v.numpy().shape, v.numpy().tobytes()) for k, v in arrays.items()
    }


def through_a_checkpoint(tmp_path: Path, state: dict, cfg: dict) -> dict:
    """The state as a resumed server reads it: saved by the loop's checkpoint writer
    (arrays as tensors), read back weights-only."""
    path = rundir.save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(1)}, {}, state, cfg)
    return torch.load(path, weights_only=True)["strategy"]


def round_trip(tmp_path: Path, cfg: dict) -> tuple[dict, ArrayRecord, ArrayRecord, ArrayRecord]:
    """Round 1 with one strategy; its state saved and loaded into a fresh one; round 2 with
    both. The saved state, the uninterrupted and the resumed round 2, and round 2 of a
    fresh strategy without the state."""
    uninterrupted = make_strategy(RunConfig.from_mapping(cfg), SITES, SITES)
    model = model_of(train_round(uninterrupted, 1, initial()), initial())
    saved = strategy_state(uninterrupted)
    resumed = make_strategy(RunConfig.from_mapping(cfg), SITES, SITES)
    load_strategy_state(resumed, through_a_checkpoint(tmp_path, saved, cfg))
    forgetful = make_strategy(RunConfig.from_mapping(cfg), SITES, SITES)
    return (
        saved,
        train_round(uninterrupted, 2, model),
        train_round(resumed, 2, model),
        train_round(forgetful, 2, model),
    )


# ----------------------------------------------------------------------------- the names
def test_the_registrys_names_equal_the_configs_strategies():
    assert tuple(REGISTRY) == STRATEGIES
    assert ("", *CENTRAL_DP_WRAPPERS) == CENTRAL_DP == NAMED_CENTRAL_DP
    # the wrappers' state names, which no strategy may declare as its own
    assert WRAPPER_STATE_KEYS == {k for _, fields in CENTRAL_DP_WRAPPERS.values() for k in fields}
    assert all(isinstance(spec, StrategySpec) and spec.name == n for n, spec in REGISTRY.items())


def test_an_unknown_name_is_one_line_naming_the_choices():
    with pytest.raises(ValueError) as err:
        strategy_spec("fedfoo")
    assert str(err.value) == f"unknown strategy 'fedfoo'; choose one of {STRATEGIES}"
    with pytest.raises(ConfigError, match="strategy='fedfoo': must be one of fedavg, fedprox"):
        make_strategy(RunConfig.from_mapping({"strategy": "fedfoo"}), 2)


def test_a_name_registers_once_and_the_registry_is_read_only():
    with pytest.raises(ValueError, match="'fedavg' is already registered"):
        register_strategy("fedavg")
    with pytest.raises(ValueError, match="is the DP wrapper's"):
        register_strategy("fedclip", state={"clipping_norm": REGISTRY["fedadam"].state["m_t"]})
    with pytest.raises(TypeError):
        REGISTRY["fedfoo"] = REGISTRY["fedavg"]  # type: ignore[index]
    assert "fedclip" not in REGISTRY


def test_each_built_strategy_names_its_entry():
    for name in STRATEGIES:
        strategy = make_strategy(RunConfig.from_mapping({"strategy": name}), SITES)
        assert getattr(strategy, NAME_ATTR) == name
    wrapped = make_strategy(
        RunConfig.from_mapping({"strategy": "fedprox", "central-dp": "server-fixed", **DP}), SITES
    )
    assert getattr(wrapped.strategy, NAME_ATTR) == "fedprox"


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategys_state_survives_a_restart(tmp_path: Path, name: str):
    """Resumed after round 1 (through a checkpoint), round 2 is bit-identical to the
    uninterrupted strategy's. Exactly the server optimizers keep state, and for them it
    matters: without it round 2 differs."""
    cfg = RunConfig.from_mapping({"strategy": name, "server-lr": 0.1}).to_flat()
    saved, expected, got, forgetful = round_trip(tmp_path, cfg)
    assert set(saved) == set(REGISTRY[name].state)
    assert as_bytes(got) == as_bytes(expected)
    assert (as_bytes(forgetful) != as_bytes(expected)) is (name in SERVER_OPTIMIZERS)


@pytest.mark.parametrize(
    ("name", "kind", "fields"),
    [
        ("fedavg", "server-fixed", {"clipping_norm", "accountant"}),
        ("fedprox", "client-fixed", {"clipping_norm", "accountant"}),
        ("fedavg", "server-adaptive", {"clipping_norm"}),
        ("fedadam", "server-adaptive", {"clipping_norm", "m_t", "v_t"}),
        ("fedavgm", "client-adaptive", {"clipping_norm", "momentum_vector"}),
    ],
)
def test_the_dp_wrappers_state_survives_a_restart(tmp_path: Path, name, kind, fields):
    """The wrapper's declared state (clipping norm, accountant) with the base strategy's:
    round 2 and the privacy spent after it are those of the uninterrupted run."""
    values = {"strategy": name, "central-dp": kind, "server-lr": 0.1, **DP}
    cfg = RunConfig.from_mapping(values).to_flat()
    uninterrupted = make_strategy(RunConfig.from_mapping(cfg), SITES, SITES)
    start = initial(counter=False)
    model = model_of(train_round(uninterrupted, 1, start), start)
    saved = strategy_state(uninterrupted)
    assert set(saved) == fields
    resumed = make_strategy(RunConfig.from_mapping(cfg), SITES, SITES)
    load_strategy_state(resumed, through_a_checkpoint(tmp_path, saved, cfg))
    assert resumed.clipping_norm == uninterrupted.clipping_norm
    if kind.endswith("adaptive"):  # the norm moved in round 1: a fresh one would differ
        assert uninterrupted.clipping_norm != DP["central-clip"]
    expected, got = train_round(uninterrupted, 2, model), train_round(resumed, 2, model)
    assert as_bytes(got) == as_bytes(expected)
    assert resumed.clipping_norm == uninterrupted.clipping_norm
    if "accountant" in fields:
        spent = uninterrupted.accountant.get_epsilon(0.001)
        assert spent > 0 and resumed.accountant.get_epsilon(0.001) == spent


def test_privacy_spent_is_not_forgotten_by_a_run_without_an_accountant():
    values = {"strategy": "fedavg", "central-dp": "server-fixed", **DP}
    s1 = make_strategy(RunConfig.from_mapping(values), SITES, SITES)
    train_round(s1, 1, initial(counter=False))
    saved = strategy_state(s1)
    assert "accountant" in saved
    message = "the checkpoint has site-level privacy spending but this run has none"
    for other in ({"strategy": "fedavg"}, {**values, "central-dp": "server-adaptive"}):
        with pytest.raises(ValueError, match=message):
            load_strategy_state(make_strategy(RunConfig.from_mapping(other), SITES, SITES), saved)


def test_state_a_strategy_does_not_declare_is_left_out_with_a_log_line(caplog):
    """A forced resume under another strategy: FedAdam's moments do not reach FedAvg."""
    s1 = make_strategy(RunConfig.from_mapping({"strategy": "fedadam"}), SITES)
    train_round(s1, 1, initial())
    fedavg = make_strategy(RunConfig.from_mapping({"strategy": "fedavg"}), SITES)
    logger = logging.getLogger("fedskin")  # propagating: a runner may have stopped that
    propagate, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="fedskin"):
            load_strategy_state(fedavg, strategy_state(s1))
    finally:
        logger.propagate = propagate
    assert not hasattr(fedavg, "m_t")
    assert "strategy state ['m_t', 'v_t'] not used by strategy fedavg" in caplog.text


def test_only_strategies_built_by_make_strategy_declare_state():
    from flwr.serverapp.strategy import FedAdam

    with pytest.raises(TypeError, match="FedAdam was not built by make_strategy"):
        strategy_state(FedAdam())
