"""The loop's checkpoints: what a restarted server needs, written after every round.

``last.pt`` after every completed round and ``best.pt`` when the decision score improves
(or the head refit wins), each holding the weights, the :class:`LoopState`, the strategy's
state and the run config (common/rundir.py: written atomically, loaded weights only).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.rundir import RunDir, load_checkpoint, save_checkpoint
from server.arrays import numpy_state
from server.resume import Resume, resume_checkpoint
from server.strategies import strategy_state

log = logging.getLogger("fedskin")


@dataclass
class LoopState:
    """Everything a restarted server needs: written after every completed round.
    (common/rundir.py checks a checkpoint's state against these fields, as
    ``server.loop:LoopState``.)"""

    run_tag: str
    round: int = 0
    best_round: int = 0
    best_score: float = -1.0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why training ended before num-server-rounds, if it did
    pinned: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> Sizes.to_json
    excluded: dict[str, int] = field(default_factory=dict)  # site -> first round it may return


class Checkpoints:
    """The run directory's checkpoints for one run config (``cfg``: flat, as stored)."""

    def __init__(self, run_dir: Path, cfg: dict[str, Any], force_resume: bool) -> None:
        self.run_dir, self.cfg, self.force_resume = run_dir, cfg, force_resume
        self.paths = RunDir(run_dir)  # every file of the run directory (common/rundir.py)

    def save(self, name: str, arrays: ArrayRecord, state: LoopState, strategy: Any) -> None:
        save_checkpoint(  # atomic: a crash mid-write never corrupts the last checkpoint
            self.paths.checkpoint(name),
            {k: torch.from_numpy(np.array(v)) for k, v in numpy_state(arrays).items()},
            state.__dict__,
            strategy_state(strategy),
            self.cfg,
        )

    def load_arrays(self, name: str) -> ArrayRecord:
        """A checkpoint's weights (loaded weights only: no code runs from the file)."""
        return ArrayRecord(load_checkpoint(self.paths.checkpoint(name))["arrays"])

    def start(
        self, initial: dict[str, torch.Tensor], resume: bool, checked: Resume | None = None
    ) -> tuple[LoopState, ArrayRecord, dict[str, Any] | None]:
        """The state and weights to start from: the last checkpoint's when resuming (and
        that checkpoint, whose strategy state the loop restores), else fresh ones.

        ``checked``: the run's resume check, made by the ServerApp (server/resume.py); a
        loop started without one (tests) makes it here.
        """
        if resume and checked is None:
            # weights only (no code runs from the file); a changed config is refused unless forced
            checked = Resume(resume_checkpoint(self.run_dir, self.cfg, self.force_resume))
        ck = checked.checkpoint if resume and checked is not None else None
        if ck is not None:
            state = LoopState(**ck["state"])  # keys checked in common/rundir.py
            log.info("resuming after round %d from %s", state.round, self.paths.checkpoint("last"))
            return state, ArrayRecord(ck["arrays"]), ck
        if resume:
            log.warning("resume asked but no checkpoint in %s: starting fresh", self.run_dir)
        return LoopState(run_tag=uuid.uuid4().hex[:12]), ArrayRecord(initial), None
