"""The synthetic lesion image model: classes differ in colour, shape, border and texture, and
each acquisition site leaves its own colour cast, brightness, vignetting and zoom (so site
heterogeneity is real); a small CNN can learn them at 32 px."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


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


def render_all(
    labels: list[str], styles: list[str], lesions: list[int], size: int, seed: int
) -> list[np.ndarray]:
    """Images for rows (label, site style, lesion index): same lesion index => same lesion."""
    out = []
    for row, (label, style, lesion) in enumerate(zip(labels, styles, lesions, strict=True)):
        lesion_rng = np.random.default_rng([seed, 1, int(lesion)])
        view_rng = np.random.default_rng([seed, 2, row])
        out.append(render_lesion(label, lesion_rng, size, SITE_STYLES.get(style), view=view_rng))
    return out
