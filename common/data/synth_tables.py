"""Synthetic metadata drawn from the published per-source statistics of the public data sets
(several images per lesion, several lesions per patient, per-source diagnosis mix).

Tiny-set adjustments (documented deviations from the real statistics):

* every (source, class) pair that exists in the real data gets a floor of a few images
  (:data:`CLASS_FLOOR`), so rare classes (df, vasc, akiec) are present and a 7/8-class model is
  trainable even with a few hundred images;
* ISIC 2020's melanoma rate (1.8 % real) is raised to :data:`ISIC2020_SYNTH_MEL_RATE` and every
  institution gets at least :data:`CLASS_FLOOR` malignant images, so each simulated site has
  positives;
* some proportions not published per source (BCN images per lesion, MSK lesion ids) are
  assumptions, marked where used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CLASS_FLOOR = 2  # minimum images per (source, class) that exists in the real data
ISIC2020_SYNTH_MEL_RATE = 0.08  # real: 584 / 33126 = 1.76 % (raised, see module docstring)

# ----------------------------------------------------------------------------- public figures

# HAM10000 metadata, Harvard Dataverse doi:10.7910/DVN/DBW86T: counts per `dataset` value.
HAM_SOURCES: dict[str, dict] = {
    "vidir_molemax": {
        "images": 3954, "lesions": 3954, "age": 49,
        "dx": {"akiec": 0, "bcc": 2, "bkl": 124, "df": 30, "mel": 24, "nv": 3720, "vasc": 54},
        "dx_type": {"follow_up": 3704, "consensus": 202, "histo": 48},
    },
    "vidir_modern": {
        "images": 3363, "lesions": 1695, "age": 51,
        "dx": {"akiec": 32, "bcc": 211, "bkl": 475, "df": 51, "mel": 680, "nv": 1832, "vasc": 82},
        "dx_type": {"histo": 2594, "consensus": 700, "confocal": 69},
    },
    "rosendahl": {
        "images": 2259, "lesions": 1552, "age": 60,
        "dx": {"akiec": 295, "bcc": 296, "bkl": 490, "df": 30, "mel": 342, "nv": 803, "vasc": 3},
        "dx_type": {"histo": 2259},
    },
    "vienna_dias": {
        "images": 439, "lesions": 278, "age": 44,
        "dx": {"akiec": 0, "bcc": 5, "bkl": 10, "df": 4, "mel": 67, "nv": 350, "vasc": 3},
        "dx_type": {"histo": 439},
    },
}  # fmt: skip
# HAM10000 metadata (same citation): overall sex and localization counts.
HAM_SEX = {"male": 5406, "female": 4552, "unknown": 57}
HAM_AGE_NAN_RATE = 57 / 10015
HAM_LOCALIZATION = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118,
    "abdomen": 1022, "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168,
    "scalp": 128, "hand": 90, "ear": 56, "genital": 48, "acral": 7,
}  # fmt: skip
# marmal88/skin_cancer (HF hub) split sizes: train 9577, validation 2492, test 1285.
HF_SPLITS = {"train": 9577, "validation": 2492, "test": 1285}

# Fed-ISIC2019 centers (FLamby, Terrail et al. 2022): train/test and class counts in
# ISIC2019_CLASSES order MEL NV BCC AK BKL DF VASC SCC.
FEDISIC_TABLE: dict[int, tuple[str, int, int, list[int]]] = {
    0: ("BCN", 9930, 2483, [2857, 4206, 2809, 737, 1138, 124, 111, 431]),
    1: ("HAM_vidir_molemax", 3163, 791, [24, 3720, 2, 0, 124, 30, 54, 0]),
    2: ("HAM_vidir_modern", 2691, 672, [680, 1832, 211, 21, 475, 51, 82, 11]),
    3: ("HAM_rosendahl", 1807, 452, [342, 803, 296, 109, 490, 30, 3, 186]),
    4: ("MSK", 655, 164, [215, 415, 0, 0, 189, 0, 0, 0]),
    5: ("HAM_vienna_dias", 351, 88, [67, 350, 5, 0, 10, 4, 3, 0]),
}
# Images per lesion by center: HAM ones from the Dataverse table; BCN assumed 1.5 (BCN_20000
# has several dermoscopies per lesion); MSK assumed 1.0 and written without lesion ids, which
# exercises the loader's image-id fallback.
FEDISIC_IMAGES_PER_LESION = {
    "BCN": 1.5, "HAM_vidir_molemax": 1.0, "HAM_vidir_modern": 1.98, "HAM_rosendahl": 1.46,
    "MSK": 1.0, "HAM_vienna_dias": 1.58,
}  # fmt: skip
ISIC2019_SITES = {
    "anterior torso": 6915, "lower extremity": 4990, "head/neck": 4587, "upper extremity": 2910,
    "posterior torso": 2787, "palms/soles": 398, "oral/genital": 59, "lateral torso": 54,
    "": 2631,
}  # fmt: skip

# SIIM-ISIC 2020 (Rotemberg et al. 2021, Sci Data 8:34): 33126 images of 2056 patients
# (~16 images/patient), 584 melanomas; site and diagnosis counts from its train.csv.
ISIC2020_IMAGES_PER_PATIENT = 33126 / 2056
ISIC2020_SITES = {
    "torso": 16845, "lower extremity": 8417, "upper extremity": 4983, "head/neck": 1855,
    "": 527, "palms/soles": 375, "oral/genital": 124,
}  # fmt: skip
ISIC2020_BENIGN_DIAGNOSIS = {
    "unknown": 27124, "nevus": 5193, "seborrheic keratosis": 135, "lentigo NOS": 44,
    "lichenoid keratosis": 37, "solar lentigo": 7, "cafe-au-lait macule": 1,
}  # fmt: skip
# Contributing institutions (Rotemberg et al. 2021); weights are a simulation choice.
ISIC2020_INSTITUTIONS = {
    "Hospital Clinic de Barcelona": 0.25,
    "Medical University of Vienna": 0.2,
    "Memorial Sloan Kettering Cancer Center": 0.3,
    "Melanoma Institute Australia": 0.15,
    "University of Queensland": 0.1,
}


def allocate(total: int, weights: dict, floor: int) -> dict:
    """Split ``total`` over keys by weight (largest remainder), each positive key >= floor."""
    keys = [k for k, w in weights.items() if w > 0]
    out = {k: 0 for k in weights}
    if total <= 0 or not keys:
        return out
    floor = min(floor, total // len(keys))
    w = np.array([weights[k] for k in keys], float)
    rest = total - floor * len(keys)
    share = w / w.sum() * rest
    base = np.floor(share).astype(int)
    order = np.argsort(-(share - base), kind="stable")
    base[order[: rest - base.sum()]] += 1
    for k, b in zip(keys, base, strict=True):
        out[k] = int(b) + floor
    return out


def lesion_sizes(n_images: int, per_lesion: float, rng: np.random.Generator) -> list[int]:
    """Images per lesion: n_images spread over round(n/per_lesion) lesions, each >= 1."""
    n_les = max(1, min(n_images, round(n_images / per_lesion)))
    sizes = np.ones(n_les, int)
    extra = n_images - n_les
    if extra:
        sizes += rng.multinomial(extra, np.full(n_les, 1 / n_les))
    return sizes.tolist()


def pick_weighted(rng: np.random.Generator, table: dict, n: int | None = None):
    keys = list(table)
    p = np.array([table[k] for k in keys], float)
    idx = rng.choice(len(keys), size=n, p=p / p.sum())
    return keys[idx] if n is None else [keys[i] for i in idx]


def unique_ids(rng: np.random.Generator, n: int, start: int, span: int) -> np.ndarray:
    return start + rng.choice(max(span, 3 * n), size=n, replace=False)


def ham_table(n_images: int, seed: int) -> pd.DataFrame:
    """HAM10000-like metadata rows (Dataverse columns) plus a private lesion index."""
    rng = np.random.default_rng([seed, 10])
    n_per_source = allocate(
        n_images, {s: v["images"] for s, v in HAM_SOURCES.items()}, floor=4 * CLASS_FLOOR
    )
    rows = []
    lesion_no = 0
    for source, info in HAM_SOURCES.items():
        per_lesion = info["images"] / info["lesions"]
        counts = allocate(n_per_source[source], info["dx"], floor=CLASS_FLOOR)
        for dx, k in counts.items():
            for n_views in lesion_sizes(k, per_lesion, rng) if k else []:
                age = float(np.clip(5 * round(rng.normal(info["age"], 16) / 5), 5, 85))
                if rng.random() < HAM_AGE_NAN_RATE:
                    age = float("nan")
                sex = pick_weighted(rng, HAM_SEX)
                loc = pick_weighted(rng, HAM_LOCALIZATION)
                dx_type = (
                    "histo"
                    if dx in ("mel", "bcc", "akiec")
                    else pick_weighted(rng, info["dx_type"])
                )
                for _ in range(n_views):
                    rows.append((lesion_no, dx, dx_type, age, sex, loc, source))
                lesion_no += 1
    df = pd.DataFrame(
        rows, columns=["_lesion", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    )
    lesion_ids = unique_ids(rng, lesion_no, 0, 7470)
    df.insert(0, "lesion_id", [f"HAM_{lesion_ids[i]:07d}" for i in df["_lesion"]])
    image_ids = unique_ids(rng, len(df), 24306, 10015)
    df.insert(1, "image_id", [f"ISIC_{i:07d}" for i in image_ids])
    return df.sort_values(["dx", "lesion_id", "image_id"], kind="stable").reset_index(drop=True)


def isic2020_table(n_images: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng([seed, 30])
    insts = list(ISIC2020_INSTITUTIONS)
    n_pat = max(min(len(insts), n_images), round(n_images / ISIC2020_IMAGES_PER_PATIENT))
    per_patient = np.ones(n_pat, int) + rng.multinomial(
        n_images - n_pat, rng.dirichlet(np.full(n_pat, 3.0))
    )
    inst_of = [
        insts[i] if i < len(insts) else pick_weighted(rng, ISIC2020_INSTITUTIONS)
        for i in range(n_pat)
    ]
    patient_ids = unique_ids(rng, n_pat, 1_000_000, 8_000_000)
    rows, inst_rows = [], []
    for p in range(n_pat):
        sex = "male" if rng.random() < 0.52 else "female"
        age = float(np.clip(5 * round(rng.normal(49, 14) / 5), 10, 90))
        for _ in range(per_patient[p]):
            site = pick_weighted(rng, ISIC2020_SITES)
            malignant = rng.random() < ISIC2020_SYNTH_MEL_RATE
            rows.append([f"IP_{patient_ids[p]:07d}", sex, age, site, malignant])
            inst_rows.append(inst_of[p])
    df = pd.DataFrame(rows, columns=["patient_id", "sex", "age_approx", "site", "malignant"])
    inst_arr = np.array(inst_rows)
    for inst in insts:  # floor: every institution has positives
        idx = np.flatnonzero(inst_arr == inst)
        need = min(CLASS_FLOOR, len(idx) // 2) - int(df.loc[idx, "malignant"].sum())
        if need > 0:
            cand = idx[~df.loc[idx, "malignant"].to_numpy()]
            df.loc[rng.choice(cand, need, replace=False), "malignant"] = True
    benign_dx = pick_weighted(rng, ISIC2020_BENIGN_DIAGNOSIS, len(df))
    df["diagnosis"] = np.where(df["malignant"], "melanoma", benign_dx)
    df["benign_malignant"] = np.where(df["malignant"], "malignant", "benign")
    df["target"] = df["malignant"].astype(int)
    names = unique_ids(rng, len(df), 1_000_000, 9_000_000)
    df.insert(0, "image_name", [f"ISIC_{i:07d}" for i in names])
    df["anatom_site_general_challenge"] = df["site"].replace("", np.nan)
    df["_inst"] = inst_arr
    cols = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
            "diagnosis", "benign_malignant", "target", "_inst"]  # fmt: skip
    df = df[cols].sort_values("image_name", kind="stable").reset_index(drop=True)
    return df, insts
