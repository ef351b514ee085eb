"""`fedskin keys [WORD]`: every run-config key with its default, type, rule and help.

Nothing here is written twice: the keys, their types and rules are the fields of
:class:`common.config.RunConfig` (their ``_rule`` metadata), the defaults are the packaged
``common/defaults.toml`` and each key's help is the comment after it in that file (with the
indented ``#`` lines that continue it).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Annotated, Any

import typer

from common.config import DEFAULTS_FILE, RunConfig, config_keys, packaged_defaults

_KEY_LINE = re.compile(r"^([A-Za-z0-9_-]+)\s*=")
_CONTINUATION = re.compile(r"^\s+#\s?(.*)$")
_SYMBOL = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


@dataclass(frozen=True)
class KeyInfo:
    """One run-config key as `fedskin keys` shows it."""

    key: str
    default: Any
    type: str
    allowed: str
    help: str


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
    """Each top-level key's comment in a TOML text, continuation lines joined by a space.

    A key's comment is the ``# ...`` after its value; lines that follow it and start with
    whitespace then ``#`` continue it. Anything else (a key, a ``#`` at the line start)
    ends it.
    """
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


def defaults_text() -> str:
    """The packaged defaults file's text (common/defaults.toml), comments included."""
    return files("common").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")


def _allowed(kind: str, rule: dict[str, Any]) -> str:
    if kind == "bool":
        return "true | false"
    if "choices" in rule:
        return " | ".join(c or "''" for c in rule["choices"])
    bounds = [f"{_SYMBOL[op]} {rule[op]:g}" for op in ("ge", "gt", "le", "lt") if op in rule]
    if rule.get("nonempty"):
        bounds.append("not empty")
    return " and ".join(bounds)


def key_infos() -> list[KeyInfo]:
    """Every run-config key in declaration order (that of common/config.py)."""
    defaults = packaged_defaults()
    helps = toml_comments(defaults_text())
    infos = []
    for f, key in zip(fields(RunConfig), config_keys(), strict=True):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        allowed = _allowed(kind, dict(f.metadata))
        infos.append(KeyInfo(key, defaults.get(key), kind, allowed, helps.get(key, "")))
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
