"""Checks of every site reply before it touches the federation (see docs/deployment.md).

A site is trusted to train on its own data, not to send well-formed numbers. Each check is
a pure function that returns a one-line reason to reject the reply, or None when it is
fine; :func:`guarded` turns any exception raised while looking at a malformed reply into
such a reason, so that one site's defect rejects that site and never ends the run.

What an honest site sends is fixed by the client code of this version:

- train (``client/client_app.py`` ``train``, ``common/train.py`` ``train_local``): an
  ``arrays`` ArrayRecord laid out as the global model on the wire (``common/wire.py``) and a
  ``metrics`` MetricRecord with exactly :data:`TRAIN_KEYS` (:data:`TRAIN_KEYS_DP` under
  sample-level DP), plus :data:`OPTIONAL_TRAIN_KEYS`; a site that did not train (no data,
  privacy budget spent) sends ``num-examples = 0`` and some of those keys;
- evaluate (``client/task.py`` ``evaluate_site``): :func:`evaluate_keys` for the run's
  classes, with the poolable ``confusion`` and ``score-hist`` of ``common/fedmetrics.py``;
- query: an ``info`` ConfigRecord with :data:`INFO_KEYS`, ``train-counts`` (the training
  images per class) from a site that reports them (``class-prior``), and ``version`` (the
  site's fedskin version, ``common/version.py``) from a site of this version or later.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.fedmetrics import BINS
from common.protocol import TRAIN_KEYS, TRAIN_KEYS_DP

# Documented optional key: the bit Flower's adaptive clipping mod adds (central-dp).
OPTIONAL_TRAIN_KEYS = frozenset({"norm_bit"})
INFO_KEYS = ("site", "n-train", "n-validation", "n-test")
MAX_SITE_NAME = 200
MAX_VERSION = 100  # characters of a site's reported fedskin version


def guarded(check: Callable[..., str | None], *args: Any, **kwargs: Any) -> str | None:
    """``check(*args, **kwargs)``; an exception it raises becomes the reason to reject."""
    try:
        return check(*args, **kwargs)
    except Exception as err:  # a malformed reply must never end the run
        return f"malformed reply ({type(err).__name__}: {_short(err)})"


# ANSI/VT escape sequences: CSI (ESC [ ... final byte, or the 8-bit CSI U+009B), OSC and
# the other string commands (ESC ] / P / X / ^ / _ ... ended by BEL or ESC \\), and the
# two-character ones (ESC + one byte). Removed whole, so a site cannot recolour, move the
# cursor in, retitle or clear the server operator's terminal.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)


def _visible(ch: str) -> str:
    """One character as it may appear in a log line: whitespace (newlines included) a
    space; any other control, format (bidi overrides, zero-width) or unassigned/private
    character its visible escape (``\\x07``, ``\\u202e``); everything else itself."""
    if ch.isspace():
        return " "
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
        code = ord(ch)
        if code < 0x100:
            return f"\\x{code:02x}"
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to put on one line of the server log or into metrics.json.

    Terminal escape sequences (ESC ``[``... colours, cursor moves, OSC titles) are removed;
    newlines, tabs and other whitespace runs become one space; any remaining control or
    invisible format character (bidi overrides, zero-width joiners, ...) becomes a visible
    escape such as ``\\x07`` or ``\\u202e``. The result is cut to ``limit`` characters
    (ending in ``...`` when cut). Use it on every string a site supplies before it goes
    into a reason, a log line or a report.
    """
    text = _ESCAPES.sub("", str(text))
    text = " ".join("".join(_visible(ch) for ch in text).split())
    limit = max(int(limit), 3)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = 120) -> str:
    """``str(value)`` as :func:`printable` shows it: one clean line of at most ``limit``."""
    return printable(str(value), limit)


def _shown(value: Any) -> str:
    """``repr(value)``, shortened for a one-line reason (:func:`printable`)."""
    return _short(repr(value), 60)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _record(content: RecordDict, name: str, kind: type) -> Any:
    """The record ``name`` of ``content`` when it has the expected type, else None."""
    if not isinstance(content, RecordDict) or name not in content:
        return None
    record = content[name]
    return record if isinstance(record, kind) else None


# ----------------------------------------------------------------------------- train
def scalar_metrics_error(metrics: Mapping[str, Any], allow_nan: bool = False) -> str | None:
    """Every value a finite number (``allow_nan``: NaN, "undefined", is allowed too)."""
    for key, value in metrics.items():
        if not _is_number(value):
            return f"metric {_shown(key)} is {type(value).__name__}, not a number"
        if not math.isfinite(float(value)) and not (allow_nan and math.isnan(float(value))):
            return f"metric {_shown(key)} is not finite ({value})"
    return None


def key_set_error(
    keys: Iterable[str], required: Iterable[str], optional: Iterable[str] = ()
) -> str | None:
    """The keys are ``required`` plus any of ``optional``, nothing missing, nothing else."""
    keys, required = set(keys), set(required)
    missing, extra = sorted(required - keys), sorted(keys - required - set(optional))
    if missing or extra:
        shown = [_short(k, 40) for k in extra[:3]]
        return f"metric keys: missing {missing[:3]}, unexpected {shown}"
    return None


def num_examples_error(value: Any, n_train: int) -> str | None:
    """``num-examples``: an integer between 1 and the ``n-train`` reported at discovery."""
    if not _is_int(value):
        return f"num-examples={_shown(value)} is not an integer"
    if not 1 <= int(value) <= n_train:
        return f"num-examples={int(value)} is outside 1..{n_train} (n-train at discovery)"
    return None


def arrays_error(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> str | None:
    """Why an update does not fit the global model's layout: keys, exact dtypes (complex
    or integer data where floats are expected is refused), shapes, finite values."""
    keys = set(arrays.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        return (
            f"wrong keys (missing {missing[:3]}, unexpected {[_short(k, 40) for k in extra[:3]]})"
        )
    for k, ref in reference.items():
        a = arrays[k].numpy()
        if a.dtype != ref.dtype:
            return f"wrong dtype for {k}: {a.dtype} instead of {ref.dtype}"
        if a.shape != ref.shape:
            return f"wrong shape for {k}: {a.shape} instead of {ref.shape}"
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            return f"non-finite values (NaN/Inf) in {k}"
    return None


def skipped_reason(content: RecordDict) -> str | None:
    """Why a valid reply carries no update (``num-examples = 0``), or None if it has one."""
    metrics = _record(content, "metrics", MetricRecord)
    if metrics is None or not _is_int(metrics.get("num-examples")):
        return None
    if int(metrics["num-examples"]) != 0:
        return None
    return "privacy budget spent" if metrics.get("dp-budget-exhausted") else "no data"


def train_reply_error(
    content: RecordDict, reference: Mapping[str, np.ndarray], n_train: int
) -> str | None:
    """Why a train reply must be rejected, or None: records present, finite scalar metrics
    with exactly the expected keys, ``num-examples`` in 1..``n_train`` (0: did not train,
    see :func:`skipped_reason`), arrays matching ``reference`` (the packed global model)."""
    metrics = _record(content, "metrics", MetricRecord)
    if metrics is None:
        return "no 'metrics' MetricRecord in the reply"
    if why := scalar_metrics_error(metrics):
        return why
    if _is_int(metrics.get("num-examples")) and int(metrics["num-examples"]) == 0:
        known = TRAIN_KEYS | TRAIN_KEYS_DP | OPTIONAL_TRAIN_KEYS
        return key_set_error(metrics.keys(), {"num-examples"}, known)
    expected = TRAIN_KEYS_DP if "dp-budget-exhausted" in metrics else TRAIN_KEYS
    if why := key_set_error(metrics.keys(), expected, OPTIONAL_TRAIN_KEYS):
        return why
    if why := num_examples_error(metrics["num-examples"], n_train):
        return why
    arrays = _record(content, "arrays", ArrayRecord)
    if arrays is None:
        return "no 'arrays' ArrayRecord in the reply"
    return arrays_error(arrays, reference)


def update_norm(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over all arrays, in float64."""
    total = 0.0
    for k, ref in reference.items():
        diff = arrays[k].numpy().astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)  # inf for updates beyond float64's range: rejected as too large


def norm_bound_errors(
    norms: Mapping[str, float],
    factor: float,
    cap: float,
    steps: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Updates whose norm exceeds the bound, with the reason, by site.

    Absolute: ``norm <= cap`` (``cap`` 0: no cap). Relative, with 3 or more updates under
    the cap: ``norm <= factor`` x the median norm of the round's *other* updates, each
    rescaled to this site's local steps when it takes more (an update grows with the steps
    taken, and a large hospital takes many more than a small one; ``factor`` 0: off).
    """
    out: dict[str, str] = {}
    if cap > 0:
        for site, norm in norms.items():
            if not norm <= cap:
                out[site] = f"update norm {norm:.3g} exceeds update-norm-cap={cap:g}"
    kept = {s: n for s, n in norms.items() if s not in out}
    if factor <= 0 or len(kept) < 3:
        return out
    steps = steps or {}
    for site, norm in kept.items():
        mine = steps.get(site, 1)
        others = [
            n * max(1.0, mine / max(1, steps.get(s, 1))) for s, n in kept.items() if s != site
        ]
        median = statistics.median(others)
        if median > 0 and norm > factor * median:
            out[site] = (
                f"update norm {norm:.3g} exceeds update-norm-factor={factor:g} x the median "
                f"{median:.3g} of the other updates"
            )
    return out


# -------------------------------------------------------------------------- evaluate
def evaluate_keys(classes: Iterable[str]) -> frozenset[str]:
    """The metric keys of an honest evaluation reply for these classes."""
    keys = {"accuracy", "balanced_accuracy", "auroc", "auroc_mel", "num-examples"}
    for name in classes:
        keys |= {f"recall_{name}", f"auroc_{name}"}
    return frozenset(keys | {"confusion", "score-hist"})


def _counts_error(name: str, values: Any, length: int, most: int) -> str | None:
    if not isinstance(values, list):
        return f"{name} is {type(values).__name__}, not a list of counts"
    if len(values) != length:
        return f"{name} has {len(values)} entries instead of {length}"
    if not all(_is_int(v) for v in values):
        return f"{name} holds values that are not integer counts"
    if min(values, default=0) < 0:
        return f"{name} holds negative counts"
    if sum(values) > most:
        return f"{name} counts {sum(values)} images, more than the {most} reported at discovery"
    return None


def evaluate_reply_error(content: RecordDict, classes: list[str], split_size: int) -> str | None:
    """Why an evaluation reply must be rejected, or None: the expected keys, scalar metrics
    NaN (undefined at this site) or within [0, 1], ``num-examples`` in 0..``split_size`` (the
    split's size reported at discovery), a ``confusion`` of C x C counts and a
    ``score-hist`` of C x 2 x BINS counts, each histogram counting at most the split."""
    metrics = _record(content, "metrics", MetricRecord)
    if metrics is None:
        return "no 'metrics' MetricRecord in the reply"
    if why := key_set_error(metrics.keys(), evaluate_keys(classes)):
        return why
    c = len(classes)
    if why := _counts_error("confusion", metrics["confusion"], c * c, split_size):
        return why
    hist = metrics["score-hist"]
    if why := _counts_error("score-hist", hist, c * 2 * BINS, c * split_size):
        return why
    for k in range(c):  # positives + negatives of one class: every image once at most
        if sum(hist[k * 2 * BINS : (k + 1) * 2 * BINS]) > split_size:
            return f"score-hist of class {k} counts more than the {split_size} images reported"
    scalars = {k: v for k, v in metrics.items() if k not in ("confusion", "score-hist")}
    if why := scalar_metrics_error(scalars, allow_nan=True):
        return why
    n = scalars.pop("num-examples")
    if not _is_int(n) or not 0 <= int(n) <= split_size:
        return f"num-examples={_shown(n)} is outside 0..{split_size} (reported split size)"
    for key, value in scalars.items():
        if not math.isnan(float(value)) and not 0.0 <= float(value) <= 1.0:
            return f"metric {key!r}={value} is outside [0, 1]"
    # an honest site scores every image of its (pinned) split once
    if int(n) != split_size:
        return f"num-examples={int(n)} is not the pinned split size {split_size}"
    if (seen := sum(metrics["confusion"])) != split_size:
        return f"confusion counts {seen} images, not the pinned split size {split_size}"
    return None


# ------------------------------------------------------------------------- discovery
def discovery_error(content: RecordDict) -> str | None:
    """Why a query reply must be rejected, or None: an ``info`` ConfigRecord whose ``site``
    is a non-empty printable name and whose split sizes are non-negative integers; its
    optional ``version`` a non-empty printable string of at most :data:`MAX_VERSION`."""
    info = _record(content, "info", ConfigRecord)
    if info is None:
        return "no 'info' ConfigRecord in the reply"
    site = info.get("site")
    if not isinstance(site, str) or not site.strip():
        return f"site={_shown(site)} is not a non-empty name"
    if len(site) > MAX_SITE_NAME or not site.isprintable():
        return f"site={_shown(site)} is not a printable name of at most {MAX_SITE_NAME}"
    for key in INFO_KEYS[1:]:
        value = info.get(key)
        if not _is_int(value) or int(value) < 0:
            return f"{key}={_shown(value)} is not a non-negative integer"
    if "train-counts" in info:
        counts = info["train-counts"]
        if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
            return f"train-counts={_shown(counts)} is not a list of non-negative integers"
        if sum(counts) != int(info["n-train"]):
            return f"train-counts sum to {sum(counts)}, not n-train={int(info['n-train'])}"
    if "version" in info:
        version = info["version"]
        if not isinstance(version, str) or not version.strip():
            return f"version={_shown(version)} is not a non-empty string"
        if len(version) > MAX_VERSION or not version.isprintable():
            return f"version={_shown(version)} is not a printable string of at most {MAX_VERSION}"
    return None


# Site names a reader could take for one another once printed: case, and the ASCII
# look-alikes 0/O, 1/l/I, rn/m, vv/w and the separators - _ . and space.
_LOOK_ALIKE = str.maketrans({"0": "o", "1": "l", "i": "l", "_": "-", ".": "-", " ": "-"})


def site_skeleton(name: str) -> str:
    """What ``name`` looks like to a reader: NFKC, casefolded, ASCII look-alikes merged.

    Two site names with the same skeleton are confusable in a log or a report (``Alpha``
    and ``alpha``, ``site-1`` and ``site_l``, ``clinic-m`` and ``clinic-rn``).
    """
    text = unicodedata.normalize("NFKC", name).casefold()
    return text.replace("rn", "m").replace("vv", "w").translate(_LOOK_ALIKE)


def site_name_error(name: Any, taken: Iterable[str] = ()) -> str | None:
    """Why a site may not use ``name`` next to the ``taken`` names, or None.

    A site name is printed in every log line, report and metrics.json about that site, so
    it must read as exactly one thing: a string of 1..:data:`MAX_SITE_NAME` printable ASCII
    characters (letters, digits, punctuation, inner single spaces), with no leading or
    trailing space, unchanged by NFKC normalisation. Any non-ASCII character is refused,
    which rules out homoglyphs (Cyrillic ``а`` in ``аlpha``), invisible and bidi
    characters. A name whose :func:`site_skeleton` equals a taken one's is refused as
    confusable; the same name as a taken one is "already claimed by another node".
    """
    if not isinstance(name, str) or not name.strip():
        return f"site={_shown(name)} is not a non-empty name"
    if len(name) > MAX_SITE_NAME:
        return f"site={_shown(name)} is longer than {MAX_SITE_NAME} characters"
    if unicodedata.normalize("NFKC", name) != name or not all(" " <= c <= "~" for c in name):
        return (
            f"site={_shown(name)} is not a plain ASCII name (letters, digits, punctuation); "
            "non-ASCII and control characters are refused"
        )
    if name != name.strip() or "  " in name:
        return f"site={_shown(name)} has leading, trailing or repeated spaces"
    skeleton = site_skeleton(name)
    for other in taken:
        if other == name:
            return f"site {name!r} is already claimed by another node"
        if site_skeleton(str(other)) == skeleton:
            return (
                f"site {name!r} is confusable with the site {printable(repr(other), 60)} "
                "already claimed by another node"
            )
    return None
