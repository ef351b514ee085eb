"""The console's line per round: the round of how many, its pooled validation figures, the
sites that failed or were rejected, its time and the time left (mean round time so far)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

FIGURES = (("bal-acc", "balanced_accuracy"), ("acc", "accuracy"), ("auroc", "auroc"))


def eta_text(seconds: Sequence[float], rounds_left: int) -> str:
    """``"ETA 1m05s"`` from the mean round time so far, the first round left out once there
    are others (it also starts the sites and loads their data); ``""`` when none is left."""
    if rounds_left <= 0 or not seconds:
        return ""
    timed = seconds[1:] or seconds
    left = round(sum(timed) / len(timed) * rounds_left)
    return f"ETA {left // 60}m{left % 60:02d}s" if left >= 60 else f"ETA {left}s"


def round_line(record: dict[str, Any], num_rounds: int, seconds: Sequence[float]) -> str:
    """One round's console line; ``seconds``: every round's time so far, this one included."""
    g = record["validation"]["global"]
    eps = record.get("epsilon") or {}
    eps_txt = f" eps max {max(eps.values()):.2f}" if eps else ""
    if central := record.get("central"):
        eps_txt += f" site-level eps {central['epsilon']:.2f}"
    problems = ""  # by name: the sites that failed (an error, or no reply) or were rejected
    for where, said in (("", record), ("validation ", record["validation"])):
        for kind, key in (("failed", "failures"), ("rejected", "rejected")):
            if names := sorted(said.get(key) or {}):
                problems += f" | {where}{kind}: {', '.join(names)}"
    figures = " ".join(
        f"{label} {g.get(key, math.nan):.3f}"
        for label, key in (
            ("bal-acc", "balanced_accuracy"),
            ("acc", "accuracy"),
            ("auroc", "auroc"),
        )
    )
    eta = eta_text(seconds, num_rounds - record["round"])
    return (
        f"round {record['round']}/{num_rounds} | val {figures} | "
        f"{len(record.get('train', {}))} sites trained{eps_txt}{problems} | "
        f"{record['seconds']:.1f}s" + (f" | {eta}" if eta else "")
    )
