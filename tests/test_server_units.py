"""Server pieces that need no running federation: update checks, sampling, aggregation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from server.loop import Federation
from server.replies import arrays_error as _arrays_ok
from server.sizes import SiteInfo
from server.strategies import load_strategy_state, make_strategy, strategy_state
from server.transport import reported_exchange
from tests.helpers import assign_message_id

CFG = {"strategy": "fedavg", "lr": 0.01, "seed": 3, "min-train-nodes": 1, "fraction-train": 0.5}


def _rec(d):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in d.items()})


def _ref():
    return {"w": np.ones((2, 3), np.float32), "n": np.array(5, dtype=np.int64)}


def test_update_checks_reject_nan_inf_and_shapes():
    assert _arrays_ok(_rec(_ref()), _ref()) is None
    bad = _ref()
    bad["w"][0, 0] = np.nan
    assert "NaN" in _arrays_ok(_rec(bad), _ref())
    bad = _ref()
    bad["w"][1, 1] = np.inf
    assert "non-finite" in _arrays_ok(_rec(bad), _ref())
    assert "shape" in _arrays_ok(_rec({"w": np.ones((3, 2), np.float32), "n": _ref()["n"]}), _ref())
    assert "keys" in _arrays_ok(_rec({"w": _ref()["w"]}), _ref())


class _RecordingGrid:
    """A fake grid that numbers and keeps what is pushed; subclasses decide who answers."""

    sent: list = []

    def push_messages(self, messages: list) -> list[str]:
        for i, m in enumerate(messages):
            assign_message_id(m, f"m{i}")
        self.sent = list(messages)
        return [m.metadata.message_id for m in messages]


def _fed(tmp_path, cfg):
    fed = Federation(_RecordingGrid(), RunConfig.from_mapping(cfg), tmp_path, ["a", "b"])
    fed.sites.update(  # as discovery fills it
        (nid, SiteInfo(nid, name, 10, 2, 2))
        for nid, name in zip(
            [901, 17, 4242, 5], ["vienna", "barcelona", "mskcc", "queensland"], strict=True
        )
    )
    return fed


def test_sampling_is_reproducible_and_independent_of_node_ids(tmp_path):
    a = [[s.site for s in _fed(tmp_path, CFG).sample(r)] for r in range(1, 8)]
    b = [[s.site for s in _fed(tmp_path, CFG).sample(r)] for r in range(1, 8)]
    assert a == b
    assert all(len(x) == 2 for x in a)  # fraction 0.5 of 4 sites
    assert len({tuple(x) for x in a}) > 1  # it does vary across rounds
    other = dict(CFG, seed=4)
    c = [[s.site for s in _fed(tmp_path, other).sample(r)] for r in range(1, 8)]
    assert c != a


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity, as inside a running ServerApp."""
    from simulations.flower_adapter import set_task_identity

    set_task_identity()


def _reply(values, n):
    content = RecordDict(
        {
            "arrays": _rec({"w": np.array(values, np.float32)}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def test_fedavg_weights_by_examples():
    strategy = make_strategy(RunConfig.from_mapping(dict(CFG)), 2)
    arrays, _ = strategy.aggregate_train(1, [_reply([0.0, 0.0], 30), _reply([4.0, 8.0], 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 2.0])


def test_fedadam_state_survives_a_restart():
    cfg = dict(CFG, strategy="fedadam", **{"server-lr": 0.1})
    s1 = make_strategy(RunConfig.from_mapping(cfg), 2)
    start = _rec({"w": np.zeros(2, np.float32)})

    class _Grid:
        def get_node_ids(self):
            return [1, 2]

    list(s1.configure_train(1, start, ConfigRecord(), _Grid()))
    s1.aggregate_train(1, [_reply([1.0, 1.0], 5), _reply([1.0, 3.0], 5)])
    saved = strategy_state(s1)
    assert set(saved) >= {"m_t", "v_t"}
    s2 = make_strategy(RunConfig.from_mapping(cfg), 2)
    load_strategy_state(s2, saved)
    np.testing.assert_allclose(s2.m_t["w"], s1.m_t["w"])
    np.testing.assert_allclose(s2.v_t["w"], s1.v_t["w"])


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy='fedfoo': must be one of fedavg, fedprox"):
        make_strategy(RunConfig.from_mapping(dict(CFG, strategy="fedfoo")), 2)


def test_proximal_term_only_when_the_strategy_sends_it():
    """proximal-mu in the run config must not turn FedAvg into FedProx at the client."""
    from client.task import train_config

    cfg = {"proximal-mu": 0.5, "lr": 0.01, "batch-size": 8}
    grid_ids = type("G", (), {"get_node_ids": lambda self: [7]})()
    start = _rec({"w": np.zeros(2, np.float32)})
    for name, expected in (("fedavg", 0.0), ("fedadam", 0.0), ("fedprox", 0.5)):
        strategy = make_strategy(RunConfig.from_mapping(dict(CFG, strategy=name, **cfg)), 1)
        (msg,) = list(strategy.configure_train(1, start, ConfigRecord(), grid_ids))
        assert train_config(RunConfig.from_mapping(cfg), msg).proximal_mu == expected, name


def test_central_dp_wrappers():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    cfg = dict(CFG, **{"central-dp": "server-fixed", "central-noise": 0.1, "central-clip": 2.0})
    assert isinstance(
        make_strategy(RunConfig.from_mapping(cfg), 4), DifferentialPrivacyServerSideFixedClipping
    )
    with pytest.raises(ValueError, match="central-dp='client-fixd': must be one of"):
        make_strategy(RunConfig.from_mapping(dict(cfg, **{"central-dp": "client-fixd"})), 4)
    # An epsilon target needs Flower's accountant: refused where its conditions do not hold.
    for bad in ({"strategy": "fedadam"}, {"central-dp": "server-adaptive"}):
        with pytest.raises(ValueError, match="central-epsilon needs Flower's accountant"):
            make_strategy(RunConfig.from_mapping(dict(cfg, **{"central-epsilon": 8.0}, **bad)), 4)


def test_superlink_5xx_is_retried_and_4xx_is_not() -> None:
    """A SuperLink whose state is briefly locked answers 500: the server asks again instead
    of failing the whole run; a client error (4xx) is a bug and surfaces at once."""
    import httpx
    import pytest

    from server.transport import with_retries

    request = httpx.Request("POST", "https://superlink/v1/runtime/pull-messages")

    def failing(status: int, times: int) -> object:
        calls = {"n": 0}

        def call() -> str:
            calls["n"] += 1
            if calls["n"] <= times:
                response = httpx.Response(status, request=request)
                raise httpx.HTTPStatusError("err", request=request, response=response)
            return "replies"

        call.calls = calls  # type: ignore[attr-defined]
        return call

    flaky = failing(500, 2)
    assert with_retries(flaky, "collecting", patience=30) == "replies"
    assert flaky.calls["n"] == 3  # type: ignore[attr-defined]
    broken = failing(400, 1)
    with pytest.raises(httpx.HTTPStatusError):
        with_retries(broken, "collecting", patience=30)
    assert broken.calls["n"] == 1  # type: ignore[attr-defined]
    down = failing(503, 100)
    with pytest.raises(httpx.HTTPStatusError):  # gives up once its patience is spent
        with_retries(down, "collecting", patience=1.0)


def test_a_site_that_never_answers_is_reported_after_the_timeout() -> None:
    """A hanging site: ``exchange`` returns the others' replies and names the silent node
    once ``round-timeout`` has passed, instead of waiting for ever."""
    import time

    from flwr.app import Message, MessageType, RecordDict

    from server.transport import exchange

    class HangingGrid(_RecordingGrid):
        """Node 1 answers at once, node 2 never does."""

        def pull_messages(self, ids: set[str]) -> list[Message]:
            return [
                Message(RecordDict(), reply_to=m)
                for m in self.sent
                if m.metadata.dst_node_id == 1 and m.metadata.message_id in ids
            ]

    msgs = [Message(RecordDict(), nid, MessageType.TRAIN) for nid in (1, 2)]
    t0 = time.monotonic()
    replies, missing = exchange(HangingGrid(), msgs, timeout=1.0, poll=0.05)  # type: ignore[arg-type]
    assert sorted(replies) == [1] and missing == [2]
    assert time.monotonic() - t0 >= 1.0  # it waited for the timeout (no upper bound: load)


def test_each_reply_is_reported_as_it_arrives(tmp_path):
    """A long round is never silent: one log line per site reply, with its training speed."""
    import logging

    from flwr.app import MessageType

    class AnsweringGrid(_RecordingGrid):
        def pull_messages(self, ids: set[str]) -> list[Message]:
            speed = MetricRecord({"images_per_second": 123.4})
            return [
                Message(RecordDict({"metrics": speed}), reply_to=m)
                for m in self.sent
                if m.metadata.message_id in ids
            ]

    names = {901: "vienna", 17: "barcelona"}
    msgs = [Message(RecordDict(), nid, MessageType.TRAIN) for nid in (901, 17)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)  # reply lines are DEBUG: shown under -v
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fedskin")  # the runner may have stopped its propagation
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not .level=: it clears the loggers' caches
    logger.addHandler(handler)
    try:
        replies, missing = reported_exchange(
            AnsweringGrid(), msgs, 5.0, "round 3 training", names, {}
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert sorted(replies) == [17, 901] and missing == []
    lines = [r.getMessage() for r in records if "replied" in r.getMessage()]
    assert len(lines) == 2 and "(2/2 sites" in lines[-1], lines
    assert all(line.startswith("round 3 training: ") and "123 images/s" in line for line in lines)
    assert {line.split(": ")[1].split()[0] for line in lines} == {"vienna", "barcelona"}
