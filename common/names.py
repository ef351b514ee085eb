"""Names that the run config allows and the code that acts on them uses: each defined once.

Imports nothing, so the run config (common/config.py) checks a config without importing the
modules that own these values (some import torch or flwr) and the data pipeline
(common/data/) never imports the run config.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ data
SPLITS: tuple[str, ...] = ("train", "validation", "test")  # a manifest's splits, in order
SCHEMES: tuple[str, ...] = ("natural", "institutions", "dirichlet", "iid")  # partition schemes
# What a data location is made of; node config overrides run config for these keys.
DATA_KEYS: tuple[str, ...] = (
    "data-format",
    "data-path",
    "manifest",
    "site",
    "cache-dir",
    "state-dir",
)
# What the derived manifest depends on (besides the source itself).
MANIFEST_KEYS: tuple[str, ...] = (
    "scheme",
    "num-sites",
    "dirichlet-alpha",
    "institutions",
    "seed",
    "builtin-images",
)

# ------------------------------------------------------------------------------ training
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")  # common/config.py
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "hooks", "functorch", "ghost")  # common/config.py
LOSSES: tuple[str, ...] = (  # common/losses.py
    "ce",
    "weighted-ce",
    "focal",
    "weighted-focal",
    "balanced-softmax",
)
PERSONALIZE: tuple[str, ...] = ("", "fedbn", "finetune", "ditto")  # common/personal.py

# ------------------------------------------------------------------------------ server
# Site-level DP kinds: "" (off) and one Flower wrapper each (server/central_dp.py).
CENTRAL_DP: tuple[str, ...] = (
    "",
    "server-fixed",
    "server-adaptive",
    "client-fixed",
    "client-adaptive",
)
