"""Synthetic skin-lesion data sets written in the *real* on-disk formats.

Why: the public data sets cannot be downloaded here (and are large), but every loader,
partitioner and training path must be exercised end to end. :func:`synthesize` writes a data
set in exactly the layout :func:`common.data.sources.load_source` reads, with metadata drawn
from the published per-source statistics (several images per lesion, several lesions per
patient, per-source diagnosis mix) and images a small CNN can learn from at 32 px: classes
differ in colour, shape, border and texture, and each acquisition site leaves its own colour
cast, brightness, vignetting and zoom, so site heterogeneity is real.

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

import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.data.formats import REGISTRY, SYNTH_FORMATS
from common.data.schema import ISIC2019_CLASSES, default_home

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


# ----------------------------------------------------------------------------- image model


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition differences of one site: what a camera/dermatoscope does to every image."""

    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain
    brightness: float = 1.0
    contrast: float = 1.0
    vignette: float = 0.2  # darkening towards the corners (0 none, 1 black ring)
    zoom: float = 1.0  # lesion size multiplier (magnification)
    noise: float = 4.0  # sensor noise std in 0-255 units


SITE_STYLES: dict[str, SiteStyle] = {
    "vidir_molemax": SiteStyle((1.0, 0.94, 0.9), 0.82, 0.95, 0.75, 0.8, 7.0),
    "vidir_modern": SiteStyle((1.02, 1.0, 1.0), 1.06, 1.05, 0.1, 1.15, 3.0),
    "rosendahl": SiteStyle((1.1, 0.96, 0.86), 1.0, 1.0, 0.35, 1.0, 4.0),
    "vienna_dias": SiteStyle((1.06, 1.03, 0.78), 0.95, 0.8, 0.5, 1.25, 9.0),
    "BCN": SiteStyle((0.9, 0.98, 1.1), 1.0, 1.1, 0.55, 0.9, 4.0),
    "MSK": SiteStyle((1.0, 0.9, 1.0), 1.1, 1.1, 0.05, 1.05, 3.0),
    "Hospital Clinic de Barcelona": SiteStyle((0.9, 0.98, 1.1), 1.0, 1.1, 0.55, 0.9, 4.0),
    "Medical University of Vienna": SiteStyle((1.02, 1.0, 1.0), 1.05, 1.05, 0.15, 1.1, 3.0),
    "Memorial Sloan Kettering Cancer Center": SiteStyle((1.0, 0.9, 1.0), 1.1, 1.1, 0.05),
    "Melanoma Institute Australia": SiteStyle((1.1, 1.0, 0.85), 0.92, 1.0, 0.4, 0.95, 6.0),
    "University of Queensland": SiteStyle((0.95, 1.05, 0.95), 1.0, 0.9, 0.3, 1.2, 5.0),
}
for _name in ("vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"):
    SITE_STYLES[f"HAM_{_name}"] = SITE_STYLES[_name]

# Class appearance: base colour (RGB), radius, border irregularity, edge softness.
_CLASS_LOOK: dict[str, tuple[tuple[int, int, int], float, float, float]] = {
    "nv": ((125, 80, 50), 0.42, 0.03, 0.03),
    "mel": ((70, 42, 32), 0.55, 0.22, 0.05),
    "bcc": ((215, 145, 145), 0.4, 0.08, 0.06),
    "vasc": ((160, 40, 80), 0.33, 0.06, 0.03),
    "bkl": ((180, 140, 95), 0.5, 0.1, 0.015),
    "df": ((135, 85, 60), 0.34, 0.04, 0.04),
    "akiec": ((200, 100, 90), 0.45, 0.14, 0.1),
    "scc": ((205, 115, 105), 0.4, 0.12, 0.06),
}
_ALIASES = {
    "ak": "akiec", "benign": "nv", "malignant": "mel", "nevus": "nv", "melanoma": "mel",
    "unknown": "nv", "seborrheic keratosis": "bkl", "lentigo nos": "bkl", "solar lentigo": "bkl",
    "lichenoid keratosis": "bkl", "cafe-au-lait macule": "nv",
    "atypical melanocytic proliferation": "mel",
}  # fmt: skip


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (std ~1) by bicubic upsampling of a cells x cells grid."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC))
    return field / (field.std() + 1e-6)


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def render_lesion(
    label_name: str,
    rng: np.random.Generator,
    size: int,
    site_style: SiteStyle | None = None,
    *,
    view: np.random.Generator | None = None,
) -> np.ndarray:
    """One dermoscopy-like RGB uint8 image (size x size x 3) of a lesion of ``label_name``.

    ``rng`` draws the lesion itself (shape, colours, texture): pass a generator seeded by the
    lesion to get the same lesion again. ``view`` (default: ``rng``) draws the per-image view
    (rotation, shift, scale, exposure), so one lesion's images are similar but not identical.
    Accepts HAM, ISIC 2019 and ISIC 2020 class/diagnosis names.
    """
    key = _ALIASES.get(label_name.lower(), label_name.lower())
    if key not in _CLASS_LOOK:
        raise ValueError(f"render_lesion: unknown class {label_name!r}")
    style = site_style or SiteStyle()
    view = view if view is not None else rng
    base, radius, irregular, edge = _CLASS_LOOK[key]

    # -- lesion-level draws
    skin = np.array([228, 182, 152], np.float32) * rng.uniform(0.82, 1.05)
    skin += rng.normal(0, 6, 3)
    colour = np.array(base, np.float32) + rng.normal(0, 10, 3)
    r0 = radius * rng.uniform(0.8, 1.2)
    aspect = rng.uniform(0.7, 1.0)
    orient = rng.uniform(0, np.pi)
    ks = np.arange(2, 7, dtype=np.float32)
    amps = (irregular * rng.standard_normal(5) / np.sqrt(ks)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 5).astype(np.float32)
    tex1 = _noise(rng, size, 4)
    tex2 = _noise(rng, size, max(4, size // 4))
    skin_tex = _noise(rng, size, 3)

    # -- view-level draws
    angle = orient + view.uniform(-0.5, 0.5)
    flip = view.random() < 0.5
    cx, cy = (float(v) for v in view.normal(0, 0.06, 2))
    scale = view.uniform(0.9, 1.1) * style.zoom
    exposure = view.uniform(0.93, 1.07)

    lin = np.linspace(-1, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    if flip:
        xx = -xx
    x, y = xx - cx, yy - cy
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    xr = x * cos_a + y * sin_a
    yr = (-x * sin_a + y * cos_a) / aspect
    rho = np.sqrt(xr**2 + yr**2)
    phi = np.arctan2(yr, xr)
    rad = (
        r0
        * scale
        * (
            1
            + (amps[:, None, None] * np.cos(ks[:, None, None] * phi + phases[:, None, None])).sum(0)
        )
    )
    rad = np.maximum(rad, 0.05)
    alpha = 0.5 * (1 + np.tanh((rad - rho) / (2 * edge)))
    t = rho / rad  # 0 at centre, 1 at border

    col = np.broadcast_to(colour, (size, size, 3)).astype(np.float32).copy()
    if key == "nv":
        col *= (0.88 + 0.12 * t)[..., None]  # slightly darker centre, uniform otherwise
    elif key == "mel":
        blue = np.array([95, 100, 130], np.float32)
        black = np.array([28, 20, 22], np.float32)
        red = np.array([165, 70, 60], np.float32)
        col = np.where((tex1 > 0.6)[..., None], blue, col)
        col = np.where((tex1 < -0.7)[..., None], black, col)
        col = np.where((tex2 > 1.3)[..., None], red, col)
        side = 0.5 * (1 + np.tanh(3 * (xr * np.cos(phases[0]) + yr * np.sin(phases[0]))))
        col *= (0.75 + 0.5 * side)[..., None]  # asymmetric darkness
    elif key == "bcc":
        vessel_dir = rng.uniform(0, np.pi)
        ridge = np.abs(np.sin(9 * (xx * np.cos(vessel_dir) + yy * np.sin(vessel_dir)) + 1.5 * tex1))
        col = np.where((ridge < 0.16)[..., None], np.array([170, 30, 45], np.float32), col)
        alpha = alpha * 0.85
    elif key == "vasc":
        purple = rng.uniform(0, 1)
        col = col * (1 - purple) + np.array([105, 35, 105], np.float32) * purple
        f = 10 / max(r0, 0.2)
        septa = np.cos(f * xr) * np.cos(f * yr) < -0.4
        col = np.where(septa[..., None], col * 0.6, col)
    elif key == "bkl":
        col *= (1 + 0.18 * np.tanh(tex2))[..., None]  # waxy cerebriform texture
        col = np.where((tex2 > 1.8)[..., None], np.array([238, 230, 200], np.float32), col)
    elif key == "df":
        pale = np.array([228, 200, 180], np.float32)
        ring = _smoothstep(0.05, 0.5, t)[..., None]
        col = pale * (1 - ring) + col * ring
    elif key in ("akiec", "scc"):
        scale_white = np.array([238, 228, 215], np.float32)
        col = np.where((tex2 > 1.1)[..., None], scale_white, col)
        if key == "scc":
            core = (1 - _smoothstep(0.25, 0.5, t))[..., None]
            col = col * (1 - core) + np.array([232, 215, 165], np.float32) * core

    skin_img = skin[None, None, :] * (1 + 0.04 * skin_tex)[..., None]
    img = skin_img * (1 - alpha[..., None]) + col * alpha[..., None]

    # -- acquisition (site) effects
    img = img * np.asarray(style.cast, np.float32) * style.brightness * exposure
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * style.contrast + mean
    r_img = np.sqrt(xx**2 + yy**2) / np.sqrt(2)
    img *= (1 - style.vignette * _smoothstep(0.55, 1.0, r_img))[..., None]
    img += view.standard_normal(img.shape, dtype=np.float32) * np.float32(style.noise)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- metadata


def _allocate(total: int, weights: dict, floor: int) -> dict:
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


def _lesion_sizes(n_images: int, per_lesion: float, rng: np.random.Generator) -> list[int]:
    """Images per lesion: n_images spread over round(n/per_lesion) lesions, each >= 1."""
    n_les = max(1, min(n_images, round(n_images / per_lesion)))
    sizes = np.ones(n_les, int)
    extra = n_images - n_les
    if extra:
        sizes += rng.multinomial(extra, np.full(n_les, 1 / n_les))
    return sizes.tolist()


def _pick(rng: np.random.Generator, table: dict, n: int | None = None):
    keys = list(table)
    p = np.array([table[k] for k in keys], float)
    idx = rng.choice(len(keys), size=n, p=p / p.sum())
    return keys[idx] if n is None else [keys[i] for i in idx]


def _unique_ids(rng: np.random.Generator, n: int, start: int, span: int) -> np.ndarray:
    return start + rng.choice(max(span, 3 * n), size=n, replace=False)


def ham_table(n_images: int, seed: int) -> pd.DataFrame:
    """HAM10000-like metadata rows (Dataverse columns) plus a private lesion index."""
    rng = np.random.default_rng([seed, 10])
    n_per_source = _allocate(
        n_images, {s: v["images"] for s, v in HAM_SOURCES.items()}, floor=4 * CLASS_FLOOR
    )
    rows = []
    lesion_no = 0
    for source, info in HAM_SOURCES.items():
        per_lesion = info["images"] / info["lesions"]
        counts = _allocate(n_per_source[source], info["dx"], floor=CLASS_FLOOR)
        for dx, k in counts.items():
            for n_views in _lesion_sizes(k, per_lesion, rng) if k else []:
                age = float(np.clip(5 * round(rng.normal(info["age"], 16) / 5), 5, 85))
                if rng.random() < HAM_AGE_NAN_RATE:
                    age = float("nan")
                sex = _pick(rng, HAM_SEX)
                loc = _pick(rng, HAM_LOCALIZATION)
                dx_type = "histo" if dx in ("mel", "bcc", "akiec") else _pick(rng, info["dx_type"])
                for _ in range(n_views):
                    rows.append((lesion_no, dx, dx_type, age, sex, loc, source))
                lesion_no += 1
    df = pd.DataFrame(
        rows, columns=["_lesion", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    )
    lesion_ids = _unique_ids(rng, lesion_no, 0, 7470)
    df.insert(0, "lesion_id", [f"HAM_{lesion_ids[i]:07d}" for i in df["_lesion"]])
    image_ids = _unique_ids(rng, len(df), 24306, 10015)
    df.insert(1, "image_id", [f"ISIC_{i:07d}" for i in image_ids])
    return df.sort_values(["dx", "lesion_id", "image_id"], kind="stable").reset_index(drop=True)


def _render_all(
    labels: list[str], styles: list[str], lesions: list[int], size: int, seed: int
) -> list[np.ndarray]:
    """Images for rows (label, site style, lesion index): same lesion index => same lesion."""
    out = []
    for row, (label, style, lesion) in enumerate(zip(labels, styles, lesions, strict=True)):
        lesion_rng = np.random.default_rng([seed, 1, int(lesion)])
        view_rng = np.random.default_rng([seed, 2, row])
        out.append(render_lesion(label, lesion_rng, size, SITE_STYLES.get(style), view=view_rng))
    return out


def _jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


# ----------------------------------------------------------------------------- writers


def write_ham_dataverse(out: Path, n_images: int, size: int, seed: int) -> None:
    df = ham_table(n_images, seed)
    images = _render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    _write_csv(df.drop(columns="_lesion"), out / "HAM10000_metadata.csv")
    # Like the real download: images split by id order over two part folders.
    order = np.argsort(df["image_id"].to_numpy(), kind="stable")
    half = (len(df) + 1) // 2
    for rank, i in enumerate(order):
        part = out / f"HAM10000_images_part_{1 if rank < half else 2}"
        part.mkdir(exist_ok=True)
        (part / f"{df.at[i, 'image_id']}.jpg").write_bytes(_jpeg(images[i]))


def write_ham_hf(out: Path, n_images: int, size: int, seed: int) -> None:
    import pyarrow as pa  # lazily: heavy, the parquet layout only
    import pyarrow.parquet as pq

    df = ham_table(n_images, seed)
    images = _render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    # Split by image, not by lesion, as the hub copy does (so lesions straddle splits).
    rng = np.random.default_rng([seed, 20])
    split = np.array(_pick(rng, HF_SPLITS, len(df)))
    for name in HF_SPLITS:  # every split non-empty
        if not (split == name).any():
            split[rng.integers(len(df))] = name
    features = {
        "image": {"_type": "Image"},
        **{c: {"dtype": "string", "_type": "Value"} for c in ("image_id", "lesion_id", "dx")},
        "dx_type": {"dtype": "string", "_type": "Value"},
        "age": {"dtype": "float64", "_type": "Value"},
        "sex": {"dtype": "string", "_type": "Value"},
        "localization": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("image_id", pa.string()),
            ("lesion_id", pa.string()),
            ("dx", pa.string()),
            ("dx_type", pa.string()),
            ("age", pa.float64()),
            ("sex", pa.string()),
            ("localization", pa.string()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    data = out / "data"
    data.mkdir()
    for name in HF_SPLITS:
        idx = np.flatnonzero(split == name)
        n_shards = 2 if name == "train" and len(idx) > 1 else 1
        for s, chunk in enumerate(np.array_split(idx, n_shards)):
            part = df.iloc[chunk]
            cols = {
                "image": [
                    {"bytes": _jpeg(images[i]), "path": f"{df.at[i, 'image_id']}.jpg"}
                    for i in chunk
                ],
                **{c: part[c].tolist() for c in schema.names if c != "image"},
            }
            table = pa.Table.from_pydict(cols, schema=schema)
            pq.write_table(
                table, data / f"{name}-{s:05d}-of-{n_shards:05d}.parquet", row_group_size=100
            )


def _dicom_bytes(arr: np.ndarray, row: pd.Series, institution: str, seed: int) -> bytes:
    """A valid VL Photographic Image DICOM (RGB, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset  # lazily: heavy, DICOM only
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    name = row["image_name"]
    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image Storage
    sop_uid = generate_uid(entropy_srcs=[str(seed), name, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), row["patient_id"], "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), name, "series"])
    ds.Modality = "XC"
    ds.InstitutionName = institution
    ds.PatientID = row["patient_id"]
    ds.PatientSex = {"male": "M", "female": "F"}.get(row["sex"], "O")
    if pd.notna(row["age_approx"]):
        ds.PatientAge = f"{int(row['age_approx']):03d}Y"
    site = row["anatom_site_general_challenge"]
    if isinstance(site, str) and site:
        ds.BodyPartExamined = re.sub(r"[^A-Z0-9 _]", " ", site.upper())[:16]  # CS charset
    ds.ImageComments = row["diagnosis"]
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def isic2020_table(n_images: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng([seed, 30])
    insts = list(ISIC2020_INSTITUTIONS)
    n_pat = max(min(len(insts), n_images), round(n_images / ISIC2020_IMAGES_PER_PATIENT))
    per_patient = np.ones(n_pat, int) + rng.multinomial(
        n_images - n_pat, rng.dirichlet(np.full(n_pat, 3.0))
    )
    inst_of = [
        insts[i] if i < len(insts) else _pick(rng, ISIC2020_INSTITUTIONS) for i in range(n_pat)
    ]
    patient_ids = _unique_ids(rng, n_pat, 1_000_000, 8_000_000)
    rows, inst_rows = [], []
    for p in range(n_pat):
        sex = "male" if rng.random() < 0.52 else "female"
        age = float(np.clip(5 * round(rng.normal(49, 14) / 5), 10, 90))
        for _ in range(per_patient[p]):
            site = _pick(rng, ISIC2020_SITES)
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
    benign_dx = _pick(rng, ISIC2020_BENIGN_DIAGNOSIS, len(df))
    df["diagnosis"] = np.where(df["malignant"], "melanoma", benign_dx)
    df["benign_malignant"] = np.where(df["malignant"], "malignant", "benign")
    df["target"] = df["malignant"].astype(int)
    names = _unique_ids(rng, len(df), 1_000_000, 9_000_000)
    df.insert(0, "image_name", [f"ISIC_{i:07d}" for i in names])
    df["anatom_site_general_challenge"] = df["site"].replace("", np.nan)
    df["_inst"] = inst_arr
    cols = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
            "diagnosis", "benign_malignant", "target", "_inst"]  # fmt: skip
    df = df[cols].sort_values("image_name", kind="stable").reset_index(drop=True)
    return df, insts


def write_isic2020(
    out: Path, n_images: int, size: int, seed: int, *, dicom: bool = True, jpeg_copies: bool = False
) -> None:
    df, _ = isic2020_table(n_images, seed)
    # Each image is its own lesion (ISIC 2020 has one image per lesion in the vast majority).
    images = _render_all(
        df["diagnosis"].tolist(), df["_inst"].tolist(), list(range(len(df))), size, seed
    )
    _write_csv(df.drop(columns="_inst"), out / "train.csv")
    if dicom:
        (out / "train").mkdir()
        for i, row in df.iterrows():
            data = _dicom_bytes(images[i], row, row["_inst"], seed)
            (out / "train" / f"{row['image_name']}.dcm").write_bytes(data)
    if jpeg_copies or not dicom:
        (out / "jpeg" / "train").mkdir(parents=True)
        for i, name in enumerate(df["image_name"]):
            (out / "jpeg" / "train" / f"{name}.jpg").write_bytes(_jpeg(images[i]))


def write_fedisic2019(out: Path, n_images: int, size: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 40])
    per_center = _allocate(
        n_images, {c: t[1] + t[2] for c, t in FEDISIC_TABLE.items()}, floor=4 * CLASS_FLOOR
    )
    rows = []
    lesion_no = 0
    for c, (name, n_train, n_test, counts) in FEDISIC_TABLE.items():
        alloc = _allocate(per_center[c], dict(enumerate(counts)), floor=CLASS_FLOOR)
        test_frac = n_test / (n_train + n_test)
        for target, k in alloc.items():
            if not k:
                continue
            # FLamby's split is by image, stratified by center (lesions can straddle it).
            folds = np.array(["train"] * k, dtype=object)
            n_test_k = min(k - 1, round(k * test_frac)) if k > 1 else 0
            folds[rng.choice(k, n_test_k, replace=False)] = "test"
            j = 0
            for n_views in _lesion_sizes(k, FEDISIC_IMAGES_PER_LESION[name], rng):
                age = float(np.clip(5 * round(rng.normal(55, 17) / 5), 5, 85))
                sex = "male" if rng.random() < 0.52 else "female"
                site = _pick(rng, ISIC2019_SITES)
                for _ in range(n_views):
                    rows.append((lesion_no, target, c, name, folds[j], age, sex, site))
                    j += 1
                lesion_no += 1
    df = pd.DataFrame(
        rows, columns=["_lesion", "target", "center", "_name", "fold", "age", "sex", "site"]
    )
    ids = _unique_ids(rng, len(df), 0, 73_000)
    df.insert(0, "image", [f"ISIC_{i:07d}" for i in ids])
    lesion_nums = _unique_ids(rng, lesion_no, 0, 99_999)
    prefix = df["_name"].map(
        lambda n: "BCN" if n == "BCN" else "HAM" if n.startswith("HAM") else ""
    )
    df["lesion_id"] = [
        f"{p}_{lesion_nums[les]:07d}" if p else np.nan
        for p, les in zip(prefix, df["_lesion"], strict=True)
    ]
    df = df.sort_values("image", kind="stable").reset_index(drop=True)
    labels = [ISIC2019_CLASSES[t] for t in df["target"]]
    images = _render_all(labels, df["_name"].tolist(), df["_lesion"].tolist(), size, seed)
    split = df[["image", "target", "center", "fold"]].copy()
    split["fold2"] = split["fold"] + "_" + split["center"].astype(str)
    _write_csv(split, out / "train_test_split")
    meta = pd.DataFrame(
        {
            "image": df["image"],
            "age_approx": df["age"],
            "anatom_site_general": df["site"].replace("", np.nan),
            "lesion_id": df["lesion_id"],
            "sex": df["sex"],
        }
    )
    _write_csv(meta, out / "ISIC_2019_Training_Metadata.csv")
    img_dir = out / "ISIC_2019_Training_Input_preprocessed"
    img_dir.mkdir()
    for i, name in enumerate(df["image"]):
        (img_dir / f"{name}.jpg").write_bytes(_jpeg(images[i]))


# Words a hospital's own export might use for a class, mapped by the label-map.csv written
# beside its labels.csv (the other rows use the HAM class names in mixed case).
CSV_EXPORT_WORDS = {"mel": "Melanoma", "nv": "Naevus", "bcc": "Basal cell carcinoma"}


def write_csv_export(out: Path, n_images: int, size: int, seed: int) -> None:
    """A hospital's own export (format ``csv``): ``labels.csv`` listing JPEG, PNG and DICOM
    images under ``images/`` (every third file of each kind), with a ``label-map.csv`` for
    the hospital's own class words, patient-level groups and a group-safe split."""
    df = ham_table(n_images, seed)
    images = _render_all(
        df["dx"].tolist(), df["dataset"].tolist(), df["_lesion"].tolist(), size, seed
    )
    rng = np.random.default_rng([seed, 50])
    lesions = np.unique(df["_lesion"].to_numpy())
    shares = {"train": 0.7, "validation": 0.15, "test": 0.15}
    split_of = dict(zip(lesions, _pick(rng, shares, len(lesions)), strict=True))
    (out / "images").mkdir()
    names, labels = [], []
    for i, row in df.iterrows():
        kind = ("jpg", "png", "dcm")[int(i) % 3]
        rel = f"images/{row['image_id']}.{kind}"
        if kind == "jpg":
            data = _jpeg(images[i])
        elif kind == "png":
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            data = buf.getvalue()
        else:
            fields = {
                "image_name": row["image_id"], "patient_id": row["lesion_id"],
                "sex": row["sex"], "age_approx": row["age"],
                "anatom_site_general_challenge": row["localization"], "diagnosis": row["dx"],
            }  # fmt: skip
            data = _dicom_bytes(images[i], pd.Series(fields), "Hospital A", seed)
        (out / rel).write_bytes(data)
        names.append(rel)
        word = CSV_EXPORT_WORDS.get(row["dx"]) if rng.random() < 0.3 else None
        labels.append(word or (row["dx"].upper() if rng.random() < 0.5 else row["dx"]))
    table = pd.DataFrame(
        {
            "image": names,
            "label": labels,
            "group": df["lesion_id"],
            "site": "hospital-a",
            "split": df["_lesion"].map(split_of),
            "age": df["age"],
            "sex": df["sex"],
            "anatom_site": df["localization"],
        }
    )
    _write_csv(table, out / "labels.csv")
    words = pd.DataFrame({"from": list(CSV_EXPORT_WORDS.values()), "to": list(CSV_EXPORT_WORDS)})
    _write_csv(words, out / "label-map.csv")


# ----------------------------------------------------------------------------- public API


def synthesize(
    fmt: str,
    out: str | Path,
    *,
    n_images: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    dicom: bool = True,
    jpeg_copies: bool = False,
) -> Path:
    """Write a synthetic data set of format ``fmt`` into the (new or empty) folder ``out``.

    ``dicom``/``jpeg_copies`` only apply to ``isic2020`` (DICOM files, JPEG copies in
    ``jpeg/train``; without DICOM the JPEGs are always written). Same seed => byte-identical
    metadata files.
    """
    if fmt not in SYNTH_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(SYNTH_FORMATS)}")
    if n_images < 1 or image_size < 8:
        raise ValueError("need n_images >= 1 and image_size >= 8")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"synthesize: output folder {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    entry = REGISTRY[fmt]
    options = {"dicom": dicom, "jpeg_copies": jpeg_copies}
    entry.write(out, n_images, image_size, seed, **{k: options[k] for k in entry.write_options})
    return out


def ensure_builtin(
    fmt: str = "ham-dataverse", n_images: int = 1500, image_size: int = 48, seed: int = 0
) -> Path:
    """The built-in synthetic data set (the default data), synthesized once and reused.

    Written to a temporary sibling folder and renamed into place, so an interrupted run leaves
    nothing half-written and concurrent callers end up sharing one complete copy.
    """
    target = default_home() / "builtin" / f"{fmt}-{n_images}-{image_size}-{seed}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        synthesize(fmt, tmp, n_images=n_images, image_size=image_size, seed=seed)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a real failure, not a lost race with another process
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
