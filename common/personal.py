"""Which personalisation a run uses (run-config key ``personalize``; the methods themselves
run at the site: client/personal.py), checked the same way by the site, the ServerApp and
the ``fedskin simulate`` runner.
"""

from __future__ import annotations

from common.config import RunConfig

# Methods that train at the site outside the rounds' (accounted) DP-SGD steps.
NOT_UNDER_DP = ("finetune", "ditto")


def personalize_mode(run: RunConfig) -> str:
    """The run's ``personalize`` value (an unknown one is refused by :class:`RunConfig`);
    refused where it would spend DP budget."""
    mode = run.personalize
    if mode in NOT_UNDER_DP and run.dp:
        raise ValueError(
            f"personalize={mode} is refused with sample-level DP (dp=true): its extra local "
            "training would spend privacy budget that the site's accountant does not count"
        )
    return mode
