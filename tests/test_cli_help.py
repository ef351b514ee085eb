"""`fedskin --help` in workflow order, `fedskin keys`, and one-line errors for a mistyped
config name or an unquoted --run-config string."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import RunConfig, config_keys, key_type
from common.data.schema import DataError
from simulations.cli import WORKFLOW, app
from simulations.keys import key_infos, matching, show_default
from simulations.runner import parse_overrides, resolve_config

WIDE = {"COLUMNS": "400"}  # rich wraps table cells at the terminal's width
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_KEY_LINE = re.compile(r"^([A-Za-z0-9_-]+)\s*=")
_CONTINUATION = re.compile(r"^\s+#\s?(.*)$")


def _comment_of(line: str) -> str:
    """The ``# ...`` comment of a TOML line, outside any quoted string ("" if none)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[i + 1 :].strip()
    return ""


def toml_comments(text: str) -> dict[str, str]:
    """Each top-level key's comment in a TOML text, continuation lines joined by a space:
    the ``# ...`` after its value, then lines that start with whitespace then ``#``."""
    helps: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if match := _KEY_LINE.match(line):
            current = match.group(1)
            comment = _comment_of(line[match.end() :])
            helps[current] = [comment] if comment else []
        elif current is not None and (cont := _CONTINUATION.match(line)):
            if cont.group(1).strip():
                helps[current].append(cont.group(1).strip())
        else:
            current = None
    return {key: " ".join(parts) for key, parts in helps.items()}


def pyproject_config_text() -> str:
    """pyproject.toml's [tool.flwr.app.config] table, comments included."""
    text = PYPROJECT.read_text(encoding="utf-8")
    table = text.split("[tool.flwr.app.config]\n", 1)[1]
    return table.split("\n[", 1)[0]


def _commands_listed(output: str) -> list[str]:
    """The command names of the help's Commands panel, in the order shown."""
    panel = output.split("Commands")[1]
    return re.findall(r"^│ ([a-z][a-z-]*)\s{2,}", panel, flags=re.MULTILINE)


def test_help_lists_user_commands_in_workflow_order_and_hides_internal_ones():
    result = CliRunner().invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    listed = _commands_listed(result.output)
    assert listed[:9] == [
        "synth",
        "partition",
        "simulate",
        "compare",
        "sweep",
        "evaluate",
        "deploy",
        "weights",
        "bench",
    ]
    assert listed == list(WORKFLOW)
    assert "site-exec" not in result.output
    assert "deploy-overhead" not in result.output


@pytest.mark.parametrize("hidden", ["site-exec", "deploy-overhead"])
def test_hidden_commands_still_run_and_have_their_own_help(hidden):
    result = CliRunner().invoke(app, [hidden, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"fedskin {hidden}" in result.output or "Usage" in result.output


def test_every_runconfig_field_is_a_key_with_its_schema_default():
    infos = {k.key: k for k in key_infos()}
    defaults = RunConfig.defaults().to_flat()
    with open(PYPROJECT, "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert list(infos) == config_keys()
    for key in config_keys():
        assert infos[key].default == defaults[key] == table[key]
        assert infos[key].type == key_type(key)
    result = CliRunner().invoke(app, ["keys"], env=WIDE)
    assert result.exit_code == 0, result.output
    for key, info in infos.items():
        row = next(line for line in result.output.splitlines() if line.startswith(f"│ {key} "))
        assert row.split("│")[2].strip() == show_default(info.default), (key, row)


def test_a_keys_help_is_its_schema_description_and_pyprojects_comment():
    """`fedskin keys` prints the schema's help; pyproject's table says the same in its
    comments (checked key by key, so neither drifts from the other)."""
    helps = {k.key: k.help for k in key_infos()}
    assert helps == {
        k: RunConfig.model_fields[k.replace("-", "_")].description or "" for k in helps
    }
    assert toml_comments(pyproject_config_text()) == helps
    assert helps["lr-schedule"] == "constant | cosine (annealed over the rounds)"
    assert helps["dirichlet-alpha"] == ""  # no comment, no help
    # a comment continued on indented "#" lines is one line
    assert helps["class-prior"] == (
        "site | federation: whose class counts set the loss's prior or weights: the site's "
        "own, or all sites' training images together (each site reports its counts at "
        "discovery; never under DP)"
    )
    # the same, from the file's own lines: the text after '#' on the key's line
    for line in pyproject_config_text().splitlines():
        key, sep, rest = line.partition("=")
        key = key.strip()
        if sep and key in helps and "#" in rest and not line.startswith(" "):
            assert helps[key].startswith(rest.split("#", 1)[1].strip()), key


def test_toml_comments_parser():
    text = (
        "# header\n"
        "a = 1            # first\n"
        "                 # continued\n"
        'b = "x # not a comment"  # real\n'
        "# section\n"
        "c = true\n"
        "  # an indented comment after a key without one\n"
    )
    assert toml_comments(text) == {
        "a": "first continued",
        "b": "real",
        "c": "an indented comment after a key without one",
    }


def test_keys_shows_rules_and_filters_by_word_in_key_or_help():
    infos = {k.key: k for k in key_infos()}
    assert infos["fraction-train"].allowed == "> 0 and <= 1"
    assert infos["momentum"].allowed == ">= 0 and < 1"
    assert infos["strategy"].allowed.startswith("fedavg | fedprox")
    assert infos["personalize"].allowed.startswith("'' | fedbn")
    assert infos["run-name"].allowed == "not empty"
    assert infos["amp"].allowed == "true | false"
    by_help = [k.key for k in matching("ray reserves")]
    assert by_help == ["client-num-cpus", "client-memory-mb"]
    result = CliRunner().invoke(app, ["keys", "DP"], env=WIDE)
    assert result.exit_code == 0, result.output
    shown = {k.key for k in matching("dp")}
    assert {"dp", "central-dp", "dp-head-share", "class-prior"} <= shown  # class-prior: "DP"
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if "│" in line]
    assert set(rows) - {"key"} == shown
    assert "lr" not in rows
    result = CliRunner().invoke(app, ["keys", "learning-rat"], env=WIDE)
    assert result.exit_code == 1
    assert "no run-config key" in result.stderr


def test_mistyped_config_name_suggests_the_nearest_shipped_ones():
    result = CliRunner().invoke(app, ["simulate", "-c", "ham_natural_cpus"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: config file not found: ham_natural_cpus")
    assert "did you mean ham_natural_cpu" in lines[0]
    with pytest.raises(DataError, match=r"shipped: default, "):
        resolve_config("zzzz")


def test_unquoted_string_in_run_config_names_the_key_and_the_quoted_form():
    result = CliRunner().invoke(app, ["simulate", "--run-config", "data-path=/x/y"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "data-path=/x/y" in lines[0]
    assert "data-path='/x/y'" in lines[0]
    with pytest.raises(DataError, match=r"""model="it's" """.strip()):
        parse_overrides("model=it's")
    with pytest.raises(DataError, match="not key=value"):
        parse_overrides("lr 0.1")
    # what flwr run accepts is unchanged
    assert parse_overrides("data-path='/x/y' lr=0.01 amp=false name=\"a b\"") == {
        "data-path": "/x/y",
        "lr": 0.01,
        "amp": False,
        "name": "a b",
    }


def test_the_command_line_starts_without_torch_timm_or_ray():
    """`fedskin partition`, `keys`, `deploy` and `--help` do not pay for the training stack:
    importing the CLI loads none of torch, timm, Flower's simulation or Ray (it took about
    6 CPU-s when the runner imported the ServerApp and `bench` its sections at the top)."""
    heavy = ("torch", "timm", "ray", "opacus", "flwr.simulation")
    code = (
        "import sys, simulations.cli; print(' '.join(m for m in sys.argv[1:] if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, *heavy], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
