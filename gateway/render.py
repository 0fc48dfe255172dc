"""Rendering: decoded pixel data → a consumer image (JPEG, PNG or GIF).

Used by WADO-RS ``/rendered`` and ``/thumbnail`` (PS3.18 §10.4.1.1.3/§10.4.1.1.4, parameters in
§8.3.5.1) and by WADO-URI (PS3.18 §9.1.2). The grayscale pipeline is PS3.3 §C.11 / PS3.4 N.2:

1. Modality LUT: Rescale Slope/Intercept or the Modality LUT Sequence (PS3.3 C.11.1);
2. VOI: the request's ``window`` (center, width, function) if given, else the data set's first
   Window Center/Width with its VOI LUT Function, else its VOI LUT Sequence, else the range of
   the frame's values (PS3.3 C.11.2; the functions of C.11.2.1.2: LINEAR, LINEAR_EXACT,
   SIGMOID), mapped to 0–255;
3. MONOCHROME1 is inverted (so that it displays as MONOCHROME2), as is a Presentation LUT
   Shape of INVERSE.

Colour: RGB and YBR (pydicom's decoders already give RGB) pass through, scaled to 8 bits;
PALETTE COLOR goes through its palette (PS3.3 C.7.6.3.1.5). Then the region (WADO-URI
``region``) or the viewport's source rectangle is cut out, flipped if asked, scaled to fit the
viewport (or WADO-URI ``rows``/``columns``) keeping the aspect ratio, and encoded.

No Flask, no storage: the caller hands in the header data set and the frame's array.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

#: Rendered media types offered (PS3.18 Table 8.7.4-1: image/jpeg is the default).
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
DEFAULT_QUALITY = 90
THUMBNAIL_SIZE = 128
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "linear_exact": "LINEAR_EXACT",
              "sigmoid": "SIGMOID"}
_MAX_VIEWPORT = 8192


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and function (LINEAR, LINEAR_EXACT or
    SIGMOID), applied to modality values (after rescale)."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Viewport:
    """PS3.18 §8.3.5.1.3 ``viewport=vw,vh[,sx,sy,sw,sh]``: the rendered image fits in vw×vh
    pixels (aspect ratio kept); the optional source rectangle starts at (sx, sy) and is sw×sh
    pixels of the image (a negative sw or sh flips that axis)."""

    width: int | None
    height: int | None
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None


@dataclass(frozen=True)
class RenderOptions:
    """How to render one frame.

    ``region`` is WADO-URI's (x1, y1, x2, y2) as fractions of the image (PS3.18 §9.1.2.1);
    ``viewport`` also carries WADO-URI ``columns``/``rows`` as its width/height.
    """

    media_type: str = "image/jpeg"
    quality: int | None = None
    viewport: Viewport | None = None
    window: Window | None = None
    region: tuple[float, float, float, float] | None = None


# -- parameter parsing (shared by WADO-RS and WADO-URI) ------------------------------------------
def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} is not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number: {text[:40]!r}")
    return value


def _integer(text: str, what: str) -> int:
    text = text.strip()
    if not text.lstrip("-").isdigit() or len(text) > 9:
        raise ValueError(f"{what} is not an integer: {text[:40]!r}")
    return int(text)


def make_window(center: float, width: float, function: str = "LINEAR") -> Window:
    """A validated :class:`Window`; raises ``ValueError`` for an impossible width."""
    if function == "LINEAR" and width < 1:
        raise ValueError(f"window width must be at least 1 for the LINEAR function "
                         f"(PS3.3 C.11.2.1.2.1), got {width:g}")
    if width <= 0:
        raise ValueError(f"window width must be greater than 0, got {width:g}")
    return Window(center, width, function)


def parse_window(text: str) -> Window:
    """``window=center,width[,function]`` (PS3.18 §8.3.5.1.4); function is ``linear``
    (default), ``linear-exact`` or ``sigmoid``. Raises ``ValueError`` with the reason."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"window must be center,width[,function]; got {text[:80]!r}")
    function = "LINEAR"
    if len(parts) == 3:
        function = _FUNCTIONS.get(parts[2].lower(), "")
        if not function:
            raise ValueError(f"window function must be linear, linear-exact or sigmoid; "
                             f"got {parts[2][:40]!r}")
    return make_window(_number(parts[0], "window center"), _number(parts[1], "window width"),
                       function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 §8.3.5.1.3); raises ``ValueError``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ValueError(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {text[:80]!r}")
    vw, vh = (_integer(p, "viewport size") if p else None for p in parts[:2])
    for size in (vw, vh):
        if size is not None and not 1 <= size <= _MAX_VIEWPORT:
            raise ValueError(f"viewport width and height must be 1–{_MAX_VIEWPORT}, got {size}")
    if vw is None and vh is None:
        raise ValueError("viewport needs a width or a height")
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx, sy = (_integer(p, "viewport source offset") if p else 0 for p in parts[2:4])
    sw, sh = (_integer(p, "viewport source size") if p else None for p in parts[4:6])
    if sx < 0 or sy < 0 or sw == 0 or sh == 0:
        raise ValueError("viewport source offset must be ≥ 0 and its size non-zero")
    return Viewport(vw, vh, sx, sy, sw, sh)


def parse_quality(text: str) -> int:
    """``quality=1..100`` (PS3.18 §8.3.5.1.2); raises ``ValueError``."""
    value = _integer(text, "quality")
    if not 1 <= value <= 100:
        raise ValueError(f"quality must be 1–100, got {value}")
    return value


def parse_region(text: str) -> tuple[float, float, float, float]:
    """WADO-URI ``region=x1,y1,x2,y2`` as fractions 0.0–1.0 of the image (PS3.18 §9.1.2.1)."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"region must be x1,y1,x2,y2; got {text[:80]!r}")
    x1, y1, x2, y2 = (_number(p, "region") for p in parts)
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise ValueError("region must satisfy 0 ≤ x1 < x2 ≤ 1 and 0 ≤ y1 < y2 ≤ 1")
    return x1, y1, x2, y2


# -- pixels → 8-bit display values ---------------------------------------------------------------
def apply_window(values: np.ndarray[Any, Any], window: Window) -> np.ndarray[Any, Any]:
    """Map modality values to 0.0–255.0 with ``window`` (PS3.3 C.11.2.1.2 formulas, with
    y_min = 0 and y_max = 255)."""
    c, w = window.center, window.width
    x = values.astype(np.float64, copy=False)
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    if w == 1:  # the LINEAR formula's limit: a step at c - 0.5
        return np.where(x <= c - 0.5, 0.0, 255.0)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) * 255.0


def _dataset_window(ds: Dataset) -> Window | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = ds.WindowCenter, ds.WindowWidth
    center = center[0] if not isinstance(center, int | float) else center
    width = width[0] if not isinstance(width, int | float) else width
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    try:
        return make_window(float(center), float(width),
                           function if function in _FUNCTIONS.values() else "LINEAR")
    except (TypeError, ValueError):
        return None  # a nonsensical stored window: fall back to the value range


def _to_uint8(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    result: np.ndarray[Any, Any] = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    return result


def display_pixels(arr: np.ndarray[Any, Any], ds: Dataset,
                   window: Window | None = None) -> np.ndarray[Any, Any]:
    """One decoded frame → 8-bit display values: (rows, columns) grey or (rows, columns, 3)
    RGB. See the module docstring for the pipeline."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        return _to_uint8(rgb.astype(np.float64) * (255.0 / top))
    if arr.ndim == 3 or photometric.startswith(("RGB", "YBR")):
        bits = int(ds.get("BitsStored", 8) or 8)
        scale = 255.0 / float((1 << bits) - 1) if bits != 8 else 1.0
        return _to_uint8(arr.astype(np.float64) * scale)
    values = apply_modality_lut(arr, ds)
    chosen = window or _dataset_window(ds)
    if chosen is not None:
        grey = apply_window(values, chosen)
    elif "VOILUTSequence" in ds:
        lut_out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        top = float((1 << int(descriptor[2])) - 1) if len(descriptor) > 2 else lut_out.max()
        grey = lut_out * (255.0 / max(top, 1.0))
    else:  # no VOI in the data: stretch this frame's range
        low, high = float(np.min(values)), float(np.max(values))
        grey = apply_window(values, Window((low + high) / 2, max(high - low, 1e-6),
                                           "LINEAR_EXACT"))
    inverse = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverse = not inverse
    shown = _to_uint8(grey)
    if inverse:  # after quantising, so MONOCHROME1 is the exact complement of MONOCHROME2
        shown = 255 - shown
    return shown


# -- geometry and encoding ------------------------------------------------------------------------
def fit(width: int, height: int, max_width: int | None, max_height: int | None) -> tuple[int, int]:
    """The size of a ``width``×``height`` image scaled to fit in max_width×max_height (either
    may be None: unconstrained), keeping its aspect ratio."""
    scales = [limit / size for limit, size in ((max_width, width), (max_height, height))
              if limit is not None]
    if not scales:
        return width, height
    scale = min(scales)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _crop(image: Image.Image, options: RenderOptions) -> Image.Image:
    if options.region is not None:
        x1, y1, x2, y2 = options.region
        w, h = image.size
        box = (math.floor(x1 * w), math.floor(y1 * h), max(math.ceil(x2 * w), 1),
               max(math.ceil(y2 * h), 1))
        image = image.crop(box)
    viewport = options.viewport
    if viewport is not None and (viewport.sx or viewport.sy or viewport.sw or viewport.sh):
        w, h = image.size
        sw = viewport.sw if viewport.sw is not None else w - viewport.sx
        sh = viewport.sh if viewport.sh is not None else h - viewport.sy
        left, top = viewport.sx, viewport.sy
        image = image.crop((left, top, left + abs(sw), top + abs(sh)))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def encode(pixels: np.ndarray[Any, Any], options: RenderOptions) -> bytes:
    """Crop, scale and encode 8-bit display values (from :func:`display_pixels`)."""
    image = _crop(Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L"), options)
    if options.viewport is not None:
        size = fit(*image.size, options.viewport.width, options.viewport.height)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, format="PNG")
    elif options.media_type == "image/gif":
        image.save(out, format="GIF")
    elif options.media_type == "image/jpeg":
        image.save(out, format="JPEG", quality=options.quality or DEFAULT_QUALITY)
    else:
        raise ValueError(f"cannot render {options.media_type}; offered: {', '.join(MEDIA_TYPES)}")
    return out.getvalue()


def render(arr: np.ndarray[Any, Any], ds: Dataset, options: RenderOptions) -> bytes:
    """One decoded frame (``arr``) of the instance described by ``ds`` → image bytes of
    ``options.media_type``."""
    return encode(display_pixels(arr, ds, options.window), options)
