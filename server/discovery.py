"""Discovery: which site each node is, what it holds, and the sizes it is pinned at.

Each connected node is asked once; a reply that fails its checks (server/replies.py), or
names a site another node also claims, rejects that node by name. The sizes a site
declares are pinned (server/sizes.py): against ``site-registry`` at discovery, and against
the run's checkpoint when a run resumes. A site whose reported fedskin version differs from
the server's (common/version.py) is kept, and named in one warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.version import version
from server.replies import discovery_error, guarded, printable, site_name_error
from server.sizes import (
    SiteInfo,
    Sizes,
    capped_counts,
    changed,
    read_registry,
    write_registry,
)
from server.transport import REASON_LIMIT, Send, claimed, node_ids

log = logging.getLogger("fedskin")


def ordered(sites: Mapping[int, SiteInfo]) -> list[SiteInfo]:
    """The sites by name: the order everything of a round is done in."""
    return sorted(sites.values(), key=lambda s: s.site)


def class_counts(run: RunConfig, sites: Mapping[int, SiteInfo]) -> list[int] | None:
    """The federation's training class counts, which every site's loss uses with
    ``class-prior = "federation"``: the sum of what the sites reported, or None (each
    site uses its own) when any site did not report them (DP, or its own choice)."""
    if run.class_prior != "federation" or not sites:
        return None
    reported = {s.site: s.train_counts for s in ordered(sites)}
    if any(c is None for c in reported.values()):
        return None
    return capped_counts(reported, run.max_site_weight)  # type: ignore[arg-type]


class Roster:
    """The federation's sites by node id (``sites``) and the nodes rejected at discovery
    (``rejected``: node, and claimed site, -> why); both dicts are the caller's, filled
    in place. Names claimed are remembered across discoveries."""

    def __init__(
        self,
        run: RunConfig,
        classes: Sequence[str],
        sites: dict[int, SiteInfo],
        rejected: dict[str, str],
    ) -> None:
        self.run, self.classes = run, list(classes)
        self.sites, self.rejected = sites, rejected
        self._claims: dict[str, list[int]] = {}  # site name -> nodes that claimed it

    def discover(self, grid: Grid, send: Send, expected: int, wait: float) -> None:
        """Wait for the sites, then ask each which site it is and what it holds.

        ``expected`` is ``min-nodes``: fewer usable sites after ``wait`` seconds (nodes that
        connected, answered and sent a valid reply; see server/replies.py) is a RuntimeError
        with the numbers. A reply that fails its checks, or names a site that an earlier
        reply already claimed, rejects that node (logged, and kept in ``rejected``).
        """
        deadline = time.time() + wait
        while len(ids := node_ids(grid)) < expected and time.time() < deadline:
            time.sleep(0.5)
        if len(ids) < expected:
            raise RuntimeError(
                f"only {len(ids)} site(s) connected within wait-for-nodes={wait:g}s; "
                f"min-nodes={expected} are needed"
            )
        msgs = [
            Message(RecordDict({"config": ConfigRecord()}), nid, MessageType.QUERY) for nid in ids
        ]
        replies, missing = send(msgs, "")
        for nid in missing:
            log.error("node %s did not answer the query within %.0fs", nid, self.run.round_timeout)
        for nid, reply in replies.items():  # in the order they arrived
            if reply.has_error():
                why = printable(reply.error.reason, REASON_LIMIT)
                log.error("node %s failed to load its data: %s", nid, why)
                continue
            if why := guarded(self._keep, nid, reply.content):
                self._reject(nid, claimed(reply), why)
        self._drop_contested()
        self._pin_to_registry()
        if not self.sites:
            raise RuntimeError("no site answered; check the SuperNodes' logs")
        if len(self.sites) < expected:
            raise RuntimeError(
                f"only {len(self.sites)} usable site(s) of the {len(ids)} connected "
                f"(min-nodes={expected}); see the errors above"
            )
        self._log_prior()

    def pin_to_checkpoint(self, pinned: dict[str, dict[str, Any]]) -> None:
        """A resumed run's sites must declare what they declared when the run began
        (``pinned``: the checkpoint's site -> sizes, completed with new sites in place)."""
        for nid, site in list(self.sites.items()):
            if site.site in pinned:
                sizes = Sizes.from_json(pinned[site.site], "checkpoint")
                if why := changed(site.site, sizes, site.sizes(), "the run's checkpoint"):
                    del self.sites[nid]
                    self._reject(nid, site.site, why)
                    continue
            pinned[site.site] = site.sizes().to_json()
        if not self.sites:
            raise RuntimeError("no site declares the sizes it was pinned at; see the errors above")

    def _reject(self, nid: int, name: str | None, why: str) -> None:
        who = f"node {nid}" + (f" (site {name!r})" if name else "")
        self.rejected[who] = why
        log.error("%s rejected at discovery: %s", who, why)

    def _keep(self, nid: int, content: RecordDict) -> str | None:
        """Check a query reply and keep its site; why it is rejected, or None."""
        if why := discovery_error(content):
            return why
        info = content.config_records["info"]
        name = str(info["site"])
        taken = [s.site for s in self.sites.values()]
        self._claims.setdefault(name, []).append(nid)
        if name in taken:
            return f"site {name!r} is claimed by more than one node"
        if why := site_name_error(name, taken):
            return why
        if "classes" in info and info["classes"] != json.dumps(self.classes):
            return f"classes={str(info['classes'])[:120]} are not the run's {self.classes}"
        counts = info.get("train-counts")
        if counts is not None and len(counts) != len(self.classes):
            return f"train-counts has {len(counts)} entries for {len(self.classes)} classes"
        self.sites[nid] = SiteInfo(
            nid,
            name,
            int(info["n-train"]),
            int(info["n-validation"]),
            int(info["n-test"]),
            None if counts is None else tuple(int(c) for c in counts),
        )
        self._compare_version(name, info.get("version"))
        return None

    @staticmethod
    def _compare_version(name: str, reported: Any) -> None:
        """One warning for a kept site that runs another fedskin than the server (not a
        rejection: a site may lag an upgrade). A site older than the ``version`` key
        reports none; that is said at INFO."""
        mine = version()
        if reported is None:
            log.info("site %s did not report its fedskin version; the server runs %s", name, mine)
        elif reported != mine:
            log.warning("site %s runs fedskin %s, the server %s", name, printable(reported), mine)

    def _drop_contested(self) -> None:
        """A name claimed by two nodes belongs to neither: the first to answer would win
        otherwise, and an impostor answers fast (both are rejected, by node)."""
        for nid, site in list(self.sites.items()):
            if len(self._claims.get(site.site, [])) > 1:
                del self.sites[nid]
                self._reject(nid, site.site, f"site {site.site!r} is claimed by more than one node")

    def _pin_to_registry(self) -> None:
        """``site-registry``: sizes that differ from the enrolled ones are rejected; sites
        not enrolled yet are enrolled (the file written before round 1)."""
        path = self.run.site_registry
        if not path:
            return
        registry = read_registry(path)
        for nid, site in sorted(self.sites.items(), key=lambda kv: kv[1].site):
            if site.site not in registry:
                registry[site.site] = site.sizes()
                log.info("site %s enrolled in %s", site.site, path)
            elif why := changed(site.site, registry[site.site], site.sizes(), path):
                del self.sites[nid]
                self._reject(nid, site.site, why)
        write_registry(path, registry)

    def _log_prior(self) -> None:
        """Say once which class prior the sites' losses use."""
        if self.run.class_prior != "federation":
            return
        counts = class_counts(self.run, self.sites)
        if counts is None:
            silent = [s.site for s in ordered(self.sites) if s.train_counts is None]
            log.warning(
                "class-prior = federation: %s sent no class counts (DP or its own setting); "
                "every site uses its own prior",
                ", ".join(silent),
            )
        else:
            log.info("class prior: the federation's training counts %s", counts)
