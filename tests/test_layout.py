"""The package boundary (docs/architecture.md), read from the source's AST so it cannot drift.

`client/` (what a site runs) and `server/` (what the server runs) never import each other;
`common/` imports neither of them nor `simulations/`; and every module in `common/` is used
by at least two of client, server and simulations, directly or through other common
modules (a format's loader and writer count through the registry's ``module:function``
strings in common/data/formats.py). Code one side alone uses lives on that side.
Imports inside functions count as imports.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("client", "server", "simulations")
# A registry entry naming a module and a function in it, e.g. "common.data.ham:load_ham_hf".
SPEC = re.compile(r"^(common(?:\.\w+)+):\w+$")
# Common modules used by fewer than two sides on purpose, each with its reason (none now).
ONE_SIDED: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


ALL = {name: path for side in ("common", *SIDES) for name, path in modules(side).items()}


def imported(path: Path) -> Iterator[str]:
    """Every project module ``path`` imports (at the top or inside a function) or names in a
    ``module:function`` registry string."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in ALL else node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if match := SPEC.match(node.value):
                yield match.group(1)


def top(module: str) -> str:
    return module.split(".")[0]


def crossings(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {target}"
        for path in modules(package).values()
        for target in imported(path)
        if top(target) in forbidden
    ]


def users_of_common() -> dict[str, set[str]]:
    """Each common module -> the sides that reach it, directly or through common modules."""
    reached: dict[str, set[str]] = {name: set() for name in modules("common")}
    for side in SIDES:
        stack, seen = list(modules(side)), set()
        while stack:
            for target in imported(ALL[stack.pop()]):
                if target in reached and target not in seen:
                    seen.add(target)
                    stack.append(target)
        for name in seen:
            reached[name].add(side)
    return reached


def test_the_client_and_the_server_never_import_each_other() -> None:
    assert crossings("client", ("server",)) == []
    assert crossings("server", ("client",)) == []


def test_common_imports_nothing_above_it() -> None:
    assert crossings("common", SIDES) == []


def test_every_common_module_is_used_by_two_sides() -> None:
    packages = {name for name, path in modules("common").items() if path.name == "__init__.py"}
    one_sided = {
        name: sorted(sides)
        for name, sides in users_of_common().items()
        if len(sides) < 2 and name not in packages
    }
    assert one_sided.keys() == ONE_SIDED.keys(), one_sided


def test_the_walk_sees_known_imports(tmp_path: Path) -> None:
    """The checks above are not vacuous: the walk finds what the code is known to import,
    inside a function too."""
    users = users_of_common()
    assert {"client", "server"} <= users["common.headfit"]  # client/task.py, server/lda.py
    assert {"client", "server"} <= users["common.secagg"]
    assert users["common.data.ham"] == set(SIDES)  # through the registry's strings
    assert "client.warm_exec" in set(imported(ROOT / "simulations" / "cli.py"))
    late = tmp_path / "late.py"
    late.write_text("def f():\n    from server.loop import Federation\n", encoding="utf-8")
    assert list(imported(late)) == ["server.loop"]
