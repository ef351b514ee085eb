"""Image decoding shared by all loaders and the cache.

Every function turns "could not read this" into a :class:`DataError` that names the file, so
a corrupt JPEG or a truncated DICOM deep in a 30 000-image set is reported as *that file*
instead of a PIL/pydicom traceback from a worker thread.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.data.schema import DataError

# Transfer syntaxes whose pixel data is stored uncompressed ("native"): for these we convert
# the colour space ourselves; for compressed ones pydicom's decoder already returns RGB.
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
}


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 array from any PIL mode (L, P, RGBA, CMYK, I;16 ...)."""
    if img.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        grey = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes (JPEG/PNG/...) to HxWx3 uint8; ``name`` goes in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"unreadable or corrupt image {name}: {exc}") from exc


def decode_image_file(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8, raising DataError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
    except FileNotFoundError as exc:
        raise DataError(f"image file missing: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"unreadable or corrupt image {path}: {exc}") from exc


def _to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Scale >8-bit (or signed) pixel data to uint8 by the stored bit depth."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo = min(float(arr.min()), 0.0)
    top = float(2**bits_stored - 1) if bits_stored else float(arr.max() or 1.0)
    return np.clip((arr - lo) / max(top - lo, 1.0) * 255.0, 0, 255).astype(np.uint8)


def read_dicom(path: str | Path) -> np.ndarray:
    """Read the first frame of a DICOM file as RGB uint8, honouring PhotometricInterpretation.

    RGB is returned as is; YBR_FULL / YBR_FULL_422 are converted with pydicom's
    ``convert_color_space``; MONOCHROME1 is inverted and MONOCHROME1/2 grey is replicated to
    three channels. Compressed pixel data needs a pydicom decoding plugin (Pillow handles
    JPEG baseline); without one the error says what to install.
    """
    import pydicom  # lazily: heavy, DICOM files only
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import convert_color_space, pixel_array

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise DataError(f"DICOM file missing: {path}") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable or corrupt DICOM {path}: {exc}") from exc
    if "PixelData" not in ds:
        raise DataError(f"DICOM {path} has no pixel data (no PixelData element)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))
    native = syntax in _NATIVE_SYNTAXES
    try:
        # Native data: raw=True so we do the colour conversion explicitly below. Compressed:
        # pydicom's decoders already hand back RGB for YBR JPEGs, so let it process.
        arr = pixel_array(ds, index=0, raw=native)
    except (NotImplementedError, RuntimeError) as exc:
        raise DataError(
            f"cannot decode pixel data of DICOM {path} (transfer syntax {syntax}): {exc}. "
            "Install a pydicom decoding plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg` or `pip install python-gdcm`."
        ) from exc
    except (ValueError, EOFError, OSError, AttributeError, KeyError, TypeError) as exc:
        raise DataError(f"corrupt or truncated pixel data in DICOM {path}: {exc}") from exc

    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric in ("MONOCHROME1", "MONOCHROME2") or arr.ndim == 2:
        grey = _to_uint8(arr, bits)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        if grey.ndim == 3:
            grey = grey[..., 0]
        return np.repeat(grey[..., None], 3, axis=2)
    if native and photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        raise DataError(f"DICOM {path}: unsupported PhotometricInterpretation {photometric!r}")
    return np.ascontiguousarray(_to_uint8(arr, bits)[..., :3])


def fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` then centre-crop to size x size (antialiased)."""
    img = Image.fromarray(arr)
    if img.size == (size, size):
        return np.asarray(img, dtype=np.uint8)
    out = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(out, dtype=np.uint8)
