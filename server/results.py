"""A run's results: what ``metrics.json`` holds, typed, with its one writer and one reader.

The round loop writes the file after every round (server/report.py: ``write_outputs``);
the runner, ``compare``, ``sweep``, the MLflow tracking and the benchmarks read it back with
:func:`load_results`. A metrics.json in a run folder is input like any other file: a
malformed one is one :class:`ResultsError` line naming the file and the field. The JSON
itself is as before this module existed (keys and values); fields a reader does not name
(a round's ``rolled_back``, the test's ``confusion``, keys of another fedskin) are kept as
they are, so a file read and written again holds the same content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.config import ConfigError, RunConfig
from common.errors import DataError
from common.rundir import RunDir, atomic_write_text

NAN = math.nan


def _number(value: Any) -> Any:
    """A JSON number as written (an integer stays one: "3", not "3.0"); text or a
    boolean is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, not {type(value).__name__}")
    return value


Number = Annotated[Any, AfterValidator(_number)]


class ResultsError(DataError):
    """A metrics.json that is not one this module wrote: one line naming the file and field."""


class _Part(BaseModel):
    """One JSON object of metrics.json: the named fields typed (strictly: "0.5" is not a
    number), any other key kept as it is."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """Its JSON content, as metrics.json holds it."""
        return self.model_dump(by_alias=True, exclude_unset=True)


class Scores(_Part):
    """One site's or the pooled figures of an evaluation (recalls etc. kept as extra keys)."""

    balanced_accuracy: Number | None = NAN
    accuracy: Number | None = NAN
    auroc: Number | None = NAN
    auroc_mel: Number | None = NAN
    n: Number = 0  # pooled: images scored
    num_examples: Number = Field(0, alias="num-examples")  # a site: images scored

    def metric(self, key: str) -> Any:
        """A figure by its key, declared or not (``recall_mel``); None when absent."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key)


class Evaluation(_Part):
    """Every site's scores of one model on one split, pooled (server/evaluation.py)."""

    sites: dict[str, Scores] = Field(default_factory=dict)
    failures: dict[str, str] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict)
    pooled: Scores = Field(default_factory=Scores, alias="global")
    confusion: list[list[Number]] = Field(default_factory=list)  # pooled: true x predicted
    decision_balanced_accuracy: Number | None = NAN
    mean_site_balanced_accuracy: Number | None = NAN


class HeadCalibration(_Part):
    """What the head refit did to the best model (server/refit.py)."""

    method: str = "lda"
    sites: list[str] = Field(default_factory=list)
    kept: bool = False
    epsilon: dict[str, Number] = Field(default_factory=dict)  # each site's after the release
    validation_before: Number | None = None
    validation_after: Number | None = None


class FinalTest(Evaluation):
    """The test of the best round's model, and why training ended early, if it did."""

    best_round: int = 0
    head_calibration: HeadCalibration | None = None
    rejected_at_discovery: dict[str, str] = Field(
        default_factory=dict, alias="rejected-at-discovery"
    )
    stopped: str = ""


class Central(_Part):
    """Site-level DP spent so far, for the whole federation (server/central_dp.py)."""

    epsilon: Number = 0.0
    delta: Number = NAN
    noise_multiplier: Number = NAN


class RoundRecord(_Part):
    """One round: who trained, what they reported, the validation after aggregating."""

    round: int
    sampled: list[str] = Field(default_factory=list)
    train: dict[str, dict[str, Number]] = Field(default_factory=dict)
    failures: dict[str, str] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict)
    epsilon: dict[str, Number | None] | None = None  # each site's cumulative epsilon
    aggregated: bool = False  # absent: not said to be (as the benchmarks always read it)
    central: Central | None = None
    validation: Evaluation = Field(default_factory=Evaluation)
    seconds: Number = NAN


class RunResults(_Part):
    """metrics.json: the run config, classes, rounds, best round and (at the end) the test."""

    config: dict[str, Any] = Field(default_factory=dict)  # flat, as config.toml holds it
    classes: list[str] = Field(default_factory=list)
    rounds: list[RoundRecord] = Field(default_factory=list)
    best_round: int = 0
    test: FinalTest | None = None

    @field_validator("config")
    @classmethod
    def _typed_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            RunConfig.from_flat(value)  # keys of another fedskin left to their owners
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return value

    @classmethod
    def from_json(cls, data: Any, where: str | Path = "metrics.json") -> RunResults:
        """metrics.json's content, checked; one :class:`ResultsError` line otherwise."""
        if not isinstance(data, Mapping):
            raise ResultsError(f"{where}: not a JSON object ({type(data).__name__})")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ResultsError(f"{where}: {_first_error(err)}") from None

    @classmethod
    def of(
        cls,
        config: Mapping[str, Any],
        classes: list[str],
        rounds: list[dict[str, Any]],
        test: Mapping[str, Any] | None,
        best_round: int,
    ) -> RunResults:
        """The loop's plain records (numpy numbers allowed), as the file will hold them."""
        data: dict[str, Any] = {"config": dict(config), "classes": classes, "rounds": rounds}
        data["best_round"] = best_round
        if test is not None:
            data["test"] = test
        return cls.from_json(json.loads(json.dumps(data, default=_plain)), "the run's results")

    def finished(self) -> FinalTest:
        """The test results of a finished run (a run still going has none: ResultsError)."""
        if self.test is None:
            raise ResultsError("no test results: the run has not finished")
        return self.test

    @cached_property
    def run(self) -> RunConfig:
        """The run config, typed (keys of another fedskin left out)."""
        return RunConfig.from_flat(self.config)

    @property
    def seconds(self) -> float:
        """The rounds' time in all."""
        return float(sum(r.seconds for r in self.rounds if math.isfinite(r.seconds)))

    def epsilons(self) -> dict[str, float]:
        """Each site's cumulative sample-level epsilon: the last figure reported, the head
        refit's release (after the rounds) included."""
        eps: dict[str, float] = {}
        for r in self.rounds:
            eps.update({s: float(e) for s, e in (r.epsilon or {}).items() if e is not None})
        if self.test is not None and self.test.head_calibration is not None:
            eps.update({s: float(e) for s, e in self.test.head_calibration.epsilon.items()})
        return eps

    def last_train_value(self, *keys: str) -> dict[str, float]:
        """Each site's last reported train metric named by one of ``keys``."""
        out: dict[str, float] = {}
        for r in self.rounds:
            for site, m in r.train.items():
                for key in (k for k in keys if k in m):  # the last key named wins
                    out[site] = float(m[key])
        return out

    def sites_rejected_for(self, why: str) -> set[str]:
        """The sites some round rejected for exactly ``why``."""
        return {s for r in self.rounds for s, said in r.rejected.items() if said == why}

    def central(self) -> Central | None:
        """The last round's site-level DP figures (cumulative), if any round had them."""
        spent = [r.central for r in self.rounds if r.central]
        return spent[-1] if spent else None


def _first_error(err: ValidationError) -> str:
    """The first problem of a validation, as ``field.path: message`` on one line."""
    first = err.errors()[0]
    where = ".".join(_shown(str(p)) for p in first["loc"])
    said = str(first["msg"]).removeprefix("Value error, ")
    return f"{where or 'top level'}: {_shown(said)[:200]}"


def _shown(text: str) -> str:
    """``text`` on one printable line (a site name in a field path is the file's own)."""
    return text if text.isprintable() else repr(text)


def _plain(o: Any) -> Any:
    """numpy numbers and arrays as JSON numbers and lists; anything else as its text."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_results(path: Path, results: RunResults) -> None:
    """metrics.json, atomically (NaN as JSON's NaN, as it always was)."""
    atomic_write_text(path, json.dumps(results.to_json(), indent=1))


def load_results(run_dir: str | Path) -> RunResults:
    """A run folder's metrics.json, typed; missing or malformed: one :class:`ResultsError`
    line naming the file (and the field)."""
    path = RunDir(Path(run_dir)).metrics
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no metrics.json (the run has not finished a round)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: cannot be read ({_shown(str(err))[:200]})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ResultsError(f"{path}: not JSON ({_shown(str(err))[:200]})") from None
    return RunResults.from_json(data, path)
