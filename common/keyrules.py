"""What a schema field allows, read off its pydantic metadata, and pydantic's errors as the
one-line :class:`ConfigError` fedskin shows (``lr='abc': must be a number``).

Imports no other fedskin module but the errors: :mod:`common.config` declares the schema
and uses these to word its refusals; ``fedskin keys`` shows the same rules.
"""

import difflib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from common.errors import ConfigError

_SYMBOL = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TYPE_RULES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_pattern_mismatch": "must not be empty",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def field_rule(field: FieldInfo) -> dict[str, Any]:
    """``choices`` (a ``Literal``), ``ge``/``gt``/``le``/``lt`` bounds and ``nonempty`` (a
    pattern asking for a non-space character) of one field."""
    rule: dict[str, Any] = {}
    if get_origin(field.annotation) is Literal:
        rule["choices"] = get_args(field.annotation)
    for item in field.metadata:
        rule.update(
            {op: getattr(item, op) for op in _SYMBOL if getattr(item, op, None) is not None}
        )
        if getattr(item, "pattern", None):
            rule["nonempty"] = True
    return rule


def field_type(field: FieldInfo) -> str:
    """A field's type as TOML writes it: bool, int, float or str."""
    kind = field.annotation
    return "str" if get_origin(kind) is Literal else getattr(kind, "__name__", str(kind))


def bounds_text(rule: Mapping[str, Any]) -> str:
    """``>= 0 and < 1``: a rule's bounds as the messages and ``fedskin keys`` show them."""
    return " and ".join(f"{_SYMBOL[op]} {rule[op]:g}" for op in _SYMBOL if op in rule)


def unknown_key(key: str, value: Any, known: Sequence[str]) -> ConfigError:
    """An unknown key, named with the nearest known one (if any)."""
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return ConfigError(f"{key}={value!r}: unknown key{hint}")


def config_error(
    err: ValidationError, values: Mapping[str, Any], fields: Mapping[str, FieldInfo], key: str = ""
) -> ConfigError:
    """The first problem pydantic found (an unknown key first) as one line naming the key
    (kebab-case), the value as given and what is allowed; a rule tying keys together is its
    own message. ``fields``: the schema's, by attribute name; ``key``: the one checked, when
    pydantic checked a single value."""
    problems = err.errors()
    first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    if first["loc"]:
        key = str(first["loc"][0]).replace("_", "-")
    if not key:
        return ConfigError(str(first["ctx"]["error"]))
    name = key.replace("-", "_")
    value = values.get(key, values.get(name, first["input"]))
    if first["type"] == "extra_forbidden" or name not in fields:
        return unknown_key(key, value, [n.replace("_", "-") for n in fields])
    return ConfigError(f"{key}={value!r}: {_rule_text(first, field_rule(fields[name]), value)}")


_ADAPTERS: dict[int, TypeAdapter] = {}  # by field: one validator per key and process


def field_value(fields: Mapping[str, FieldInfo], key: str, value: Any, config: ConfigDict) -> Any:
    """One key's value typed and checked by its field's own rule (not the rules tying keys
    together), refused in one line as :func:`config_error` words it."""
    name = key.replace("-", "_")
    if name not in fields:
        raise unknown_key(key, value, [n.replace("_", "-") for n in fields])
    field = fields[name]
    if id(field) not in _ADAPTERS:
        kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        _ADAPTERS[id(field)] = TypeAdapter(kind, config=config)
    try:
        return _ADAPTERS[id(field)].validate_python(value)
    except ValidationError as err:
        raise config_error(err, {key: value}, fields, key) from None


def _rule_text(problem: Mapping[str, Any], rule: Mapping[str, Any], value: Any) -> str:
    kind = problem["type"]
    if kind == "literal_error":
        if not isinstance(value, str):
            return "must be a string"
        return "must be one of " + ", ".join(c or "''" for c in rule["choices"])
    if kind in _BOUNDS:
        return f"must be {bounds_text(rule)}"
    if kind == "value_error":
        return str(problem["ctx"]["error"])
    return _TYPE_RULES.get(kind, problem["msg"])
