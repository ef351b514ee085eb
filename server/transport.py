"""Messages to the sites and their replies: retries, collection by node, problems by site.

The SuperLink is asked again while it answers with transient errors; replies are matched
to the node each message was sent to (an error reply the SuperLink writes for a node that
went offline names the SuperLink as its source); and the sites of one exchange that failed,
were rejected or stayed silent are recorded by name, with the exchange's own log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from server.replies import guarded, printable
from server.sizes import SiteInfo

log = logging.getLogger("fedskin")
# Each reply's line, at DEBUG: a logger of its own, so ``-v`` shows it even where the
# ServerApp holds "fedskin" at INFO (simulations/runner.py: setup_logging).
detail = logging.getLogger("fedskin.detail")
REASON_LIMIT = 4000  # a site's error text, cleaned to one line: long enough for a traceback


def transient(err: Exception) -> bool:
    """A SuperLink error worth retrying: a 5xx answer (e.g. its SQLite state was locked
    for longer than Flower's 5 s busy timeout on a loaded server) or a dropped connection.
    The SuperLink rolls such a request back, so asking again loses nothing."""
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code >= 500
    return isinstance(err, httpx.TransportError)


def with_retries(call: Any, what: str, patience: float = 120.0) -> Any:
    """``call()``, retried with back-off while the SuperLink answers with transient errors,
    so one busy moment at the server does not fail a whole federated run."""
    deadline, wait = time.monotonic() + patience, 0.5
    while True:
        try:
            return call()
        except Exception as err:
            if not transient(err) or time.monotonic() + wait > deadline:
                raise
            log.warning("SuperLink error while %s (retrying in %.1f s): %s", what, wait, err)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def node_ids(grid: Grid) -> list[int]:
    """The connected nodes, asked with retries."""
    return list(with_retries(lambda: list(grid.get_node_ids()), "listing the sites"))


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    poll: float = 0.02,
    on_reply: Any = None,
) -> tuple[dict[int, Message], list[int]]:
    """Send messages and collect the replies by the node each was *sent to*.

    ``Grid.send_and_receive`` returns bare replies and polls every 3 s; an error reply the
    SuperLink writes for a node that went offline names the SuperLink as its source, not
    the site. Matching ``reply_to_message_id`` against what was sent names the site either
    way. Returns replies by node id and the node ids that did not answer within ``timeout``.
    Polling backs off from ``poll`` to 2 s while nothing arrives, to spare the SuperLink
    (a short first wait: a SecAgg+ key stage's replies come back within a tenth of a second).
    ``on_reply(node_id, reply, done, total)`` is called as each reply arrives (progress).
    """
    pending = {i for i in with_retries(lambda: grid.push_messages(messages), "sending") if i}
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    wait = poll
    while pending and time.monotonic() < deadline:
        ids = set(pending)
        got = list(with_retries(lambda ids=ids: list(grid.pull_messages(ids)), "collecting"))
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            if mid in sent:
                replies[sent[mid]] = reply
                if on_reply is not None:
                    on_reply(sent[mid], reply, len(replies), len(sent))
        if pending:
            wait = poll if got else min(wait * 1.5, 2.0)
            time.sleep(wait)
    return replies, [nid for nid in sent.values() if nid not in replies]


def reported_exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    what: str,
    names: Mapping[int, str],
    received: dict[str, dict[str, Any]],
) -> tuple[dict[int, Message], list[int]]:
    """:func:`exchange`, with one DEBUG line per reply as it arrives when ``what`` names the
    exchange (``names``: site by node id), and every record name and key that came back
    noted in ``received`` (by message type; names and keys, never values: network.json).

    The run's first training exchange is named at INFO (``round 1 training ...``): it holds
    the sites' start-up (model, data), the longest silence before the first round's line."""
    t0 = time.monotonic()
    if what and first_training(messages, received):
        log.info("%s on %d sites ...", what, len(messages))

    def progress(nid: int, reply: Message, done: int, total: int) -> None:
        """Under ``-v`` a long round is never silent: one line per site as its reply
        arrives, with the site's training speed when it reports one."""
        site = names.get(nid, str(nid))
        speed = ""
        if reply.has_content() and "metrics" in reply.content.metric_records:
            ips = reply.content.metric_records["metrics"].get("images_per_second")
            speed = f", {float(ips):.0f} images/s" if isinstance(ips, (int, float)) else ""
        detail.debug(
            "%s: %s replied (%d/%d sites, %.0fs%s)",
            what,
            site,
            done,
            total,
            time.monotonic() - t0,
            speed,
        )

    replies, missing = exchange(grid, messages, timeout, on_reply=progress if what else None)
    for reply in replies.values():
        if reply.has_content():
            seen = received.setdefault(reply.metadata.message_type, {})
            for name, record in reply.content.items():
                if isinstance(record, ArrayRecord):
                    kind = "feature statistics" if name == "stats" else "model weights"
                    seen[name] = f"ArrayRecord: {kind} ({len(record)} arrays)"
                else:
                    seen[name] = sorted(set(seen.get(name, [])) | set(record.keys()))
    return replies, missing


def first_training(messages: list[Message], received: Mapping[str, Any]) -> bool:
    """Training messages, and no training reply received yet in this run."""
    kind = MessageType.TRAIN
    return bool(messages) and messages[0].metadata.message_type == kind and kind not in received


Send = Callable[[list[Message], str], tuple[dict[int, Message], list[int]]]


def claimed(reply: Message) -> str | None:
    """The site name a reply claims, for the log, when there is a readable one."""
    try:
        name = reply.content.config_records["info"]["site"]
    except Exception:
        return None
    return printable(name, 80) if isinstance(name, str) and name.strip() else None


def by_site(replies: Mapping[int, Message], by_node: Mapping[int, SiteInfo]) -> list:
    """The replies as (node id, reply) in the order of their sites' names."""
    return sorted(replies.items(), key=lambda kv: by_node[kv[0]].site)


@dataclass(frozen=True)
class Wording:
    """The log lines of one exchange's problems. Each format takes ``context`` (the round or
    the split) first, then the site name, so training and evaluation keep their own words."""

    context: int | str
    failed: str  # ... site, reason
    rejected: str  # ... site, why
    silent: str  # ... site


@dataclass
class Problems:
    """Sites of one exchange that failed (an error reply, or none in time) or were rejected
    (a reply that failed its checks), by site name in the order found: metrics.json records
    both, and the same loop serves training and evaluation."""

    wording: Wording
    timeout: float
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def collect(
        self,
        replies: Iterable[tuple[int, Message]],
        by_node: Mapping[int, SiteInfo],
        take: Callable[[SiteInfo, Message], str | None],
    ) -> None:
        """Pass each reply that is not an error to ``take`` (server/replies.py checks);
        any defect, or exception, rejects that site only."""
        for nid, reply in replies:
            name = by_node[nid].site
            if reply.has_error():  # the site's own words: one clean line (server/replies.py)
                self.failures[name] = printable(reply.error.reason, REASON_LIMIT)
                log.error(self.wording.failed, self.wording.context, name, self.failures[name])
                continue
            if why := guarded(take, by_node[nid], reply):
                self.reject(name, why)

    def reject(self, name: str, why: str) -> None:
        self.rejected[name] = why
        log.error(self.wording.rejected, self.wording.context, name, why)

    def missing(self, node_ids: Iterable[int], by_node: Mapping[int, SiteInfo]) -> None:
        """Sites that did not reply within the round timeout."""
        for nid in node_ids:
            site = by_node[nid].site
            self.failures[site] = f"no reply within {self.timeout:.0f}s"
            log.error(self.wording.silent, self.wording.context, site)


class SelectedGrid:
    """A view of the grid that shows the strategy only the nodes the loop sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
