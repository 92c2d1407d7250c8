"""The conversion's bounds on memory (fashionnet.conversion): greyscale in strips, lookup tables
instead of full-size copies, the pixel limit checked before decoding, JPEGs decoded reduced;
and that none of them changes a byte of what the straightforward formulation gives."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from fashionnet import conversion
from fashionnet.conversion import MAX_PIXELS, convert, decode
from tests.predict_helpers import blank_png

# --- bit-identity with the straightforward formulation ----------------------------------------


def reference_greyscale(image: Image.Image) -> np.ndarray:
    """Luma as a whole-image Pillow pipeline makes it, each step a full-size copy: EXIF
    transpose, composite over white, convert("L")."""
    image = ImageOps.exif_transpose(image) if "exif" in image.info else image
    if image.mode.startswith("I;16"):
        return (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("L"))


def reference_convert(grey: np.ndarray, invert: str) -> tuple[np.ndarray, bool]:
    """The conversion written out on full-size int16 and float arrays: negate, trim within
    5% of the corners, levels, thumbnail, subsample, sharpen, centre."""
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    flip = bool(border.mean() > 127.5) if invert == "auto" else invert == "yes"
    grey = 255 - grey if flip else grey
    if grey.shape == (28, 28):
        return grey, flip
    corner = float(np.median(grey[[0, 0, -1, -1], [0, -1, 0, -1]]))
    keep = np.abs(grey.astype(np.int16) - corner) > 0.05 * 255
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if rows.size:
        grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if corner == 255:  # a white background: every level below it goes to 0
        grey = np.zeros_like(grey)
    elif corner > 0:
        level = grey.astype(np.float32) - corner
        grey = np.clip(level * (255.0 / (255.0 - corner)), 0, 255).round().astype(np.uint8)
    h, w = grey.shape
    image = Image.fromarray(grey)
    if max(h, w) > 73:
        s = 73 / max(h, w)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))),
                             Image.Resampling.LANCZOS)
    s = 28 / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = image.resize(size, Image.Resampling.NEAREST).filter(
        ImageFilter.UnsharpMask(radius=1.0, percent=100, threshold=0))
    out = np.zeros((28, 28), dtype=np.uint8)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = np.asarray(image)
    return out, flip


def test_conversion_is_bit_identical_to_the_full_size_formulation():
    """Lookup tables and row/column extremes instead of full-size int16 and float copies:
    the same bytes, on random objects whose values straddle the trim's 5% threshold, on
    backgrounds from black to white, in every invert mode."""
    rng = np.random.default_rng(0)
    for case in range(60):
        h, w = (int(n) for n in rng.integers(3, 160, 2))
        background = int(rng.choice([0, 2, 30, 128, 200, 240, 253, 255]))
        grey = np.full((h, w), background, dtype=np.uint8)
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        patch = grey[top : top + int(rng.integers(1, h)), left : left + int(rng.integers(1, w))]
        patch[:] = np.clip(background + rng.integers(-40, 41, patch.shape), 0, 255)
        for invert in conversion.INVERT_MODES:
            ours, reference = convert(grey, invert), reference_convert(grey, invert)
            assert ours[1] == reference[1], (case, invert)
            np.testing.assert_array_equal(ours[0], reference[0], err_msg=f"{case} {invert}")


def test_a_white_background_left_as_it_is_converts_to_black():
    """--invert no on a dark object on white: the background level is 255, and levels move
    it to 0 with everything darker (this divided by zero, exit 1, before)."""
    image = np.full((60, 40), 255, dtype=np.uint8)
    image[10:50, 10:30] = 40
    converted, inverted = convert(image, "no")
    assert not inverted and not converted.any()


def images_in_every_mode() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (200, 300, 4), dtype=np.uint8))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    grey = rgb.convert("L")
    grey.info["transparency"] = 7
    return {"RGB": rgb, "RGBA": rgba, "LA": rgba.convert("LA"), "P": palette, "L": grey,
            "I;16": Image.fromarray(rng.integers(0, 65536, (200, 300), dtype=np.uint16)),
            "1": rgb.convert("1"), "CMYK": rgb.convert("CMYK"), "I": rgb.convert("I")}


@pytest.mark.parametrize("mode", images_in_every_mode())
def test_greyscale_in_strips_is_the_whole_image_conversion(mode, monkeypatch):
    """Strips of 3 rows (instead of ~1 million pixels) give the whole-image pipeline's bytes."""
    monkeypatch.setattr(conversion, "STRIP_PIXELS", 1000)  # 300 pixels wide: 3 rows a strip
    image = images_in_every_mode()[mode]
    np.testing.assert_array_equal(decode(image), reference_greyscale(image))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_are_those_of_exif_transpose(orientation, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    images_in_every_mode()["RGBA"].crop((0, 0, 70, 40)).save(path, exif=exif)
    with Image.open(path) as image:
        image.load()
        np.testing.assert_array_equal(decode(image), reference_greyscale(image))


# --- bounds on decoding -----------------------------------------------------------------------


def test_more_pixels_than_the_limit_are_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(blank_png(4097, 4096))
    assert MAX_PIXELS == 4096 * 4096
    with Image.open(path) as image:
        with pytest.raises(Image.DecompressionBombError,
                           match=r"4097x4096 pixels to decode, more than the limit of 16,777,216"):
            decode(image)
        assert image.tile  # not decoded
        grey = decode(image, max_pixels=4097 * 4096)  # allowed: decoded, then reduced 2x
    assert grey.shape == (2048, 2049)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    """A 4400x300 JPEG (1.3 million pixels) decodes at half scale, as luma, so a limit of
    500,000 pixels lets it through."""
    path = tmp_path / "wide.jpg"
    photo = Image.new("RGB", (4400, 300), "white")
    ImageDraw.Draw(photo).rectangle((100, 50, 4300, 250), fill=(40, 40, 40))
    photo.save(path)
    with Image.open(path) as image:
        grey = decode(image, max_pixels=500_000)
        assert image.size == (2200, 150) and image.mode == "L"
    assert grey.shape == (150, 2200)
    image, inverted = convert(Image.open(path))
    bright = image > 127  # the bar, negated: 28 pixels wide, 200 * 28 / 4200 -> 1 high
    assert inverted and np.flatnonzero(bright.any(axis=1)).tolist() == [13] and bright[13].all()
