"""What the server's message says about that one message, read in one place at the site.

A train or evaluate message carries a flat config record. Besides run-config keys (which
:func:`client.siteconfig.site_settings` merges under the site's rules into the one
:class:`common.config.RunConfig` of the message), it holds fields that belong to the message,
not to the run: the round, the server's best round so far, the split to score, the run's tag,
from FedProx the proximal term's mu, and the federation's training class counts.
:class:`ServerAsks` is those fields, typed; nothing else at the site reads them from the
record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Message

CONFIG = "config"  # the message's config record


def message_config(msg: Message | None) -> dict[str, Any]:
    """The message's flat config record (empty without one)."""
    if msg is None or CONFIG not in msg.content.config_records:
        return {}
    return dict(msg.content.config_records[CONFIG])


# The message's own fields (ServerAsks), never merged into the site's run config: FedProx's
# proximal-mu means its term in this round's training, not the run config's key.
OWN_FIELDS = ("server-round", "best-round", "split", "run-tag", "proximal-mu", "class-counts")


def run_values(msg: Message | None) -> dict[str, Any]:
    """The message's config without its own fields: the run-config values it asks for."""
    return {k: v for k, v in message_config(msg).items() if k not in OWN_FIELDS}


@dataclass(frozen=True)
class ServerAsks:
    """The per-message fields of a server message (defaults: what an absent field means)."""

    server_round: int = 0
    best_round: int = 0  # the server's best round so far (at the test: the one scored)
    split: str = "validation"  # client.siteconfig.eval_split refuses anything but val/test
    run_tag: str = "run"  # names the site's privacy accountant file (checked where used)
    proximal_mu: float = 0.0  # FedProx sends it with each train message; else no term
    class_counts: tuple[int, ...] | None = None  # class-prior = "federation" (server/loop.py)

    @classmethod
    def of(cls, msg: Message | None) -> ServerAsks:
        sent = message_config(msg)
        return cls(
            server_round=_typed(sent, "server-round", int, cls.server_round),
            best_round=_typed(sent, "best-round", int, cls.best_round),
            split=str(sent.get("split", cls.split)),
            run_tag=str(sent.get("run-tag", cls.run_tag)),
            proximal_mu=_typed(sent, "proximal-mu", float, cls.proximal_mu),
            class_counts=_counts(sent.get("class-counts")),
        )


def _typed(sent: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """One sent number as ``kind``, or a one-line error naming the field."""
    value = sent.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the server's message: {key}={value!r} is not a number")
    if kind is int and value != int(value):
        raise ValueError(f"the server's message: {key}={value!r} is not an integer")
    return kind(value)


def _counts(value: Any) -> tuple[int, ...] | None:
    """The sent class counts as integers (checked against the classes where used)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"class-counts={value!r} is not a list of integers")
    return tuple(int(v) for v in value)
