"""`fedskin keys [WORD]`: every run-config key with its default, type, rule and help.

Nothing here is written twice: the keys, their defaults, types, rules and one-line help are
the fields of the schema, :class:`common.config.RunConfig` (help: each field's description).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from common.config import RunConfig, config_keys, key_rule, key_type
from common.keyrules import bounds_text


@dataclass(frozen=True)
class KeyInfo:
    """One run-config key as `fedskin keys` shows it."""

    key: str
    default: Any
    type: str
    allowed: str
    help: str


def _allowed(kind: str, rule: dict[str, Any]) -> str:
    if kind == "bool":
        return "true | false"
    if "choices" in rule:
        return " | ".join(c or "''" for c in rule["choices"])
    return "not empty" if rule.get("nonempty") else bounds_text(rule)


def key_infos() -> list[KeyInfo]:
    """Every run-config key in declaration order (that of common/config.py)."""
    defaults, fields = RunConfig.defaults().to_flat(), RunConfig.model_fields
    infos = []
    for key in config_keys():
        kind, help_ = key_type(key), fields[key.replace("-", "_")].description or ""
        infos.append(KeyInfo(key, defaults[key], kind, _allowed(kind, key_rule(key)), help_))
    return infos


def matching(word: str | None) -> list[KeyInfo]:
    """The keys whose name or help holds ``word`` (case-insensitive); all of them if none."""
    infos = key_infos()
    if not word:
        return infos
    needle = word.lower()
    return [k for k in infos if needle in k.key.lower() or needle in k.help.lower()]


def show_default(value: Any) -> str:
    """A default as it is written in TOML (and in --run-config): strings quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def keys_cli(
    word: Annotated[
        str | None,
        typer.Argument(help="show only keys whose name or help contains this (any case)"),
    ] = None,
) -> None:
    """Every run-config key: default, type, allowed values and what it does.

    Set any of them in an experiment TOML file (-c) or with --run-config "key=value".
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    infos = matching(word)
    if not infos:
        near = difflib.get_close_matches(word or "", config_keys(), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        typer.secho(f"no run-config key or help mentions {word!r}{hint}", err=True)
        raise typer.Exit(1)
    title = f"Run-config keys{f' matching {word!r}' if word else ''} ({len(infos)})"
    table = Table(title=title, show_lines=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("type")
    table.add_column("allowed")
    table.add_column("help")
    for k in infos:
        cells = (k.key, show_default(k.default), k.type, k.allowed, k.help)
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    console.print(
        "Set a key in an experiment file (-c FILE) or on the command line: "
        "--run-config \"num-server-rounds=10 strategy='fedprox'\" (strings in quotes)."
    )
