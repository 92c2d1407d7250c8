"""The conversion of users' images into Fashion-MNIST's (fashionnet.conversion): photos unlike
Fashion-MNIST against the same shapes drawn at 28x28, images already 28x28. Its bounds on
memory are tested in tests/test_conversion_bounds.py."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fashionnet import conversion
from fashionnet.conversion import convert, decode, negate, prepare
from tests.predict_helpers import read_file

WHITE, DARK = (255, 255, 255), (40, 40, 40)

def drawn(size: tuple[int, int], polygon: list[tuple[float, float]], fill: object,
          background: object, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).polygon(polygon, fill=fill)
    return image


def reference_mask(polygon: list[tuple[float, float]]) -> np.ndarray:
    """The polygon drawn directly at Fashion-MNIST's scale: its bounding box's longest edge
    28 pixels, centred on 28x28. An independent rendering to compare the conversion with."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    s = 27 / max(w, h)  # vertex coordinates run 0..27 along the longest edge
    dx, dy = (27 - w * s) / 2, (27 - h * s) / 2
    scaled = [((x - min(xs)) * s + dx, (y - min(ys)) * s + dy) for x, y in polygon]
    return np.asarray(drawn((28, 28), scaled, 255, 0, "L")) > 127


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the True pixels, inclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def grown(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 8 neighbours: what an anti-aliased, sharpened outline may reach."""
    padded = np.pad(mask, 1)
    return np.any([padded[1 + dy : 29 + dy, 1 + dx : 29 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# A shoe seen from the side: sole, toe, heel and shaft; 300 wide, 180 high.
SHOE = [(50, 300), (350, 300), (350, 260), (300, 230), (200, 220), (170, 140), (110, 120),
        (60, 130), (60, 250)]


def test_dark_shoe_on_white_is_negated_trimmed_scaled_and_centred(tmp_path):
    path = tmp_path / "shoe.png"
    drawn((400, 420), SHOE, DARK, WHITE).save(path)
    sources, prepared = read_file(path)
    assert [str(s) for s in sources] == [str(path)] and prepared.inverted.tolist() == [True]
    image = prepared.images[0]
    mask = image > 127
    # The longest edge (width 300) becomes 28; height 180 * 28/300 = 16.8 -> 17 rows, centred.
    assert bbox(mask) == (5, 21, 0, 27)
    assert (image[:5] == 0).all() and (image[22:] == 0).all()  # the background: black
    assert image[mask].mean() > 200  # the shoe, 215 after negation, and sharpened edges
    assert iou(mask, reference_mask(SHOE)) > 0.85


def test_large_colour_photo_on_the_shop_background(tmp_path):
    """A 3000x2000 JPEG, a red dress on Zalando's #fdfdfd: negated, the light grey background
    becomes 0, the dress fills the height, its proportions kept."""
    dress = [(1300, 150), (1700, 150), (1750, 500), (2000, 1900), (1000, 1900), (1250, 500)]
    path = tmp_path / "dress.jpg"
    drawn((3000, 2000), dress, (200, 30, 30), (253, 253, 253)).save(path, quality=90)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [True]
    image = prepared.images[0]
    mask = image > 100
    top, bottom, left, right = bbox(mask)
    assert (top, bottom) == (0, 27)
    assert abs((right - left + 1) - 1000 * 28 / 1750) <= 1 and abs((left + right) / 2 - 13.5) <= 1
    assert (image[~grown(mask)] == 0).all()  # the background, but for the outline's blur
    assert 150 < np.median(image[mask]) < 200  # red's luma 81, negated 174
    assert iou(mask, reference_mask(dress)) > 0.8


def test_tall_light_object_on_dark_is_kept_and_centred_across(tmp_path):
    """Non-square: 120x480, a light pair of trousers on black; no negation."""
    trousers = [(30, 20), (90, 20), (100, 460), (70, 460), (60, 120), (50, 460), (20, 460)]
    path = tmp_path / "trousers.png"
    drawn((120, 480), trousers, (230, 230, 230), (0, 0, 0)).save(path)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [False]
    mask = prepared.images[0] > 127
    top, bottom, left, right = bbox(mask)
    assert (top, bottom) == (0, 27)
    assert right - left + 1 == round(80 * 28 / 440)  # 5 columns, centred
    assert abs((left + right) / 2 - 13.5) <= 1
    assert iou(mask, reference_mask(trousers)) > 0.7  # a thin shape: a pixel is a lot


def test_off_centre_object_is_trimmed_to_the_centre(tmp_path):
    image = Image.new("L", (500, 500), 255)
    ImageDraw.Draw(image).ellipse((10, 20, 110, 120), fill=0)
    (converted, inverted) = convert(np.asarray(image))
    assert inverted
    mask = converted > 127
    assert bbox(mask) == (0, 27, 0, 27)
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - 13.5) < 0.5 and abs(cols.mean() - 13.5) < 0.5


def test_transparency_is_the_light_background(tmp_path):
    """An RGBA cut-out: transparent black around a dark blue bag. The transparent pixels count
    as the shop's white, so it is negated, and the background ends black."""
    bag = [(40, 80), (160, 80), (180, 190), (20, 190)]
    path = tmp_path / "bag.png"
    drawn((200, 200), bag, (20, 20, 90, 255), (0, 0, 0, 0), "RGBA").save(path)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [True]
    mask = prepared.images[0] > 127
    assert iou(mask, reference_mask(bag)) > 0.85
    assert (prepared.images[0][~grown(mask)] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    """A phone JPEG stored landscape with orientation 6 (rotate 90 degrees clockwise)."""
    bar = [(20, 40), (280, 40), (280, 60), (20, 60)]  # 260 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    drawn((300, 100), bar, DARK, WHITE).save(path, exif=exif, quality=95)
    _, prepared = read_file(path)
    top, bottom, left, right = bbox(prepared.images[0] > 127)
    assert (top, bottom) == (0, 27) and right - left + 1 <= 3  # upright: tall and thin


def test_28x28_images_are_taken_as_fashion_mnist_images(tmp_path):
    """A 28x28 image is never resampled: greyscale only, and negated when its border is
    light. A colour one with a light background comes out as 255 - its luma."""
    rng = np.random.default_rng(0)
    rgb = np.full((28, 28, 3), 250, dtype=np.uint8)
    rgb[5:23, 8:20] = rng.integers(0, 120, (18, 12, 3))
    path = tmp_path / "small.png"
    Image.fromarray(rgb).save(path)
    _, prepared = read_file(path)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    assert prepared.inverted.tolist() == [True]
    np.testing.assert_array_equal(prepared.images[0], 255 - luma)
    for mode, expected in (("yes", 255 - luma), ("no", luma)):
        np.testing.assert_array_equal(read_file(path, mode)[1].images[0], expected)
    assert decode(Image.fromarray(rgb)).dtype == np.uint8


def test_no_fashion_mnist_image_is_negated_by_auto(official):
    """auto's rule (border mean above 127.5) on all 70,000 images: none is taken for a light
    background, though some objects touch the border."""
    for data in official:
        assert not prepare(data.images).inverted.any()


def test_negate_in_one_pass_is_convert_image_by_image(official):
    """Readers negate images already 28x28 in one vectorised pass: the same as converting
    each, in every mode."""
    images = official[1].images[:200].numpy().copy()
    images[::3] = 255 - images[::3]  # light backgrounds: what auto negates
    expected = {"auto": np.arange(200) % 3 == 0, "yes": np.ones(200, bool),
                "no": np.zeros(200, bool)}
    for invert in conversion.INVERT_MODES:
        batch, flips = negate(images, invert)
        singles = [convert(image, invert) for image in images]
        assert np.array_equal(batch, np.stack([image for image, _ in singles]))
        assert flips.tolist() == [flipped for _, flipped in singles]
        assert np.array_equal(flips, expected[invert])
