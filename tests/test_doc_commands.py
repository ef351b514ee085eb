"""Every `fedskin ...` command in README.md and docs/*.md parses as written; those that
need no data of the user's (`fedskin deploy`) also run as written.

Each command line (fenced blocks, with backslash continuations, and complete inline code
spans) is parsed by the real CLI without running it: the sub-command and every option must
exist, and an experiment's `--config` / `--run-config` must resolve and validate (config
names, keys, types and ranges). Usage synopses with `[...]` placeholders are skipped.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from simulations.cli import app
from simulations.runner import resolve_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\[|\.\.\.|…")  # an elided command, not text a user runs
FILLED_IN = re.compile(r"<[^<>]*>")  # <sample>, <folder>: a value the user fills in


def _fenced_commands(text: str) -> list[str]:
    out: list[str] = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            for part in re.split(r"&&|;", line):  # "... && fedskin simulate"
                part = part.strip()
                if part.startswith("fedskin ") or part == "fedskin":
                    out.append(part)
    return out


def _inline_commands(text: str) -> list[str]:
    spans = re.findall(r"`(fedskin [^`]+)`", re.sub(r"\n\s*", " ", text))
    # a span with options is a command; `fedskin deploy` in a sentence is a mention
    return [s for s in spans if not PLACEHOLDER.search(s) and " -" in s]


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for cmd in dict.fromkeys(_fenced_commands(text) + _inline_commands(text)):
            if not PLACEHOLDER.search(cmd):  # a <value> is checked with a word in its place
                found.append((doc.name, FILLED_IN.sub("value", cmd)))
    return found


def _parse(args: list[str]) -> tuple[list[str], dict]:
    """Walk the click tree as the shell would; returns the command path and its params."""
    cmd: click.Command = typer.main.get_command(app)
    ctx = click.Context(cmd, info_name="fedskin")
    path, rest = [], list(args)
    while isinstance(cmd, click.Group):  # our groups take no options of their own
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"no such command: {name}"
        path.append(name)
        cmd, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    return path, cmd.make_context(path[-1], rest, parent=ctx.parent).params


COMMANDS = doc_commands()


def guide_settings() -> dict[str, str]:
    """The defaults of docs/deployment.md's settings block (``NAME=${NAME:-default}``)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    found = re.findall(r"^(\w+)=\$\{\1:-(.*?)\}(?:\s|$)", text, flags=re.M)
    return {name: value.strip('"') for name, value in found}


def test_the_docs_have_commands() -> None:
    names = {d for d, _ in COMMANDS}
    assert "README.md" in names and len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str) -> None:
    args = shlex.split(command, comments=True)[1:]
    if not args:  # bare `fedskin`: prints help
        return
    if args == ["--version"]:  # the eager top-level option: prints the version, exits 0
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and result.output.strip(), result.output
        return
    path, params = _parse(args)
    if path[:1] in (["simulate"], ["compare"]) or path == ["sweep", "privacy"]:
        # the experiment config a user would run: name resolves, keys and values are valid
        resolve_config(params.get("config"), params.get("run_config"))


def test_a_wrong_command_is_caught() -> None:
    """The checks above can fail: an unknown option, command or config name is refused."""
    with pytest.raises(click.UsageError):
        _parse(["simulate", "--no-such-option"])
    with pytest.raises((click.UsageError, AssertionError)):
        _parse(["sweep", "no-such-grid"])
    with pytest.raises(ValueError, match="config file not found"):
        resolve_config("no_such_config", None)


def test_the_documented_key_commands_run_as_written(tmp_path: Path, monkeypatch) -> None:
    """The `fedskin deploy` commands need no data: each doc's sequence runs for real, in the
    order the doc gives it (new federation, a site added, keys re-issued), in a fresh folder."""
    from typer.testing import CliRunner

    deploy = [(d, c) for d, c in COMMANDS if shlex.split(c, comments=True)[1:2] == ["deploy"]]
    assert {d for d, _ in deploy} >= {"README.md", "deployment.md"}, deploy
    for name, value in guide_settings().items():  # "$SERVER": the guide's own default
        monkeypatch.setenv(name, value)
    for doc in sorted({d for d, _ in deploy}):
        folder = tmp_path / doc
        folder.mkdir()
        monkeypatch.chdir(folder)
        for command in [c for d, c in deploy if d == doc]:
            args = shlex.split(os.path.expandvars(command), comments=True)[1:]
            assert "$" not in " ".join(args), command
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, f"{doc}: {command}\n{result.output}"
        assert any(Path().rglob("*.key")), f"{doc}: no key written"


# ------------------------------------------------------------------ the README's quickstart
# Its commands run as written, with a small synthetic Dataverse folder standing in for the
# HAM10000 download and tiny settings added to the simulation's --run-config.
STAND_IN = "~/data/HAM10000"
TINY_RUN = (
    "model='test_efficientnet' image-size=16 num-server-rounds=1 local-steps=2 batch-size=16 "
    "augment=false"
)


def readme_section(heading: str) -> list[str]:
    """The fenced commands of one README section (up to the next ``## `` heading)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return _fenced_commands(text[start : end if end > 0 else None])


def _run(command: str) -> str:
    args = shlex.split(command, comments=True)[1:]
    if args[0] == "simulate":  # the same run, made tiny
        i = args.index("--run-config") + 1
        args[i] = f"{args[i]} {TINY_RUN}"
    result = CliRunner().invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.output


@pytest.mark.usefixtures("shared_ray")  # the simulation runs on the session's Ray head
def test_the_readme_quickstart_runs_on_a_stand_in(tmp_path: Path, monkeypatch) -> None:
    import json

    from common.data.synth import synthesize

    commands = readme_section("Real images in three commands")
    assert [shlex.split(c)[1] for c in commands] == ["partition", "simulate", "evaluate"]
    data = synthesize("ham-dataverse", tmp_path / "HAM10000", n_images=320, image_size=16)
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    partition, simulate, evaluate = (c.replace(STAND_IN, str(data)) for c in commands)

    printed = _run(partition)
    # partition prints the command that uses the manifest it wrote; it parses as written
    manifest = (tmp_path / "sites.csv").resolve()
    nxt = next(ln.strip() for ln in printed.splitlines() if ln.strip().startswith("fedskin "))
    assert f"manifest='{manifest}'" in nxt and f"data-path='{data.resolve()}'" in nxt, printed
    path, params = _parse(shlex.split(nxt)[1:])
    assert path == ["simulate"]
    assert resolve_config(None, params["run_config"])["manifest"] == str(manifest)

    _run(simulate)
    _run(evaluate)
    run = tmp_path / "runs" / "ham"
    reported = json.loads((run / "metrics.json").read_text())["test"]["global"]
    scored = json.loads((run / "external" / "ham-dataverse" / "metrics.json").read_text())
    assert scored["split"] == "test" and scored["n"] == int(reported["n"])
    assert scored["balanced_accuracy"] == pytest.approx(reported["balanced_accuracy"], abs=1e-3)


def test_the_readme_site_export_partition_prints_its_next_command(tmp_path, monkeypatch) -> None:
    """The hospital export's block: synth and a one-site partition run as written, and the
    command partition prints is the README's next one (absolute paths) and parses."""
    readme = [c for d, c in COMMANDS if d == "README.md"]
    first = next(i for i, c in enumerate(readme) if c.startswith("fedskin synth csv"))
    synth, partition, simulate = readme[first : first + 3]
    assert "synth csv" in synth and "--site" in partition and "manifest=" in simulate
    monkeypatch.setenv("FEDSKIN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _run(synth)

    printed = _run(partition)

    nxt = next(ln.strip() for ln in printed.splitlines() if ln.strip().startswith("fedskin "))
    readme = resolve_config(None, _parse(shlex.split(simulate)[1:])[1]["run_config"])
    given = resolve_config(None, _parse(shlex.split(nxt)[1:])[1]["run_config"])
    for key in ("data-format", "data-path", "manifest"):
        assert Path(str(given[key])) == (tmp_path / str(readme[key])).resolve() or (
            given[key] == readme[key]
        ), key
    assert "site='hospital-a'" in printed  # and how a SuperNode serves it
