"""A site's lifetime privacy ledger (client/ledger.py: PrivacyLedger), as a unit.

Through the real ClientApp handlers: tests/test_site_control.py.
"""

from __future__ import annotations

import pytest

from client.ledger import PrivacyLedger
from common.privacy import DPConfig, DPSession


def test_the_ledger_composes_runs_as_one_accountant() -> None:
    """Two runs' steps and a release, composed with RDP: the same epsilon as one accountant
    over all of them, less than the sum of the runs' own epsilons, and kept by to_json."""
    runs = [DPSession(DPConfig(target_epsilon=2.0, total_rounds=3), 1000, 50, 10) for _ in "ab"]
    ledger = PrivacyLedger()
    for tag, run in zip("ab", runs, strict=True):
        for _ in range(3):
            run.record_steps(run.steps_per_round)
        ledger.record(run.accountant.history, tag, "train")
    delta = runs[0].delta
    both = ledger.epsilon(delta)
    assert max(r.epsilon() for r in runs) < both < sum(r.epsilon() for r in runs)
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.epsilon(delta) == pytest.approx(both)
    assert [e["run-tag"] for e in again.entries] == ["a"] * 3 + ["b"] * 3
    ok, after = again.allows(runs[0].next_round(), delta, both)
    assert not ok and after > both
    assert again.allows([], delta, both) == (True, pytest.approx(both))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        '{"version": 1, "entries": [{"noise": 1.0}]}',
        '{"version": 1, "entries": [{"noise": 0.0, "rate": 0.1, "steps": 5}]}',
        '{"version": 9, "entries": []}',
        "[1, 2]",
    ],
)
def test_an_unreadable_ledger_is_refused(text: str) -> None:
    """A site that cannot read what it spent must not spend more: one line."""
    with pytest.raises(ValueError, match="privacy ledger") as err:
        PrivacyLedger.from_json(text)
    assert "\n" not in str(err.value)
