"""A deployed site's lifetime privacy ledger: every DP release it made, over all its runs.

Only the site keeps one (client/client_app.py, in ``<state-dir>/<site>-privacy-ledger.json``);
its epsilon is composed with the same RDP accountant as a run's (common/privacy.py).
"""

from __future__ import annotations

import json
from typing import Any

from common.privacy import rdp_epsilon


class PrivacyLedger:
    """A deployed site's lifetime record of every DP release it made, over all runs.

    One :class:`DPSession` accounts for one run (its file is named by the server's run tag):
    a new run, or a restart under a new tag, starts a fresh budget. The ledger is what no run
    resets: every noisy step and statistics release of every run, as RDP accountant entries
    ``(noise multiplier, sample rate, steps)`` (the run tag is kept beside each, for the
    record only). Its epsilon composes all of them with the RDP accountant, exactly as one
    session composes its rounds: tighter than summing the runs' epsilons, and as valid (RDP
    composes over any sequence of Gaussian mechanisms on the same records, whatever each
    run's noise or sampling rate). Before a site spends anything it checks that the ledger
    plus the spending stays within ``site-epsilon-limit`` (:meth:`allows`).
    """

    VERSION = 1

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self.entries: list[dict[str, Any]] = list(entries or [])

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(e["noise"]), float(e["rate"]), int(e["steps"])) for e in self.entries]

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] | None = None) -> float:
        """Lifetime epsilon at ``delta`` of everything recorded, plus ``extra`` if given."""
        return rdp_epsilon([*self.history, *(extra or [])], delta)

    def allows(
        self, spend: list[tuple[float, float, int]], delta: float, limit: float
    ) -> tuple[bool, float]:
        """Whether ``spend`` keeps the lifetime epsilon within ``limit``; that epsilon."""
        after = self.epsilon(delta, spend)
        return after <= limit * (1 + 1e-9), after

    def record(self, spent: list[tuple[float, float, int]], run_tag: str, what: str) -> None:
        """Add releases made (``what``: "train" or "statistics"), e.g. a round's steps."""
        for noise, rate, steps in spent:
            if steps > 0:
                entry = {"noise": float(noise), "rate": float(rate), "steps": int(steps)}
                self.entries.append({**entry, "run-tag": str(run_tag), "what": what})

    def to_json(self) -> str:
        return json.dumps({"version": self.VERSION, "entries": self.entries})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """The saved ledger; ValueError (one line) if it is not one: a site that cannot
        read what it spent must not spend more."""
        try:
            saved = json.loads(text)
            entries = saved["entries"]
            ledger = cls(entries)
            history = ledger.history
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"unreadable privacy ledger ({type(err).__name__})") from None
        if saved.get("version") != cls.VERSION or any(
            not (n > 0 and 0 < q <= 1 and t >= 1) for n, q, t in history
        ):
            raise ValueError("privacy ledger holds entries this fedskin cannot account")
        return ledger
