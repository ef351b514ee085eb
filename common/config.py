"""One typed run config, validated once where a run enters fedskin.

Flower passes the run config around as a flat dict of kebab-case keys (``num-server-rounds``,
``proximal-mu``, ...). :class:`RunConfig` is that dict with one typed field per key, built
from the packaged defaults (``common/defaults.toml``, a copy of pyproject.toml's
``[tool.flwr.app.config]``) plus whatever a run sets, and checked once: type, range,
allowed values and the few rules that tie keys together. A bad value is a
:class:`ConfigError` whose message is one line naming the key, the value and what is
allowed, e.g. ``num-server-rounds=-1: must be >= 1``. :meth:`RunConfig.to_flat` gives the
kebab-case dict back for Flower.

The rules are declared beside each field (``choices``, ``ge``, ``gt``, ``le``, ``lt``,
``nonempty``); the defaults live only in the TOML file.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cache
from importlib.resources import files
from typing import Any

from common.data.formats import FORMAT_CLASSES  # the format registry: imports no loader
from common.errors import ConfigError as ConfigError

# Defined once, in a leaf that imports nothing: the code that acts on them imports them too.
from common.names import GRAD_SAMPLE_MODES as GRAD_SAMPLE_MODES  # common/privacy.py
from common.names import MANIFEST_KEYS as MANIFEST_KEYS  # common/data/site_data.py
from common.names import OPTIMIZERS as OPTIMIZERS  # common/train.py
from common.names import SCHEMES as SCHEMES  # common/data/partition.py

# The other allowed values. STRATEGIES is owned here; the rest copy constants of modules that
# import torch, so that checking a config stays light (tests/test_config.py checks each
# equals the code's own constant).
STRATEGIES = (  # owned here; server/strategies.py builds each of them
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
# server/strategies.py derives its own from its DP wrappers (CENTRAL_DP_WRAPPERS)
CENTRAL_DP = ("", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
LR_SCHEDULES = ("constant", "cosine")  # common/train.py: round_lr
CLASS_PRIORS = ("federation", "site")  # whose class counts the loss uses (common/train.py)
LOSSES = ("ce", "weighted-ce", "focal", "weighted-focal", "balanced-softmax")  # common/losses.py
PERSONALIZE = ("", "fedbn", "finetune", "ditto")  # common/personal.py
HEAD_CALIBRATIONS = ("none", "lda")  # common/headfit.py

FLAMBY_PROXIMAL_MU = 0.001  # FedProx's mu in FLamby's benchmarks (the packaged default)
DEFAULTS_FILE = "defaults.toml"  # package data of ``common``


def _rule(
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
) -> Any:
    """A field without a default (defaults come from the TOML file) and its rule."""
    rule = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty}
    return field(metadata={k: v for k, v in rule.items() if v is not None and v is not False})


@dataclass(frozen=True)
class RunConfig:
    """Every key of the run config, typed; constructing one checks it (see module doc)."""

    # data
    data_format: str = _rule(choices=tuple(FORMAT_CLASSES))
    data_path: str = _rule()
    manifest: str = _rule()
    scheme: str = _rule(choices=SCHEMES)
    institutions: str = _rule()
    num_sites: int = _rule(ge=1)
    dirichlet_alpha: float = _rule(gt=0)
    image_size: int = _rule(ge=8)
    max_image_size: int = _rule(ge=8)  # common/siteconfig.py: a site's cap on image-size
    cache_dir: str = _rule()
    seed: int = _rule(ge=0)
    builtin_images: int = _rule(ge=1)
    state_dir: str = _rule()
    # model and local training
    model: str = _rule(nonempty=True)
    pretrained: str = _rule()
    optimizer: str = _rule(choices=OPTIMIZERS)
    lr: float = _rule(gt=0)
    lr_schedule: str = _rule(choices=LR_SCHEDULES)
    momentum: float = _rule(ge=0, lt=1)
    weight_decay: float = _rule(ge=0)
    batch_size: int = _rule(ge=1)
    local_epochs: int = _rule(ge=0)
    local_steps: int = _rule(ge=0)
    loss: str = _rule(choices=LOSSES)
    class_prior: str = _rule(choices=CLASS_PRIORS)
    focal_gamma: float = _rule(ge=0)
    augment: bool = _rule()
    amp: bool = _rule()
    channels_last: bool = _rule()
    compile: bool = _rule()
    # federation
    strategy: str = _rule(choices=STRATEGIES)
    proximal_mu: float = _rule(ge=0)
    personalize: str = _rule(choices=PERSONALIZE)
    finetune_steps: int = _rule(ge=1)
    finetune_lr: float = _rule(ge=0)  # 0: the run's lr
    finetune_select: bool = _rule()
    head_calibration: str = _rule(choices=HEAD_CALIBRATIONS)
    ditto_lambda: float = _rule(ge=0)
    server_lr: float = _rule(gt=0)
    server_momentum: float = _rule(ge=0, lt=1)
    robust_malicious: int = _rule(ge=0)
    trim_beta: float = _rule(ge=0, lt=0.5)
    multikrum_select: int = _rule(ge=0)
    num_server_rounds: int = _rule(ge=1)
    fraction_train: float = _rule(gt=0, le=1)
    min_train_nodes: int = _rule(ge=1)
    update_norm_factor: float = _rule(ge=0)  # server/replies.py: 0 = off
    update_norm_cap: float = _rule(ge=0)  # idem: 0 = no cap
    max_site_weight: float = _rule(gt=0, le=1)  # server/loop.py: 1 = no cap
    site_registry: str = _rule()  # server/sizes.py
    exclude_rounds: int = _rule(ge=0)  # server/loop.py: rollback
    round_timeout: float = _rule(gt=0)
    min_nodes: int = _rule(ge=1)
    wait_for_nodes: float = _rule(ge=0)
    resume: bool = _rule()
    force_resume: bool = _rule()  # common/rundir.py: resume despite a changed config
    out_dir: str = _rule()
    run_name: str = _rule(nonempty=True)
    # sample-level DP (Opacus)
    dp: bool = _rule()
    target_epsilon: float = _rule(gt=0)
    target_delta: float = _rule(ge=0, lt=1)
    noise_multiplier: float = _rule(ge=0)
    max_grad_norm: float = _rule(gt=0)
    dp_physical_batch: int = _rule(ge=1)
    grad_sample_mode: str = _rule(choices=GRAD_SAMPLE_MODES)
    dp_head_share: float = _rule(gt=0, lt=1)  # common/privacy.py: the head's part of the budget
    dp_head_dims: int = _rule(ge=1)  # common/headfit.py: private_stats
    site_epsilon_limit: float = _rule(gt=0)  # client/client_app.py: a site's lifetime budget
    # site-level DP (Flower's wrappers)
    central_dp: str = _rule(choices=CENTRAL_DP)
    central_noise: float = _rule(ge=0)
    central_clip: float = _rule(gt=0)
    central_epsilon: float = _rule(ge=0)
    central_delta: float = _rule(gt=0, lt=1)
    # membership-inference audit
    audit: bool = _rule()
    audit_reference: bool = _rule()
    # Ray resources of each simulated site (simulations/runner.py backend_config)
    client_num_cpus: float = _rule(gt=0)
    client_num_gpus: float = _rule(ge=-1)  # -1 = auto; a share of one GPU, or whole GPUs
    client_memory_mb: int = _rule(ge=0)

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ConfigError(
                f"strategy=fedprox needs proximal-mu > 0 (FLamby uses {FLAMBY_PROXIMAL_MU}); "
                f"got proximal-mu={self.proximal_mu!r}"
            )
        if self.head_calibration != "none" and self.central_dp:
            raise ConfigError(
                f"head-calibration={self.head_calibration}: the sites' feature statistics are "
                "not covered by site-level DP; use head-calibration='none' with central-dp"
            )
        if self.head_calibration != "none" and self.dp and self.noise_multiplier > 0:
            raise ConfigError(
                f"head-calibration={self.head_calibration} with dp spends dp-head-share of "
                "target-epsilon on the feature statistics: set noise-multiplier=0 (calibrate "
                "to the budget)"
            )
        if self.head_calibration != "none" and self.personalize in ("fedbn", "ditto"):
            raise ConfigError(
                f"head-calibration={self.head_calibration} refits the global model's head, "
                f"which personalize={self.personalize} does not score; use one or the other"
            )
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ConfigError(
                f"local-epochs={self.local_epochs} and local-steps={self.local_steps}: "
                "set local-epochs >= 1 or local-steps >= 1"
            )
        if -1 < self.client_num_gpus < 0:
            raise ConfigError(
                f"client-num-gpus={self.client_num_gpus!r}: must be -1 (auto) or >= 0"
            )
        shares = {"client-num-cpus": self.client_num_cpus, "client-num-gpus": self.client_num_gpus}
        for key, share in shares.items():
            if share > 1 and not share.is_integer():  # Ray's rule for resource quantities
                raise ConfigError(f"{key}={share!r}: must be below 1 or a whole number")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """The packaged defaults, overridden by ``values`` (kebab-case keys), checked."""
        check_keys(values)
        merged = {**packaged_defaults(), **values}
        return cls(**{_name(k): v for k, v in merged.items()})

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """The run config held in a flat dict that may carry other keys too (a site's merged
        settings hold its node identity and the server's per-message fields; a run
        directory's ``config.toml`` may hold keys of an older fedskin): those are left to
        their owners; the run-config keys are checked as in :meth:`from_mapping`."""
        known = known_keys()
        return cls.from_mapping({k: v for k, v in values.items() if k in known})

    @classmethod
    def defaults(cls) -> RunConfig:
        return cls.from_mapping({})

    def to_flat(self) -> dict[str, Any]:
        """The flat kebab-case dict Flower carries as the run config."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def value(self, key: str) -> Any:
        """The typed value of one kebab-case key (for code that handles keys by name)."""
        check_keys({key: None})
        return getattr(self, _name(key))

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """A copy with some kebab-case keys changed, checked again."""
        check_keys(values)
        return replace(self, **{_name(k): v for k, v in values.items()})

    # ------------------------------------------------------------------ named views
    def steps_per_round(self, n_train: int) -> int:
        """Local steps a site of ``n_train`` images takes per round (see :func:`steps_for`)."""
        return steps_for(n_train, self.batch_size, self.local_epochs, self.local_steps)

    @property
    def private(self) -> bool:
        """Either kind of DP: the model is built with GroupNorm (common/models.py)."""
        return self.dp or bool(self.central_dp)

    def manifest_key(self) -> str:
        """The derived manifest's name part: the values it depends on (``MANIFEST_KEYS``)."""
        return "-".join(str(getattr(self, _name(k))) for k in MANIFEST_KEYS).replace(",", "+")

    def institution_list(self) -> list[str] | None:
        """``institutions`` as a list (None: all of them)."""
        items = [s.strip() for s in self.institutions.split(",") if s.strip()]
        return items or None


def steps_for(n_train: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """Local steps per round, the one place they are counted (site training, its privacy
    accountant and the server's update-norm bound all use it): ``local_steps`` if > 0,
    else ``local_epochs`` passes over ``n_train`` images in batches of ``batch_size``."""
    if local_steps > 0:
        return local_steps
    return max(1, math.ceil(n_train / max(1, batch_size))) * max(1, local_epochs)


def config_keys() -> list[str]:
    """Every run config key, kebab-case, in declaration order."""
    return [_key(f.name) for f in fields(RunConfig)]


@cache
def known_keys() -> frozenset[str]:
    """Every run config key, as a set: for code that sorts keys into the run config's and
    others (common/siteconfig.py)."""
    return frozenset(config_keys())


def check_keys(values: Mapping[str, Any]) -> None:
    """Refuse the first unknown key, by name (and the nearest known one, if any)."""
    known = config_keys()
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{key}={value!r}: unknown key{hint}")


def as_run_config(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``cfg`` itself, or the checked config of a flat dict (missing keys: the defaults)."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_mapping(cfg)


def run_config_of(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``cfg`` itself, or the checked run config held in a flat dict that may carry other
    keys too (:meth:`RunConfig.from_flat`): what code below an entry point takes."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_flat(cfg)


@cache
def _defaults_text() -> str:
    return files("common").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")


def packaged_defaults() -> dict[str, Any]:
    """The raw defaults table shipped with the package (``common/defaults.toml``)."""
    return tomllib.loads(_defaults_text())


def _name(key: str) -> str:
    return key.replace("-", "_")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _fail(key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {rule}")


def _check(f: Any, value: Any) -> Any:
    """``value`` coerced exactly to the field's type and checked against its rule."""
    key, kind, rule = _key(f.name), f.type, f.metadata
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise _fail(key, value, "must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(key, value, "must be a string")
        if "choices" in rule:
            choice = value.strip().lower()
            if choice not in rule["choices"]:
                shown = ", ".join(c or "''" for c in rule["choices"])
                raise _fail(key, value, f"must be one of {shown}")
            return choice
        if rule.get("nonempty") and not value.strip():
            raise _fail(key, value, "must not be empty")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "must be an integer")
        number: int | float = value
    else:  # float: an int is fine and becomes a float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, "must be a number")
        number = float(value)
        if not math.isfinite(number):
            raise _fail(key, value, "must be a finite number")
    bounds = [
        (op, rule[op], test)
        for op, test in (
            ("ge", number >= rule.get("ge", 0)),
            ("gt", number > rule.get("gt", 0)),
            ("le", number <= rule.get("le", 0)),
            ("lt", number < rule.get("lt", 0)),
        )
        if op in rule
    ]
    if not all(ok for _, _, ok in bounds):
        symbol = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        allowed = " and ".join(f"{symbol[op]} {bound:g}" for op, bound, _ in bounds)
        raise _fail(key, value, f"must be {allowed}")
    return number
