"""The rendering pipeline (``gateway.render``) on arrays with known values, no server: VOI
windows per PS3.3 C.11.2.1.2, modality rescale, MONOCHROME1, palette colour, geometry, and
the parsing of the PS3.18 §8.3.5.1 / §9.1.2 rendering parameters."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset

from gateway import render
from gateway.render import RenderOptions, Viewport, Window


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for name, value in attrs.items():
        setattr(ds, name, value)
    return ds


def _linear(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.2.1, written out as the standard states it (y range 0–255)."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)


@given(st.floats(-2000, 2000), st.floats(1, 4000), st.integers(-3000, 3000))
def test_linear_window_follows_the_standard_formula(c: float, w: float, x: int) -> None:
    got = render.display_pixels(np.array([[x]], dtype=np.int16), _header(),
                                Window(c, w))[0, 0]
    assert abs(int(got) - _linear(x, c, w)) <= 1  # rounding at exact .5 boundaries


def test_linear_exact_and_sigmoid_functions() -> None:
    values = np.array([[-100, 0, 50, 100, 200]], dtype=np.int16)
    exact = render.display_pixels(values, _header(), Window(50, 100, "LINEAR_EXACT"))
    assert exact.tolist() == [[0, 0, 128, 255, 255]]
    sigmoid = render.display_pixels(values, _header(), Window(50, 100, "SIGMOID"))
    expected = [round(255 / (1 + math.exp(-4 * (v - 50) / 100))) for v in values[0]]
    assert sigmoid[0].tolist() == expected


def test_rescale_is_applied_before_the_window() -> None:
    """PS3.3 C.11.1: the window applies to modality values (stored × slope + intercept)."""
    stored = np.array([[0, 1000, 2000]], dtype=np.int16)
    header = _header(RescaleSlope=1, RescaleIntercept=-1000)
    grey = render.display_pixels(stored, header, Window(0, 2001, "LINEAR_EXACT"))
    # modality values -1000, 0, 1000 in a window 0 ± 1000.5
    assert grey.tolist() == [[0, 128, 255]]


def test_stored_window_and_voi_function_are_used_when_none_is_given() -> None:
    header = _header(WindowCenter=[100, 500], WindowWidth=[200, 10],
                     VOILUTFunction="LINEAR_EXACT")
    grey = render.display_pixels(np.array([[0, 100, 200]], dtype=np.int16), header)
    assert grey.tolist() == [[0, 128, 255]]  # the first window: 100 ± 100


def test_without_any_window_the_value_range_is_stretched() -> None:
    grey = render.display_pixels(np.array([[10, 20, 30]], dtype=np.int16), _header())
    assert grey.tolist() == [[0, 128, 255]]


def test_monochrome1_is_inverted() -> None:
    values = np.array([[0, 100, 200]], dtype=np.int16)
    mono2 = render.display_pixels(values, _header(), Window(100, 200, "LINEAR_EXACT"))
    mono1 = render.display_pixels(values, _header(PhotometricInterpretation="MONOCHROME1"),
                                  Window(100, 200, "LINEAR_EXACT"))
    assert (mono1.astype(int) + mono2.astype(int) == 255).all()
    assert mono1[0, 0] == 255 and mono1[0, 2] == 0


def test_rgb_passes_through_and_palette_is_looked_up() -> None:
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    header = _header(PhotometricInterpretation="RGB", SamplesPerPixel=3, BitsAllocated=8,
                     BitsStored=8, HighBit=7, PixelRepresentation=0)
    assert (render.display_pixels(rgb, header) == rgb).all()
    palette = _header(PhotometricInterpretation="PALETTE COLOR", BitsAllocated=8,
                      BitsStored=8, HighBit=7, PixelRepresentation=0)
    for colour, values in (("Red", [0, 65535]), ("Green", [65535, 0]), ("Blue", [0, 0])):
        setattr(palette, f"{colour}PaletteColorLookupTableDescriptor", [2, 0, 16])
        setattr(palette, f"{colour}PaletteColorLookupTableData",
                np.array(values, dtype="<u2").tobytes())
    shown = render.display_pixels(np.array([[0, 1]], dtype=np.uint8), palette)
    assert shown.tolist() == [[[0, 255, 0], [255, 0, 0]]]


def test_viewport_fits_keeping_the_aspect_ratio_and_crops_and_flips() -> None:
    assert render.fit(512, 256, 128, 128) == (128, 64)
    assert render.fit(100, 400, 50, None) == (50, 200)
    pixels = np.zeros((4, 8), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white
    png = render.encode(pixels, RenderOptions("image/png", viewport=Viewport(4, 4)))
    image = Image.open(io.BytesIO(png))
    assert image.size == (4, 2)
    flipped = render.encode(pixels, RenderOptions(
        "image/png", viewport=Viewport(8, 4, 0, 0, -8, 4)))
    assert np.asarray(Image.open(io.BytesIO(flipped)))[0].tolist() == [0] * 4 + [255] * 4
    region = render.encode(pixels, RenderOptions("image/png", region=(0.5, 0, 1, 1)))
    assert np.asarray(Image.open(io.BytesIO(region))).max() == 0


def test_jpeg_quality_changes_the_encoding() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    low = render.encode(pixels, RenderOptions("image/jpeg", quality=5))
    high = render.encode(pixels, RenderOptions("image/jpeg", quality=95))
    assert len(low) < len(high)
    assert Image.open(io.BytesIO(low)).format == "JPEG"


@pytest.mark.parametrize(("text", "expected"), [
    ("40,400", Window(40, 400, "LINEAR")),
    ("-600,1500,linear-exact", Window(-600, 1500, "LINEAR_EXACT")),
    ("10.5,20,SIGMOID", Window(10.5, 20, "SIGMOID")),
])
def test_window_parameter(text: str, expected: Window) -> None:
    assert render.parse_window(text) == expected


@pytest.mark.parametrize("text", ["40", "a,b", "40,0", "40,0.5,linear", "40,400,cubic",
                                  "nan,10", "1,2,3,4"])
def test_bad_window_parameter_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        render.parse_window(text)


def test_viewport_quality_and_region_parameters() -> None:
    assert render.parse_viewport("256,128") == Viewport(256, 128)
    assert render.parse_viewport("64,64,10,20,-30,40") == Viewport(64, 64, 10, 20, -30, 40)
    assert render.parse_quality("75") == 75
    assert render.parse_region("0,0.25,0.5,1") == (0, 0.25, 0.5, 1)
    for bad in ("0,10", "10", "a,b", "10,10,1,2,3", "99999,1", "10,10,-1,0,5,5"):
        with pytest.raises(ValueError):
            render.parse_viewport(bad)
    for bad in ("0", "101", "x"):
        with pytest.raises(ValueError):
            render.parse_quality(bad)
    for bad in ("0,0,0,1", "0.5,0,0.4,1", "0,0,1", "0,0,2,1"):
        with pytest.raises(ValueError):
            render.parse_region(bad)
