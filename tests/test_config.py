"""The typed run config (common/config.py): one field per key, each value checked once."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import (
    CENTRAL_DP,
    FLAMBY_PROXIMAL_MU,
    GRAD_SAMPLE_MODES,
    LOSSES,
    MANIFEST_KEYS,
    OPTIMIZERS,
    PERSONALIZE,
    SCHEMES,
    STRATEGIES,
    ConfigError,
    RunConfig,
    config_keys,
    key_rule,
    key_type,
)
from common.data.schema import DataError

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = sorted(k for k in config_keys() if key_type(k) in ("int", "float"))
BOOLS = sorted(k for k in config_keys() if key_type(k) == "bool")
CHOICES = sorted(k for k in config_keys() if "choices" in key_rule(k))


def pyproject_table() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def typed(d: dict) -> dict:
    """Values with their types: 1 == 1.0 == True in Python, not in a TOML table."""
    return {k: (type(v).__name__, v) for k, v in d.items()}


def one_line_error(values: dict, key: str) -> str:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{key}="), text
    return text


# ------------------------------------------------------------------ one source of truth
def test_one_field_per_pyproject_key_and_vice_versa():
    keys = config_keys()
    assert len(keys) == len(set(keys))
    assert set(keys) == set(pyproject_table())


def test_the_schemas_defaults_equal_pyproject_table_both_ways():
    """The schema is the one place a default is written; pyproject's table (which `flwr run`
    reads) holds the same keys with the same typed values, checked key by key both ways."""
    schema, table = typed(RunConfig.defaults().to_flat()), typed(pyproject_table())
    assert [k for k in schema if k not in table] == []
    assert [k for k in table if k not in schema] == []
    assert {k: v for k, v in schema.items() if table[k] != v} == {}
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "common" not in package_data  # no defaults file shipped beside the schema
    assert not (ROOT / "common" / "defaults.toml").exists()


def test_defaults_are_valid_and_typed_as_declared():
    flat = RunConfig.defaults().to_flat()
    assert typed(flat) == typed(pyproject_table())
    for key, value in flat.items():
        assert type(value).__name__ == key_type(key), key
    assert RunConfig.from_mapping(flat) == RunConfig.defaults()  # idempotent


def test_allowed_values_equal_the_codes_constants():
    from common.losses import LOSSES as code_losses
    from common.names import PERSONALIZE as code_personalize
    from server.central_dp import CENTRAL_DP_WRAPPERS
    from server.strategies import STRATEGIES as code_strategies

    assert STRATEGIES == tuple(code_strategies)
    assert CENTRAL_DP == ("", *CENTRAL_DP_WRAPPERS)
    assert set(LOSSES) == set(code_losses)
    assert PERSONALIZE == tuple(code_personalize)


def test_shared_names_are_defined_once():
    """The config and the code that acts on these values import one definition
    (common/names.py), so there is no copy to keep equal; training and DP settings take
    their rules from the schema (test_training_and_dp_settings_take_the_schemas_rules)."""
    from common import names
    from common.data import partition, site_data

    assert OPTIMIZERS is names.OPTIMIZERS
    assert GRAD_SAMPLE_MODES is names.GRAD_SAMPLE_MODES
    assert SCHEMES is names.SCHEMES is partition.SCHEMES
    assert names.SPLITS is partition.SPLITS is site_data.SPLITS
    assert MANIFEST_KEYS is names.MANIFEST_KEYS is site_data.MANIFEST_KEYS


def test_training_and_dp_settings_take_the_schemas_defaults_and_rules():
    """TrainConfig and DPConfig are views of the run config: no default or rule of their own
    for a run-config key (a default changed in the schema changes theirs)."""
    from common.privacy import DPConfig
    from common.train_config import RUN_KEYS, TrainConfig

    run, train, dp = RunConfig.defaults(), TrainConfig(), DPConfig()
    for name, key in RUN_KEYS.items():
        assert getattr(train, name) == run.value(key), key
    assert (dp.max_grad_norm, dp.physical_batch) == (run.max_grad_norm, run.dp_physical_batch)
    assert (dp.target_epsilon, dp.grad_sample_mode) == (run.target_epsilon, run.grad_sample_mode)
    for bad, text in [
        ({"optimizer": "lbfgs"}, "optimizer='lbfgs': must be one of adam, adamw, sgd"),
        ({"batch_size": 0}, "batch-size=0: "),
        ({"lr": -1.0}, "lr=-1.0: "),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(text)}"):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="^grad-sample-mode='magic': must be one of auto"):
        DPConfig(grad_sample_mode="magic")


def test_the_data_pipeline_does_not_import_the_config():
    """common/data/ takes the typed settings; it never imports common/config.py."""
    code = (
        "import sys, common.data.site_data, common.data.cache, common.data.partition; "
        "print(sorted(m for m in ('common.config', 'common.rundir') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_checking_a_config_imports_neither_torch_nor_flwr():
    code = "import sys, common.config; print(sorted({'torch', 'flwr'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ each key's rule
def _wrong_types(key: str) -> list[object]:
    return ["abc", True, 2.5] if key_type(key) == "int" else ["abc", True, None]


def _out_of_range(key: str) -> list[float]:
    rule, kind = key_rule(key), key_type(key)
    out = []
    if "ge" in rule:
        out.append(rule["ge"] - 1)
    if "gt" in rule:
        out.append(rule["gt"])
    if "le" in rule:
        out.append(rule["le"] + 1)
    if "lt" in rule:
        out.append(rule["lt"])
    return [int(v) for v in out] if kind == "int" else out


@pytest.mark.parametrize("key", NUMERIC)
def test_numeric_key_wrong_type_is_one_line_naming_it(key):
    for bad in _wrong_types(key):
        text = one_line_error({key: bad}, key)
        assert "must be a number" in text or "must be an integer" in text


@pytest.mark.parametrize("key", NUMERIC)
def test_numeric_key_out_of_range_is_one_line_naming_it(key):
    values = _out_of_range(key)
    assert values, f"{key} has no range rule"
    for bad in values:
        text = one_line_error({key: bad}, key)
        assert text.startswith(f"{key}={bad!r}: must be "), text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-server-rounds": -1}, "num-server-rounds=-1: must be >= 1"),
        ({"num-server-rounds": 2.5}, "num-server-rounds=2.5: must be an integer"),
        ({"lr": "abc"}, "lr='abc': must be a number"),
        ({"image-size": 0}, "image-size=0: must be >= 8"),
        ({"fraction-train": -3}, "fraction-train=-3: must be > 0 and <= 1"),
        ({"round-timeout": -5}, "round-timeout=-5: must be > 0"),
        ({"batch-size": 0}, "batch-size=0: must be >= 1"),
        ({"target-delta": -1}, "target-delta=-1: must be >= 0 and < 1"),
        ({"lr": float("nan")}, "lr=nan: must be a finite number"),
        ({"optimizer": "adamx"}, "optimizer='adamx': must be one of adam, adamw, sgd"),
    ],
)
def test_the_issues_examples(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert str(err.value) == message


def test_int_is_accepted_for_a_float_key():
    run = RunConfig.from_mapping({"lr": 1, "round-timeout": 30})
    assert run.lr == 1.0 and type(run.lr) is float
    assert type(run.to_flat()["round-timeout"]) is float


@pytest.mark.parametrize("key", BOOLS)
def test_bool_keys_take_bools_and_true_false_strings_only(key):
    assert RunConfig.from_mapping({key: "false"}).to_flat()[key] is False
    assert RunConfig.from_mapping({key: " TRUE "}).to_flat()[key] is True
    assert RunConfig.from_mapping({key: False}).to_flat()[key] is False
    for bad in ("maybe", "yes", "0", 1, 0):
        assert "must be true or false" in one_line_error({key: bad}, key)


@pytest.mark.parametrize("key", CHOICES)
def test_choice_keys_list_what_is_allowed(key):
    allowed = key_rule(key)["choices"]
    text = one_line_error({key: "nope"}, key)
    assert text.startswith(f"{key}='nope': must be one of ")
    assert all((c or "''") in text for c in allowed)
    for good in allowed:
        assert RunConfig.from_mapping({key: good.upper()}).to_flat()[key] == good
    assert "must be a string" in one_line_error({key: 3}, key)


def test_unknown_key_is_named_with_the_nearest_known_one():
    text = one_line_error({"num-rounds": 3}, "num-rounds")
    assert text == "num-rounds=3: unknown key (did you mean num-server-rounds?)"
    assert "unknown key" in one_line_error({"zzz": 1}, "zzz")


def test_config_error_is_a_data_error_for_the_cli():
    assert issubclass(ConfigError, DataError) and issubclass(ConfigError, ValueError)


def test_a_run_needs_local_epochs_or_local_steps():
    with pytest.raises(ConfigError, match="set local-epochs >= 1 or local-steps >= 1"):
        RunConfig.from_mapping({"local-epochs": 0, "local-steps": 0})
    assert RunConfig.from_mapping({"local-epochs": 0, "local-steps": 5}).local_steps == 5


# ------------------------------------------------------------------ FedProx's mu
def test_fedprox_with_mu_zero_is_refused():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"strategy": "fedprox", "proximal-mu": 0})
    assert str(err.value).startswith("strategy=fedprox needs proximal-mu > 0 (FLamby uses 0.001)")
    assert "\n" not in str(err.value)
    # FedAvg does not care: the sites apply mu only when FedProx sends it
    assert RunConfig.from_mapping({"strategy": "fedavg", "proximal-mu": 0}).proximal_mu == 0.0


def test_default_mu_is_flambys_so_fedprox_is_real_by_default():
    from server.strategies import make_strategy

    assert RunConfig.defaults().proximal_mu == FLAMBY_PROXIMAL_MU == 0.001
    strategy = make_strategy(RunConfig.from_mapping({"strategy": "fedprox", "lr": 0.01}), 2)
    assert type(strategy).__name__ == "FedProx" and strategy.proximal_mu == 0.001
    with pytest.raises(ConfigError, match="proximal-mu > 0"):
        make_strategy(RunConfig.from_mapping({"strategy": "fedprox", "proximal-mu": 0.0}), 2)


def test_default_mu_leaves_fedavg_untouched_at_the_site():
    """The run config's mu (now 0.001 by default) reaches training only via FedProx."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from client.task import train_config
    from server.strategies import make_strategy
    from simulations.flower_adapter import set_task_identity

    set_task_identity()
    cfg = RunConfig.defaults().to_flat()
    grid = type("G", (), {"get_node_ids": lambda self: [7]})()
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    for name, expected in (("fedavg", 0.0), ("fedadam", 0.0), ("fedprox", 0.001)):
        run = RunConfig.from_mapping(dict(cfg, strategy=name))
        (msg,) = list(make_strategy(run, 1).configure_train(1, start, ConfigRecord(), grid))
        assert train_config(run, msg).proximal_mu == expected, name


def test_compare_runs_a_real_fedprox_by_default(tmp_path, monkeypatch):
    """`fedskin compare` (fedavg,fedprox): the FedProx run gets mu 0.001, not a second FedAvg."""
    import simulations.runner as runner
    from simulations.cli import app

    resolved = []

    def fake_simulate(config, run, out, force_resume=False):
        resolved.append(runner.resolve_config(config, run))
        return {"test": {"sites": {"a": {"balanced_accuracy": 0.5}}}}

    def stop(cfg):
        raise DataError("stop before the baselines")

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    monkeypatch.setattr(runner, "prepare_data", stop)
    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert [(c["strategy"], c["proximal-mu"]) for c in resolved] == [
        ("fedavg", 0.001),
        ("fedprox", 0.001),
    ]


# ------------------------------------------------------------------ the boundaries
def test_every_experiment_file_resolves():
    from simulations.runner import resolve_config

    for path in sorted((ROOT / "simulations" / "configs").glob("*.toml")):
        cfg = resolve_config(path)
        assert RunConfig.from_mapping(cfg).to_flat() == cfg, path.name


def test_resolve_config_names_the_origin_of_an_unknown_key():
    from simulations.runner import resolve_config

    with pytest.raises(
        ConfigError, match=r"^--run-config: lrr=0.1: unknown key \(did you mean lr\?\)"
    ):
        resolve_config(None, "lrr=0.1")


def test_cli_simulate_bad_value_is_one_error_line_exit_2(monkeypatch):
    import simulations.runner as runner
    from simulations.cli import app

    def never(*args, **kwargs):
        raise AssertionError("no data or engine work for a bad config")

    monkeypatch.setattr(runner, "prepare_data", never)
    monkeypatch.setattr(runner, "_run_engine", never)
    result = CliRunner().invoke(app, ["simulate", "--run-config", "num-server-rounds=-1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: num-server-rounds=-1: must be >= 1"]


def test_server_app_refuses_a_bad_config_before_contacting_any_site():
    from flwr.app import Context, RecordDict

    from server.server_app import main

    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the grid was used ({name}) before the config was checked")

    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**pyproject_table(), "num-server-rounds": -1},
    )
    with pytest.raises(ConfigError, match=r"^num-server-rounds=-1: must be >= 1$"):
        main(NoGrid(), context)


# ------------------------------------------------------------------ one reader of raw keys
# Reads of the flat run config by key: the typed RunConfig is how code reads it. A site's
# node config (node_config.get) is the site's own, not the run config. Assignments build the
# flat dict Flower carries and are not reads.
RAW_READ = re.compile(
    r"""\bcfg\.get\(|\brun_config(\.get\(|\[)|(?<!node_)config\.get\("""
    r"""|\bcfg\[(?!.*\]\s*=[^=])"""
)
# common/config.py is the parser; nothing else reads the flat dict by key.
ALLOWED: dict[str, set[str] | None] = {"common/config.py": None}
# Being rewritten by another change at the time of writing; its raw reads go with it.
NOT_YET: set[str] = set()


def _lines_in(path: Path, functions: set[str]) -> set[int]:
    import ast

    tree = ast.parse(path.read_text())
    return {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in functions
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }


def test_no_code_reads_raw_run_config_keys():
    found = []
    for folder in ("common", "client", "server", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NOT_YET or (rel in ALLOWED and ALLOWED[rel] is None):
                continue
            skip = _lines_in(path, ALLOWED[rel]) if rel in ALLOWED else set()
            for no, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if no not in skip and RAW_READ.search(code):
                    found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, "raw run-config reads (use RunConfig's typed fields):\n" + "\n".join(found)


def test_the_raw_read_pattern_catches_what_it_should():
    reads = ['cfg.get("lr", 0.1)', 'cfg["model"]', 'run_config["dp"]', "run_config.get('dp')"]
    reads += ['str(cfg["seed"]) + x', 'f(cfg["a"]) == 1', 'context.run_config.get("x")']
    for code in reads:
        assert RAW_READ.search(code), code
    for code in ['cfg["out-dir"] = str(out)', 'node_config.get("site")', "run.lr", "cfgs = 1"]:
        assert not RAW_READ.search(code), code


def test_steps_per_round_are_counted_in_one_place():
    from common.config import steps_for
    from common.train import TrainConfig

    run = RunConfig.from_mapping({"batch-size": 32, "local-epochs": 2})
    for n in (1, 31, 32, 33, 100):
        expected = steps_for(n, 32, 2, 0)
        assert expected == max(1, -(-n // 32)) * 2
        assert run.steps_per_round(n) == TrainConfig.from_run(run).steps_per_round(n)
        assert run.steps_per_round(n) == expected
    assert RunConfig.from_mapping({"local-steps": 5}).steps_per_round(1000) == 5


def test_from_flat_leaves_other_keys_to_their_owners():
    flat = {**RunConfig.defaults().to_flat(), "lr": 0.5, "server-round": 3, "site": "a"}
    assert RunConfig.from_flat(flat).lr == 0.5
    with pytest.raises(ConfigError, match="^server-round=3: unknown key"):
        RunConfig.from_mapping(flat)
    with pytest.raises(ConfigError, match="^lr='x': must be a number$"):
        RunConfig.from_flat({"lr": "x", "site": "a"})
