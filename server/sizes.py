"""What a site says it holds, pinned at enrolment and capped before it weighs anything.

A site declares its split sizes (and, with ``class-prior = "federation"``, its training
class counts) when the server first asks. Those numbers steer the federation: FedAvg's
weights, the update-norm allowance (a larger site takes more local steps), the federation's
class prior, the pooled validation score that picks the best round and keeps or drops the
head refit. Believed as sent, one site claiming 10x its data took 0.735 of the weight.

Two rules close that:

- **Pinned.** The sizes a site declares at its first discovery are its sizes for good: kept
  in the run's checkpoint (a resumed run compares) and, with ``site-registry`` set, in an
  operator's JSON file (written at the first discovery when it does not exist, enforced
  after; an operator may write it by hand from the sites' own counts). A later discovery
  with other numbers is rejected by name.
- **Capped.** No site counts for more than ``max-site-weight`` of what it is weighed
  against: its size is capped at ``w / (1 - w)`` times the other sites' total (``w`` = 0.5:
  at most the others together), in the aggregation weights, the norm allowance, the class
  prior and the pooled validation score used for decisions. An honest consortium whose
  largest site holds less than half the images is unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.data.schema import DataError
from common.rundir import atomic_write_json

SIZE_KEYS = ("n-train", "n-validation", "n-test")


@dataclass(frozen=True)
class Sizes:
    """A site's declared sizes, as pinned."""

    n_train: int
    n_validation: int
    n_test: int
    train_counts: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k.replace("_", "-"): v for k, v in asdict(self).items()}
        out["train-counts"] = None if self.train_counts is None else list(self.train_counts)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Sizes:
        """From a registry or checkpoint entry; DataError naming ``where`` if malformed."""
        if not isinstance(obj, dict) or not all(_count(obj.get(k)) for k in SIZE_KEYS):
            raise DataError(f"{where}: needs non-negative integers {', '.join(SIZE_KEYS)}")
        counts = obj.get("train-counts")
        if counts is not None and not (isinstance(counts, list) and all(map(_count, counts))):
            raise DataError(f"{where}: train-counts must be a list of non-negative integers")
        return cls(
            int(obj["n-train"]),
            int(obj["n-validation"]),
            int(obj["n-test"]),
            None if counts is None else tuple(int(c) for c in counts),
        )


@dataclass
class SiteInfo:
    """A site as discovery found it: its node and the sizes it declared."""

    node_id: int
    site: str
    n_train: int
    n_validation: int
    n_test: int
    train_counts: tuple[int, ...] | None = None  # reported for class-prior = "federation"

    def sizes(self) -> Sizes:
        return Sizes(self.n_train, self.n_validation, self.n_test, self.train_counts)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def changed(site: str, pinned: Sizes, declared: Sizes, whose: str) -> str | None:
    """Why ``declared`` is refused against what ``site`` was pinned at, or None."""
    for key in ("n_train", "n_validation", "n_test", "train_counts"):
        before, now = getattr(pinned, key), getattr(declared, key)
        if key == "train_counts" and (before is None or now is None):
            continue  # sent only with class-prior = federation and no DP
        if before != now:
            name = key.replace("_", "-")
            return f"site {site!r} declares {name}={now}, but {whose} pinned it at {before}"
    return None


# ---------------------------------------------------------------------------- registry
def read_registry(path: str | Path) -> dict[str, Sizes]:
    """The operator's site registry: ``{"sites": {name: {n-train, n-validation, n-test,
    train-counts?}}}``; empty when the file does not exist yet."""
    path = Path(path).expanduser()
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable site registry ({err})") from None
    sites = obj.get("sites") if isinstance(obj, dict) else None
    if not isinstance(sites, dict):
        raise DataError(f'{path}: a site registry is {{"sites": {{name: sizes}}}}')
    return {str(name): Sizes.from_json(v, f"{path}: site {name!r}") for name, v in sites.items()}


def write_registry(path: str | Path, sites: Mapping[str, Sizes]) -> None:
    """Write the registry atomically (sites sorted by name)."""
    body = {"sites": {name: sites[name].to_json() for name in sorted(sites)}}
    atomic_write_json(Path(path).expanduser(), body, indent=1)


# ---------------------------------------------------------------------------- caps
def capped(sizes: Mapping[str, float], max_weight: float) -> dict[str, float]:
    """Each size capped at ``w / (1 - w)`` times the others' total (``w`` = ``max_weight``;
    1: no cap). With one site there is no one to compare against: its size stands."""
    if max_weight >= 1 or len(sizes) < 2:
        return {k: float(v) for k, v in sizes.items()}
    ratio = max_weight / (1.0 - max_weight)
    total = float(sum(sizes.values()))
    return {k: min(float(v), ratio * (total - float(v))) for k, v in sizes.items()}


def scale_factors(sizes: Mapping[str, float], max_weight: float) -> dict[str, float]:
    """Per site, capped size / declared size (1 when not capped; 0-size sites: 1)."""
    cap = capped(sizes, max_weight)
    return {k: (cap[k] / float(v) if v else 1.0) for k, v in sizes.items()}


def capped_counts(counts: Mapping[str, tuple[int, ...]], max_weight: float) -> list[int] | None:
    """The federation's class counts with each site's counts scaled to its capped size."""
    if not counts:
        return None
    factor = scale_factors({k: sum(v) for k, v in counts.items()}, max_weight)
    width = len(next(iter(counts.values())))
    total = [0.0] * width
    for name, values in counts.items():
        for i, c in enumerate(values):
            total[i] += factor[name] * c
    return [int(math.floor(t + 0.5)) for t in total]
