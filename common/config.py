"""The run-config schema: every key's default, type, range and one-line help, in one place.

Flower passes the run config around as a flat dict of kebab-case keys (``num-server-rounds``,
``proximal-mu``, ...). :class:`RunConfig` is a pydantic model with one field per key: its
default, its type (strict: an int is a number, ``"true"``/``"false"`` are booleans, choices
ignore case), its range (``ge``/``gt``/``le``/``lt``, ``Literal`` choices) and its help (the
field's description, which ``fedskin keys`` prints). pyproject.toml's
``[tool.flwr.app.config]`` holds the same keys and defaults for ``flwr run``
(tests/test_config.py keeps the two equal). A bad value is a :class:`ConfigError` whose
message is one line naming the key, the value and what is allowed, e.g.
``num-server-rounds=-1: must be >= 1``. :meth:`RunConfig.to_flat` gives the kebab-case dict
back for Flower.
"""

import math
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from common.data.formats import FORMAT_CLASSES  # the format registry: imports no loader
from common.errors import ConfigError as ConfigError
from common.keyrules import config_error, field_rule, field_type, field_value, unknown_key

# Defined once, in a leaf that imports nothing: the code that acts on them imports them too.
from common.names import CENTRAL_DP as CENTRAL_DP  # server/central_dp.py
from common.names import GRAD_SAMPLE_MODES as GRAD_SAMPLE_MODES  # tests/test_config.py
from common.names import LOSSES as LOSSES  # common/losses.py
from common.names import MANIFEST_KEYS as MANIFEST_KEYS  # common/data/site_data.py
from common.names import OPTIMIZERS as OPTIMIZERS  # tests/test_config.py
from common.names import PERSONALIZE as PERSONALIZE  # common/personal.py
from common.names import SCHEMES as SCHEMES  # common/data/partition.py

# The other allowed values. STRATEGIES is owned here (server/strategies.py builds each); the
# rest are used only where the config is read.
STRATEGIES = tuple(  # owned here; server/strategies.py builds each of them
    "fedavg fedprox fedadam fedyogi fedavgm fedmedian fedtrimmedavg krum multikrum bulyan".split()
)
LR_SCHEDULES = ("constant", "cosine")  # common/train.py: round_lr
CLASS_PRIORS = ("federation", "site")  # whose class counts the loss uses (common/train.py)
HEAD_CALIBRATIONS = ("none", "lda")  # common/headfit.py
SECURE_AGGREGATION = ("none", "secagg+")  # server/secagg.py
# Strategies that need each site's update, which SecAgg+ hides.
NEEDS_EACH_UPDATE = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")

FLAMBY_PROXIMAL_MU = 0.001  # FedProx's mu in FLamby's benchmarks (the default)


def _name(key: str) -> str:
    return key.replace("-", "_")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _word(value: Any) -> Any:
    """A choice is matched without case or surrounding spaces."""
    return value.strip().lower() if isinstance(value, str) else value


def _flag(value: Any) -> Any:
    """``"true"``/``"false"`` (any case, spaces around) are booleans; nothing else is."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _one_of(names: tuple[str, ...]) -> Any:
    return Annotated[Literal[names], BeforeValidator(_word)]


Flag = Annotated[bool, BeforeValidator(_flag)]
NonEmpty = Annotated[str, StringConstraints(pattern=r"\S")]
DataFormat = _one_of(tuple(FORMAT_CLASSES))
Scheme = _one_of(SCHEMES)
Optimizer = _one_of(OPTIMIZERS)
LrSchedule = _one_of(LR_SCHEDULES)
Loss = _one_of(LOSSES)
ClassPrior = _one_of(CLASS_PRIORS)
Strategy = _one_of(STRATEGIES)
Personalize = _one_of(PERSONALIZE)
HeadCalibration = _one_of(HEAD_CALIBRATIONS)
GradSampleMode = _one_of(GRAD_SAMPLE_MODES)
CentralDP = _one_of(CENTRAL_DP)
SecureAgg = _one_of(SECURE_AGGREGATION)
SCHEMA = ConfigDict(strict=True, allow_inf_nan=False)  # also each key's own check


class RunConfig(BaseModel):
    """Every key of the run config, typed; constructing one checks it (see module doc)."""

    model_config = ConfigDict(
        **SCHEMA,
        frozen=True,
        extra="forbid",
        alias_generator=_key,
        validate_by_name=True,
        validate_by_alias=True,
    )

    # data
    data_format: DataFormat = Field(
        "synth-ham", description="synth-ham | ham-hf | ham-dataverse | isic2020 | fedisic2019"
    )
    data_path: str = Field(
        "", description='folder of the source files ("" = built-in synthetic set)'
    )
    manifest: str = Field("", description='site/split manifest CSV ("" = made by the runner)')
    scheme: Scheme = Field("natural", description="natural | institutions | dirichlet | iid")
    institutions: str = Field("", description="comma-separated subset for scheme=institutions")
    num_sites: int = Field(4, ge=1, description="dirichlet / iid")
    dirichlet_alpha: float = Field(0.5, gt=0)
    image_size: int = Field(32, ge=8)
    # client/siteconfig.py: a site's cap on image-size
    max_image_size: int = Field(
        512,
        ge=8,
        description=(
            "a site's cap on image-size (its --node-config; the run config may lower it, "
            "never raise it): a larger image-size is refused"
        ),
    )
    cache_dir: str = Field("", description='"" = ~/.cache/fedskin')
    seed: int = Field(0, ge=0)
    builtin_images: int = Field(
        1500, ge=1, description="size of the built-in synthetic HAM10000-like set"
    )
    state_dir: str = Field("", description="where a site keeps its privacy accountant")
    # model and local training
    model: NonEmpty = Field("test_efficientnet")
    pretrained: str = Field(
        "", description='"" | weights FILE | cache | hub (download); server only'
    )
    optimizer: Optimizer = Field("adam", description="adam | sgd | adamw")
    lr: float = Field(0.003, gt=0)
    lr_schedule: LrSchedule = Field(
        "constant", description="constant | cosine (annealed over the rounds)"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    local_epochs: int = Field(2, ge=0)
    local_steps: int = Field(0, ge=0, description=">0 overrides local-epochs")
    loss: Loss = Field(
        "balanced-softmax",
        description=(
            "balanced-softmax | ce | weighted-ce | focal | weighted-focal (balanced-softmax: "
            "CE on logits + log class prior; see common/losses.py)"
        ),
    )
    class_prior: ClassPrior = Field(
        "site",
        description=(
            "site | federation: whose class counts set the loss's prior or weights: the "
            "site's own, or all sites' training images together (each site reports its counts"
            " at discovery; never under DP)"
        ),
    )
    focal_gamma: float = Field(2.0, ge=0)
    augment: Flag = Field(True)
    amp: Flag = Field(True, description="bf16 autocast on CUDA")
    channels_last: Flag = Field(True)
    compile: Flag = Field(False)
    # federation
    strategy: Strategy = Field(
        "fedavg",
        description=(
            "fedavg | fedprox | fedadam | fedyogi | fedavgm robust: fedmedian | fedtrimmedavg"
            " | krum | multikrum | bulyan"
        ),
    )
    proximal_mu: float = Field(
        0.001, ge=0, description="fedprox only; 0.001 as in FLamby (fedprox refuses 0)"
    )
    personalize: Personalize = Field(
        "", description='"" | fedbn | finetune | ditto (docs/personalization.md)'
    )
    finetune_steps: int = Field(
        100, ge=1, description="finetune: local steps on the final model before the test (FLamby)"
    )
    # 0: the run's lr
    finetune_lr: float = Field(
        0.0, ge=0, description="finetune: its learning rate (0: the run's lr)"
    )
    finetune_select: Flag = Field(
        False,
        description="finetune: a site keeps the fine-tuned model only if its validation improves",
    )
    head_calibration: HeadCalibration = Field(
        "none", description="none | lda: refit the final head from the sites' feature statistics"
    )
    ditto_lambda: float = Field(
        0.1, ge=0, description="ditto: weight of (lambda/2)||v - w_global||^2 on the personal model"
    )
    server_lr: float = Field(0.01, gt=0, description="fedadam / fedyogi")
    server_momentum: float = Field(
        0.9, ge=0, lt=1, description="fedavgm (its server learning rate is fixed at 1.0)"
    )
    robust_malicious: int = Field(
        1, ge=0, description="krum / multikrum / bulyan: sites assumed malicious (f)"
    )
    trim_beta: float = Field(
        0.2, ge=0, lt=0.5, description="fedtrimmedavg: fraction cut at each end, in [0, 0.5)"
    )
    multikrum_select: int = Field(
        0, ge=0, description="multikrum: updates averaged (0 = replies - robust-malicious)"
    )
    num_server_rounds: int = Field(5, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_nodes: int = Field(1, ge=1)
    # server/replies.py: 0 = off
    update_norm_factor: float = Field(
        10.0,
        ge=0,
        description=(
            "reject an update whose norm exceeds this x the median of the round's other "
            "updates (with 3 or more; 0 = off)"
        ),
    )
    # idem: 0 = no cap
    update_norm_cap: float = Field(
        10000.0, ge=0, description="reject an update whose norm exceeds this (0 = no cap)"
    )
    # server/loop.py: 1 = no cap
    max_site_weight: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "the largest share of a round's aggregation weight (and of the pooled validation,"
            " the class prior) one site gets (1 = no cap)"
        ),
    )
    # server/sizes.py
    site_registry: str = Field(
        "",
        description=(
            "server: JSON of each site's pinned sizes (written at the first discovery if "
            'missing, enforced after; "" = pinned per run)'
        ),
    )
    # server/loop.py: rollback
    exclude_rounds: int = Field(
        3, ge=0, description="rounds a site sits out after its update was rolled back"
    )
    round_timeout: float = Field(600.0, gt=0)
    min_nodes: int = Field(1, ge=1, description="wait for at least this many sites before round 1")
    wait_for_nodes: float = Field(120.0, ge=0)
    resume: Flag = Field(False, description="continue from the run directory's last checkpoint")
    # common/rundir.py: resume despite a changed config
    force_resume: Flag = Field(
        False,
        description=(
            "with resume: continue even if the config differs from the checkpoint's in a key "
            "that changes the result (common/rundir.py)"
        ),
    )
    out_dir: str = Field("", description='run directory ("" = runs/<name>)')
    run_name: NonEmpty = Field("default")
    tracking_uri: str = Field("", description='MLflow store URI the server logs to ("" = off)')
    # sample-level DP (Opacus)
    dp: Flag = Field(False)
    target_epsilon: float = Field(8.0, gt=0)
    target_delta: float = Field(0.0, ge=0, lt=1, description="0 = 1 / (10 * site train size)")
    noise_multiplier: float = Field(0.0, ge=0, description=">0 overrides target-epsilon")
    max_grad_norm: float = Field(1.0, gt=0)
    dp_physical_batch: int = Field(64, ge=1)
    grad_sample_mode: GradSampleMode = Field("auto", description="auto | hooks | functorch | ghost")
    # common/privacy.py: the head's part of the budget
    dp_head_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description=(
            'with head-calibration = "lda": the part of each site\'s target-epsilon spent on '
            "its feature statistics (the rest on DP-SGD)"
        ),
    )
    # client/headstats.py: private_stats
    dp_head_dims: int = Field(
        16,
        ge=1,
        description=(
            'with head-calibration = "lda": the statistics are of the features projected to '
            "this many dimensions (their noise grows with dims^2)"
        ),
    )
    # client/client_app.py: a site's lifetime budget
    site_epsilon_limit: float = Field(
        24.0,
        gt=0,
        description=(
            "a deployed site's lifetime budget: epsilon over all its DP runs together (its "
            "--node-config; state-dir keeps the ledger)"
        ),
    )
    # site-level DP (Flower's wrappers)
    central_dp: CentralDP = Field(
        "", description='"" | server-fixed | server-adaptive | client-fixed | client-adaptive'
    )
    central_noise: float = Field(
        0.5, ge=0, description="noise multiplier z (std z*clip/m on the mean of m updates)"
    )
    central_clip: float = Field(1.0, gt=0)
    central_epsilon: float = Field(
        0.0, ge=0, description=">0: noise calibrated to this site-level budget (fixed clipping)"
    )
    central_delta: float = Field(0.001, gt=0, lt=1)
    # secure aggregation (server/secagg.py, client/secagg.py)
    # (help: pyproject.toml's comments, word for word; tests/test_cli_help.py compares them)
    secure_aggregation: SecureAgg = Field("none", description="none | secagg+")
    secagg_threshold: float = Field(
        0.6667,
        gt=0,
        description=(
            "sites needed to unmask: a share of those sampled (<= 1; at least 2 sites) or a "
            "count (> 1)"
        ),
    )
    secagg_clip_range: float = Field(
        64.0, gt=0, description="each weighted update entry is clipped to +- this before quantising"
    )
    secagg_quant_range: int = Field(
        1073741824,
        ge=2,
        le=2**30,
        description="quantisation levels (2^30, the most Flower's allow)",
    )
    secagg_modulus: int = Field(
        1099511627776, ge=4, description="masked sums live modulo this power of 2 (2^40)"
    )
    # membership-inference audit
    audit: Flag = Field(False)
    audit_reference: Flag = Field(True)
    # Ray resources of each simulated site (simulations/runner.py backend_config)
    client_num_cpus: float = Field(
        1.0, gt=0, description="CPU cores Ray reserves per simulated site (0.5 = two per core)"
    )
    # -1 = auto; a share of one GPU, or whole GPUs
    client_num_gpus: float = Field(
        -1.0,
        ge=-1,
        description=(
            "share of a GPU per site (0.25 = 4 sites per GPU); -1 = auto: 1/sites (at least "
            "0.1) if fedskin's machine has CUDA, else 0"
        ),
    )
    client_memory_mb: int = Field(
        0, ge=0, description="RAM Ray reserves per site, MiB (0 = no reservation)"
    )

    @field_validator("client_num_gpus")
    @classmethod
    def _auto_or_share(cls, value: float) -> float:
        if -1 < value < 0:
            raise ValueError("must be -1 (auto) or >= 0")
        return value

    @field_validator("client_num_cpus", "client_num_gpus")
    @classmethod
    def _ray_quantity(cls, value: float) -> float:
        if value > 1 and not value.is_integer():  # Ray's rule for resource quantities
            raise ValueError("must be below 1 or a whole number")
        return value

    @model_validator(mode="after")
    def _keys_agree(self) -> "RunConfig":
        """The rules that tie keys together."""
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError(
                f"strategy=fedprox needs proximal-mu > 0 (FLamby uses {FLAMBY_PROXIMAL_MU}); "
                f"got proximal-mu={self.proximal_mu!r}"
            )
        if self.head_calibration != "none" and self.central_dp:
            raise ValueError(
                f"head-calibration={self.head_calibration}: the sites' feature statistics are "
                "not covered by site-level DP; use head-calibration='none' with central-dp"
            )
        if self.head_calibration != "none" and self.dp and self.noise_multiplier > 0:
            raise ValueError(
                f"head-calibration={self.head_calibration} with dp spends dp-head-share of "
                "target-epsilon on the feature statistics: set noise-multiplier=0 (calibrate "
                "to the budget)"
            )
        if self.head_calibration != "none" and self.personalize in ("fedbn", "ditto"):
            raise ValueError(
                f"head-calibration={self.head_calibration} refits the global model's head, "
                f"which personalize={self.personalize} does not score; use one or the other"
            )
        if self.secure_aggregation != "none" and (why := _secure_conflict(self)):
            raise ValueError(f"secure-aggregation={self.secure_aggregation}: {why}")
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ValueError(
                f"local-epochs={self.local_epochs} and local-steps={self.local_steps}: "
                "set local-epochs >= 1 or local-steps >= 1"
            )
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """The schema's defaults, overridden by ``values`` (kebab-case keys), checked."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            raise _error(err, values) from None

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "RunConfig":
        """The run config held in a flat dict that may carry other keys too (a site's merged
        settings hold its node identity and the server's per-message fields; a run
        directory's ``config.toml`` may hold keys of an older fedskin): those are left to
        their owners; the run-config keys are checked as in :meth:`from_mapping`."""
        known = known_keys()
        return cls.from_mapping({k: v for k, v in values.items() if k in known})

    @classmethod
    @cache  # immutable: built once
    def defaults(cls) -> "RunConfig":
        return cls()

    def to_flat(self) -> dict[str, Any]:
        """The flat kebab-case dict Flower carries as the run config."""
        return self.model_dump(by_alias=True)

    def value(self, key: str) -> Any:
        """The typed value of one kebab-case key (for code that handles keys by name)."""
        check_keys({key: None})
        return getattr(self, _name(key))

    def with_values(self, values: Mapping[str, Any]) -> "RunConfig":
        """A copy with some kebab-case keys changed, checked again (itself if none changes)."""
        check_keys(values)
        if all(getattr(self, _name(k)) == v and _same_type(self, k, v) for k, v in values.items()):
            return self
        return self.from_mapping({**self.to_flat(), **values})

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


def _same_type(run: RunConfig, key: str, value: Any) -> bool:
    return type(getattr(run, _name(key))) is type(value)


def steps_for(n_train: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """Local steps per round, the one place they are counted (site training, its privacy
    accountant and the server's update-norm bound all use it): ``local_steps`` if > 0,
    else ``local_epochs`` passes over ``n_train`` images in batches of ``batch_size``."""
    if local_steps > 0:
        return local_steps
    return max(1, math.ceil(n_train / max(1, batch_size))) * max(1, local_epochs)


# ---------------------------------------------------------------------- the schema, by key
def config_keys() -> list[str]:
    """Every run config key, kebab-case, in declaration order."""
    return [_key(name) for name in RunConfig.model_fields]


@cache
def known_keys() -> frozenset[str]:
    """Every run config key, as a set: for code that sorts keys into the run config's and
    others (client/siteconfig.py)."""
    return frozenset(config_keys())


def _secure_conflict(run: RunConfig) -> str | None:
    """Why SecAgg+ cannot serve the rest of ``run`` (the server sees only the sum)."""
    if run.strategy in NEEDS_EACH_UPDATE:
        return f"strategy={run.strategy} needs each site's update, which SecAgg+ hides"
    if run.central_dp:
        return f"central-dp={run.central_dp} clips or weighs each site's update; not with SecAgg+"
    modulus = run.secagg_modulus
    if modulus & (modulus - 1) or modulus <= run.secagg_quant_range:
        return f"secagg-modulus={modulus} must be a power of 2 above secagg-quant-range"
    return None


def check_keys(values: Mapping[str, Any]) -> None:
    """Refuse the first unknown key, by name (and the nearest known one, if any)."""
    known = known_keys()
    for key, value in values.items():
        if key not in known:
            raise unknown_key(str(key), value, config_keys())


def key_type(key: str) -> str:
    """A key's type as TOML writes it: bool, int, float or str."""
    return field_type(RunConfig.model_fields[_name(key)])


def key_rule(key: str) -> dict[str, Any]:
    """What a key allows, read off the schema (common/keyrules.py: field_rule)."""
    return field_rule(RunConfig.model_fields[_name(key)])


def value_of(values: Mapping[str, Any], key: str) -> Any:
    """One key's typed value in a flat dict (its default when absent), checked by its own
    rule without building a whole :class:`RunConfig`: for code that merges layers of
    settings before it builds the one typed config (client/siteconfig.py)."""
    fields = RunConfig.model_fields
    if key not in values:
        return fields[_name(key)].default if _name(key) in fields else check_keys({key: None})
    return field_value(fields, key, values[key], SCHEMA)


def _error(err: ValidationError, values: Mapping[str, Any], key: str = "") -> ConfigError:
    return config_error(err, values, RunConfig.model_fields, key)
