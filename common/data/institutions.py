"""Simulated ISIC source institutions for ``fedskin partition --scheme institutions``.

Sources that record no hospital (ISIC 2020, a HAM dump without ``dataset``) can still be split
into sites that differ the way real hospitals do. Each institution named by the ISIC archive
gets a :class:`InstitutionProfile` built from published statistics (diagnosis mix, age,
how diagnoses were confirmed, size); each lesion/patient group is then sent to the
institution where it is most plausible, by seeded sampling from

    P(institution | group) ∝ size^SIZE_TEMPER · P(label | inst) · N(age; mean, sd)
                             · anatomic-site preference · P(dx_type | inst)

If the pooled data were exactly the mixture of the institutions, this Bayes posterior would
hand every institution back its own published diagnosis mix; on other pools it still yields
sites whose label mix and ages differ as much as the profiles do, not a random split.

Published figures (copied here; nothing is read at run time):

* HAM10000 by source: Tschandl, Rosendahl & Kittler (2018), "The HAM10000 dataset, a large
  collection of multi-source dermatoscopic images of common pigmented skin lesions",
  Sci Data 5:180161, doi:10.1038/sdata.2018.161; per-image metadata on Harvard Dataverse
  (doi:10.7910/DVN/DBW86T, ``HAM10000_metadata``: ``dataset``, ``dx``, ``dx_type``, ``age``).
* Fed-ISIC2019 centres: Ogier du Terrail et al. (2022), "FLamby: Datasets and Benchmarks for
  Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS Datasets and
  Benchmarks, Table/Fig. of Fed-ISIC2019 per-centre label counts.
* ISIC 2020: Rotemberg et al. (2021), "A patient-centric dataset of images and metadata for
  identifying melanomas using clinical context", Sci Data 8:34, doi:10.1038/s41597-021-00815-z:
  33,126 images of 2,056 patients, 584 melanomas (1.8%), contributed by Hospital Clínic de
  Barcelona, Medical University of Vienna, Memorial Sloan Kettering, Melanoma Institute
  Australia, University of Queensland and University of Athens. It publishes no
  per-institution counts, so every MIA / Athens figure and every figure listed in a profile's
  ``assumed`` field is an assumption, stated as such below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.data.schema import DataError

# Canonical diagnosis vocabulary: the eight ISIC 2019 classes in lower case. HAM's ``akiec``
# (actinic keratosis + Bowen's disease) and ISIC 2020's benign/malignant map onto it below.
CANONICAL: tuple[str, ...] = ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc")

# HAM ``akiec`` = AK + intraepidermal carcinoma (Bowen's, an SCC in situ). Where only HAM counts
# exist, akiec is split AK:SCC in Barcelona's published ratio 737:431 (FLamby BCN) — assumption.
_AK_SHARE_OF_AKIEC = 737 / (737 + 431)

# Class-name (lower case) -> canonical classes it covers. ISIC 2020 "malignant" is melanoma
# (the 584 malignant images are the 584 melanomas, Rotemberg et al. 2021).
_CLASS_MAP: dict[str, tuple[str, ...]] = {
    **{c: (c,) for c in CANONICAL},
    "akiec": ("ak", "scc"),
    "malignant": ("mel",),
    "melanoma": ("mel",),
    "benign": ("nv", "bcc", "ak", "bkl", "df", "vasc", "scc"),
}

# Severity rank used to give a multi-image group one label (lower = more severe): a patient
# with one melanoma among ten nevi is a melanoma patient. Unknown class names rank last, so
# the group's majority label decides for them.
SEVERITY: dict[str, int] = {
    "mel": 0,
    "melanoma": 0,
    "malignant": 0,
    "scc": 1,
    "bcc": 2,
    "akiec": 3,
    "ak": 3,
    "vasc": 4,
    "df": 5,
    "bkl": 6,
    "nv": 7,
    "benign": 7,
}

# Coarse body regions; loaders normalise anatom_site to lower case but keep each source's own
# vocabulary (HAM "lower extremity", ISIC 2020 "torso", "head/neck", "palms/soles", ...).
_REGION_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acral", ("acral", "palm", "sole", "foot", "hand")),
    ("genital", ("genital", "oral")),
    ("head_neck", ("head", "neck", "face", "scalp", "ear", "lip", "nose")),
    ("trunk", ("trunk", "torso", "back", "chest", "abdomen")),
    ("upper_limb", ("upper extremity", "upper limb", "arm", "shoulder")),
    ("lower_limb", ("lower extremity", "lower limb", "leg", "thigh")),
)

# dx_type aliases: HAM uses histo/follow_up/consensus/confocal, ISIC 2020 spells them out.
_DX_ALIASES: dict[str, str] = {
    "histo": "histo",
    "histopathology": "histo",
    "follow_up": "follow_up",
    "serial imaging showing no change": "follow_up",
    "consensus": "consensus",
    "single image expert consensus": "consensus",
    "confocal": "confocal",
    "confocal microscopy with consensus dermoscopy": "confocal",
}

SIZE_TEMPER = 0.5  # sizes span 15x (BCN 12,413 vs MSK 819); sqrt keeps small sites trainable
_CLASS_FLOOR = 0.005  # a class no record shows at an institution is rare there, not impossible
_DX_FLOOR = 0.02
_STREAM = 0x1A57  # tags this module's random stream (see assign_institutions)


@dataclass(frozen=True)
class InstitutionProfile:
    """What distinguishes one hospital's images, with where each number came from."""

    key: str
    name: str
    diagnosis_mix: Mapping[str, float]  # over CANONICAL, sums to 1
    age_mean: float
    age_sd: float
    site_preference: Mapping[str, float]  # body region -> relative weight (1 = neutral)
    dx_type_mix: Mapping[str, float]  # histo / follow_up / consensus / confocal, sums to 1
    relative_size: float  # images contributed (published where known)
    source: str  # citation of the published figures
    assumed: tuple[str, ...] = field(default=())  # fields that are assumptions, not published

    def class_probs(self, classes: Sequence[str]) -> np.ndarray:
        """P(label) over a source's own class list (HAM 7, ISIC 2019 8, ISIC 2020 2)."""
        p = np.array(
            [
                sum(self.diagnosis_mix.get(c, 0.0) for c in _CLASS_MAP[n.lower()])
                if n.lower() in _CLASS_MAP
                else 1.0 / len(classes)
                for n in classes
            ],
            dtype=float,
        )
        p = np.maximum(p / max(p.sum(), 1e-12), _CLASS_FLOOR)
        return p / p.sum()


def _normalise(counts: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(counts.values()))
    return {k: v / total for k, v in counts.items()}


def _from_ham(akiec: float, bcc: float, bkl: float, df: float, mel: float, nv: float, vasc: float):
    """Canonical mix from HAM10000 per-source dx counts (akiec split AK:SCC, see above)."""
    return _normalise(
        {
            "mel": mel,
            "nv": nv,
            "bcc": bcc,
            "ak": akiec * _AK_SHARE_OF_AKIEC,
            "bkl": bkl,
            "df": df,
            "vasc": vasc,
            "scc": akiec * (1 - _AK_SHARE_OF_AKIEC),
        }
    )


# --- Vienna: HAM10000 vidir_molemax + vidir_modern + vienna_dias (Tschandl et al. 2018) ---
# vidir_molemax 3954: akiec 0, bcc 2, bkl 124, df 30, mel 24, nv 3720, vasc 54;
#   dx_type follow_up 3704, consensus 202, histo 48; mean age 49.
# vidir_modern 3363: akiec 32, bcc 211, bkl 475, df 51, mel 680, nv 1832, vasc 82;
#   histo 2594, consensus 700, confocal 69; mean age 51.
# vienna_dias 439: akiec 0, bcc 5, bkl 10, df 4, mel 67, nv 350, vasc 3; histo 439; mean age 44.
_VIENNA_N = 3954 + 3363 + 439
_VIENNA = InstitutionProfile(
    key="vienna",
    name="Medical University of Vienna",
    diagnosis_mix=_from_ham(
        akiec=0 + 32 + 0,
        bcc=2 + 211 + 5,
        bkl=124 + 475 + 10,
        df=30 + 51 + 4,
        mel=24 + 680 + 67,
        nv=3720 + 1832 + 350,
        vasc=54 + 82 + 3,
    ),
    age_mean=(3954 * 49 + 3363 * 51 + 439 * 44) / _VIENNA_N,  # 49.6, size-weighted
    age_sd=16.0,  # assumed: HAM reports means only
    # assumed: MoleMax follow-up of multiple-nevus patients is mostly trunk/back
    site_preference={"trunk": 1.3, "lower_limb": 1.1, "head_neck": 0.8},
    dx_type_mix=_normalise(
        {"follow_up": 3704, "consensus": 202 + 700, "histo": 48 + 2594 + 439, "confocal": 69}
    ),
    relative_size=_VIENNA_N,
    source="Tschandl et al. 2018 Sci Data 5:180161 (HAM10000 vidir_*/vienna_dias)",
    assumed=("age_sd", "site_preference"),
)

# --- Queensland: HAM10000 rosendahl (Cliff Rosendahl's skin-cancer practice, Queensland) ---
# 2259 images: akiec 295, bcc 296, bkl 490, df 30, mel 342, nv 803, vasc 3; histo 2259; age 60.
_QUEENSLAND = InstitutionProfile(
    key="queensland",
    name="University of Queensland",
    diagnosis_mix=_from_ham(akiec=295, bcc=296, bkl=490, df=30, mel=342, nv=803, vasc=3),
    age_mean=60.0,
    age_sd=15.0,  # assumed
    # assumed: high-UV population, keratinocyte cancers on chronically sun-exposed skin
    site_preference={"head_neck": 1.8, "upper_limb": 1.4, "trunk": 0.8, "lower_limb": 0.9},
    dx_type_mix={"histo": 1.0},
    relative_size=2259,
    source="Tschandl et al. 2018 Sci Data 5:180161 (HAM10000 rosendahl)",
    assumed=("age_sd", "site_preference"),
)

# --- Barcelona: FLamby Fed-ISIC2019 centre BCN (Ogier du Terrail et al. 2022) ---
# 12413 images: MEL 2857, NV 4206, BCC 2809, AK 737, BKL 1138, DF 124, VASC 111, SCC 431.
_BARCELONA = InstitutionProfile(
    key="barcelona",
    name="Hospital Clinic de Barcelona",
    diagnosis_mix=_normalise(
        {
            "mel": 2857,
            "nv": 4206,
            "bcc": 2809,
            "ak": 737,
            "bkl": 1138,
            "df": 124,
            "vasc": 111,
            "scc": 431,
        }
    ),
    age_mean=56.0,  # assumed: tertiary dermato-oncology clinic, many BCC/AK patients
    age_sd=18.0,  # assumed
    site_preference={"head_neck": 1.2},  # assumed: BCC/AK share -> face and scalp
    dx_type_mix={"histo": 0.7, "consensus": 0.2, "follow_up": 0.1},  # assumed
    relative_size=12413,
    source="Ogier du Terrail et al. 2022 NeurIPS (FLamby Fed-ISIC2019, centre BCN)",
    assumed=("age_mean", "age_sd", "site_preference", "dx_type_mix"),
)

# --- MSKCC: FLamby Fed-ISIC2019 centre MSK (Ogier du Terrail et al. 2022) ---
# 819 images: MEL 215, NV 415, BKL 189; no BCC/AK/DF/VASC/SCC.
_MSKCC = InstitutionProfile(
    key="mskcc",
    name="Memorial Sloan Kettering Cancer Center",
    diagnosis_mix=_normalise({"mel": 215, "nv": 415, "bkl": 189}),
    age_mean=54.0,  # assumed: cancer-centre surveillance population
    age_sd=15.0,  # assumed
    site_preference={"trunk": 1.2},  # assumed
    dx_type_mix={"histo": 0.8, "consensus": 0.1, "follow_up": 0.1},  # assumed
    relative_size=819,
    source="Ogier du Terrail et al. 2022 NeurIPS (FLamby Fed-ISIC2019, centre MSK)",
    assumed=("age_mean", "age_sd", "site_preference", "dx_type_mix"),
)

# --- Melanoma Institute Australia: contributed to ISIC 2020, no per-site counts published ---
_MIA = InstitutionProfile(
    key="mia",
    name="Melanoma Institute Australia",
    # assumed: melanoma referral centre -> high melanoma share, high-UV population
    diagnosis_mix=_normalise(
        {"mel": 35, "nv": 40, "bkl": 9, "bcc": 8, "ak": 2, "scc": 2, "df": 2, "vasc": 2}
    ),
    age_mean=58.0,  # assumed: older referral patients
    age_sd=15.0,  # assumed
    site_preference={"trunk": 1.6, "head_neck": 0.9, "lower_limb": 0.9},  # assumed: back/trunk
    # assumed: sequential digital dermoscopy monitoring besides excision
    dx_type_mix={"histo": 0.75, "follow_up": 0.2, "consensus": 0.05},
    relative_size=3000,  # assumed
    source="Rotemberg et al. 2021 Sci Data 8:34 (contributor only; all figures assumed)",
    assumed=(
        "diagnosis_mix",
        "age_mean",
        "age_sd",
        "site_preference",
        "dx_type_mix",
        "relative_size",
    ),
)

# --- University of Athens: contributed to ISIC 2020, no per-site counts published ---
_ATHENS = InstitutionProfile(
    key="athens",
    name="University of Athens",
    # assumed: Mediterranean general dermatology population -> mostly nevi
    diagnosis_mix=_normalise(
        {"nv": 72, "mel": 8, "bkl": 8, "bcc": 5, "df": 3, "vasc": 2, "ak": 1, "scc": 1}
    ),
    age_mean=40.0,  # assumed: younger patients
    age_sd=14.0,  # assumed
    site_preference={"lower_limb": 1.3, "trunk": 1.1, "head_neck": 0.7},  # assumed
    dx_type_mix={"consensus": 0.4, "follow_up": 0.3, "histo": 0.3},  # assumed
    relative_size=1500,  # assumed
    source="Rotemberg et al. 2021 Sci Data 8:34 (contributor only; all figures assumed)",
    assumed=(
        "diagnosis_mix",
        "age_mean",
        "age_sd",
        "site_preference",
        "dx_type_mix",
        "relative_size",
    ),
)

PROFILES: dict[str, InstitutionProfile] = {
    p.key: p for p in (_VIENNA, _BARCELONA, _MSKCC, _MIA, _QUEENSLAND, _ATHENS)
}


def body_region(anatom_site: str) -> str:
    """Coarse region of a normalised anatomic site ("" when unknown)."""
    s = str(anatom_site).lower()
    for region, words in _REGION_KEYWORDS:
        if any(w in s for w in words):
            return region
    return ""


def _group_mode(groups: pd.Series, values: pd.Series) -> pd.Series:
    """Most common value per group, ties to the alphabetically first (deterministic)."""
    pairs = pd.DataFrame({"g": groups.to_numpy(), "v": values.astype(str).to_numpy()})
    counts = pairs.value_counts().rename("n").reset_index()
    counts = counts.sort_values(["g", "n", "v"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("g").set_index("g")["v"]


def group_table(meta: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per group (the leakage unit), indexed by sorted group_id.

    A group's label is its most severe label (see SEVERITY), ties and unknown class names by
    majority then lowest index; age is the mean known age; anatomic site and dx_type are the
    commonest known values. Columns: label, n_images, age, anatom_site, dx_type.
    """
    ranks = np.array([SEVERITY.get(str(c).lower(), 100) for c in classes], dtype=float)
    gid = meta["group_id"].astype(str).to_numpy()
    ids, codes = np.unique(gid, return_inverse=True)  # sorted ids, deterministic
    k = len(classes)
    c = np.bincount(codes * k + meta["label"].to_numpy(int), minlength=len(ids) * k)
    c = c.reshape(len(ids), k)
    # lexicographic: present first, then severity, then count (desc), then index
    key = np.where(c > 0, ranks[None, :] * 1e9 - c * 1e3 + np.arange(k)[None, :], np.inf)
    out = pd.DataFrame({"label": key.argmin(axis=1), "n_images": c.sum(axis=1)}, index=ids)
    out["age"] = np.nan
    if "age" in meta:
        age = pd.to_numeric(meta["age"], errors="coerce").to_numpy(float)
        ok = ~np.isnan(age)
        n = np.bincount(codes[ok], minlength=len(ids))
        tot = np.bincount(codes[ok], weights=age[ok], minlength=len(ids))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["age"] = np.where(n > 0, tot / np.maximum(n, 1), np.nan)
    for col, unknown in (("anatom_site", {"", "unknown", "nan"}), ("dx_type", {"", "nan"})):
        out[col] = ""
        if col in meta:
            vals = meta[col].astype(str)
            known = ~vals.str.lower().isin(unknown).to_numpy()
            if known.any():
                mode = _group_mode(pd.Series(gid[known]), vals[known])
                out[col] = mode.reindex(ids).fillna("").to_numpy()
    out.index.name = "group_id"
    return out


def _log_likelihoods(
    groups: pd.DataFrame, classes: Sequence[str], profiles: Sequence[InstitutionProfile]
) -> np.ndarray:
    """groups x institutions log-plausibility (unnormalised log posterior)."""
    labels = groups["label"].to_numpy(int)
    ages = groups["age"].to_numpy(float)
    regions = [body_region(s) for s in groups["anatom_site"]]
    dx = [_DX_ALIASES.get(str(d).strip().lower(), "") for d in groups["dx_type"]]
    cols = []
    for p in profiles:
        ll = np.log(p.class_probs(classes))[labels]
        z = (ages - p.age_mean) / p.age_sd
        ll = ll + np.where(np.isnan(ages), 0.0, -0.5 * z**2 - np.log(p.age_sd))
        ll = ll + np.log([p.site_preference.get(r, 1.0) if r else 1.0 for r in regions])
        dx_ll = [np.log(max(p.dx_type_mix.get(d, 0.0), _DX_FLOOR)) if d else 0.0 for d in dx]
        ll = ll + np.asarray(dx_ll) + SIZE_TEMPER * np.log(p.relative_size)
        cols.append(ll)
    return np.stack(cols, axis=1)


def resolve_names(names: Sequence[str] | str | None) -> list[str]:
    """Validate an institution subset (list or comma string); None/empty means all six."""
    if names is None or (isinstance(names, str) and not names.strip()):
        return list(PROFILES)
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    picked = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in picked if n not in PROFILES]
    if unknown:
        raise DataError(f"unknown institution(s) {unknown}; choose from {', '.join(PROFILES)}")
    dupes = sorted({n for n in picked if picked.count(n) > 1})
    if dupes:
        raise DataError(f"institution(s) named twice: {dupes}")
    if len(picked) < 2:
        raise DataError(f"need at least two institutions for a federation, got {picked}")
    return picked


def assign_institutions(
    meta: pd.DataFrame,
    classes: Sequence[str],
    names: Sequence[str] | str | None = None,
    seed: int = 0,
) -> pd.Series:
    """Institution key per image (index of ``meta``), whole groups together, seeded.

    Each group is drawn from its posterior over the chosen institutions (module docstring);
    groups are processed in sorted group_id order so the result does not depend on row order.
    """
    picked = resolve_names(names)
    profiles = [PROFILES[n] for n in picked]
    groups = group_table(meta, classes)
    ll = _log_likelihoods(groups, classes, profiles)
    post = np.exp(ll - ll.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    # a stream of its own: a bare default_rng(seed) would replay the same uniforms that any
    # other seed-``seed`` draw used (e.g. a synthesizer's labels), correlating the two
    u = np.random.default_rng([seed, _STREAM]).random(len(groups))
    idx = (post.cumsum(axis=1) < u[:, None]).sum(axis=1).clip(max=len(picked) - 1)
    site_of_group = pd.Series(np.asarray(picked)[idx], index=groups.index)
    return pd.Series(
        site_of_group.reindex(meta["group_id"].astype(str)).to_numpy(),
        index=meta.index,
        name="site",
    )
