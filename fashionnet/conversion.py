"""Converting users' images into Fashion-MNIST's: the (28, 28) uint8 images the model sees.

The conversion follows the Fashion-MNIST paper (Xiao, Rasul, Vollgraf 2017, section 2), which
made each image from a shop thumbnail (51x73, a light #fdfdfd background) by: trimming the
edges within 5% of the corner colour; resizing the longest edge to 28 by subsampling; sharpening
(Gaussian, radius and sigma 1, stronger near outlines); extending the shortest edge to 28 with
the image centred; negating; 8-bit greyscale. An image already 28x28 is taken to be such an
image: it is only made greyscale (and negated if it has a light background), never resampled.

Memory: decoding is bounded by MAX_PIXELS, and no step makes a full-size copy of the image in
another mode: greyscale is made in strips of rows, trimming and levels are lookup tables and
row/column reductions, so an image costs its decoded pixels plus one byte a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from fashionnet.data import IMAGE_SIZE

Invert = Literal["auto", "yes", "no"]
INVERT_MODES: tuple[Invert, ...] = ("auto", "yes", "no")

THUMBNAIL_EDGE = 73  # the longest edge of the shop thumbnails Fashion-MNIST was made from
TRIM_FUZZ = 0.05 * 255  # trimming keeps what differs from the corner colour by more than 5%
# Fashion-MNIST's border pixels average at most 107.5 of 255 over all 70,000 images (an object
# may touch the border): a mean above the midpoint is a light background, to be negated.
LIGHT_BORDER = 127.5
# The most pixels decoded for one image (4096x4096): Pillow holds RGB(A) at 4 bytes a pixel,
# and greyscale adds one, so one image costs at most about 84 MB, against the 716 MB of
# Pillow's own decompression-bomb limit (2 x 89.5 million pixels). A larger JPEG is decoded
# at 1/2, 1/4 or 1/8 scale (draft) when that brings it under the limit.
MAX_PIXELS = 4096 * 4096
# Images with a longest edge of 2 x REDUCED_EDGE or more are first reduced by a whole factor
# (JPEG's scaled decoding, else a box average) to between REDUCED_EDGE and twice it: an object
# a 28th of the frame wide still keeps the thumbnail's 73 pixels.
REDUCED_EDGE = 2048
STRIP_PIXELS = 1 << 20  # greyscale is made in strips of rows of about this many pixels
# EXIF orientation -> the numpy view that makes the image upright (ImageOps.exif_transpose's).
_UPRIGHT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a),
}
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Prepared:
    """Images as the model takes them, (N, 28, 28) uint8, and which of them were negated."""

    images: np.ndarray
    inverted: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.images)


def _light_border(images: np.ndarray) -> np.ndarray:
    """(N,) bool for (N, H, W) uint8 images: whether the one-pixel border is light on average."""
    h, w = images.shape[1:]
    total = images.sum(axis=(1, 2), dtype=np.int64)
    inner = images[:, 1:-1, 1:-1].sum(axis=(1, 2), dtype=np.int64)
    return (total - inner) / (h * w - max(h - 2, 0) * max(w - 2, 0)) > LIGHT_BORDER


def _to_negate(images: np.ndarray, invert: Invert) -> np.ndarray:
    """(N,) bool: which of (N, H, W) uint8 images ``invert`` negates."""
    if invert not in INVERT_MODES:
        raise ValueError(f"invert must be one of {INVERT_MODES}, got {invert!r}")
    if invert == "auto":
        return _light_border(images)
    return np.full(len(images), invert == "yes")


def negate(images: np.ndarray, invert: Invert = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 with light objects on dark, and (N,) bool of which were negated; what
    :func:`convert` does to each of N images already 28x28, in one pass. ``images`` is not
    modified."""
    flip = _to_negate(images, invert)
    if flip.any():
        images = images.copy()
        images[flip] = 255 - images[flip]
    return images, flip


def _luma_strip(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16"):  # 16-bit greyscale: its top 8 bits
        return (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    if image.mode != "L":
        image = image.convert("L")  # ITU-R 601-2 luma
    return np.asarray(image)


def _luma(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 luma of a decoded image as stored; transparency counts as white, the
    shop's background. Made in strips of rows (each pixel's value depends on that pixel
    only), so no full-size RGBA or greyscale copy is made beside the result."""
    w, h = image.size
    rows = max(1, STRIP_PIXELS // max(w, 1))
    if rows >= h:
        return _luma_strip(image)
    out = np.empty((h, w), dtype=np.uint8)
    for top in range(0, h, rows):
        out[top : top + rows] = _luma_strip(image.crop((0, top, w, min(h, top + rows))))
    return out


def _reduce(grey: np.ndarray) -> np.ndarray:
    """``grey`` box-averaged by the whole factor that leaves its longest edge between
    REDUCED_EDGE and twice it; as it is when already shorter."""
    factor = max(grey.shape) // REDUCED_EDGE
    return np.asarray(Image.fromarray(grey).reduce(factor)) if factor >= 2 else grey


def decode(image: Image.Image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W) uint8 luma of a PIL image, upright (EXIF orientation), transparency as white,
    reduced by a whole factor where its longest edge is 2 x REDUCED_EDGE or more.

    An image that Image.open has not decoded yet is decoded here, at a reduced scale where the
    format allows it (JPEG), and refused with Pillow's DecompressionBombError, before any
    pixel is decoded, if that is more than ``max_pixels``. An image already decoded is taken
    as it is: the limit is on decoding.
    """
    if getattr(image, "tile", None):  # opened, not decoded yet
        w, h = image.size
        if max(w, h) >= 2 * REDUCED_EDGE:
            scale = max(w, h) / REDUCED_EDGE
            # JPEG: decoded at 1/2, 1/4 or 1/8 scale, no smaller than asked, and as luma.
            image.draft("L" if image.mode == "RGB" else image.mode,
                        (max(1, int(w / scale)), max(1, int(h / scale))))
        w, h = image.size
        if w * h > max_pixels:
            raise Image.DecompressionBombError(
                f"{w}x{h} pixels to decode, more than the limit of {max_pixels:,}")
        image.load()
    grey = _reduce(_luma(image))
    orientation = image.getexif().get(_ORIENTATION) if "exif" in image.info else None
    return np.ascontiguousarray(_UPRIGHT[orientation](grey)) if orientation in _UPRIGHT \
        else grey


def _fit(grey: np.ndarray, negated: bool) -> np.ndarray:
    """The paper's steps 2-5 on an (H, W) uint8 greyscale image, negated first if ``negated``:
    trim, longest edge to 28 by subsampling, sharpen, centre on a 28x28 canvas. -> (28, 28)
    uint8. Negation and levels are lookup tables over the 256 grey levels and the trim is found
    from row and column minima and maxima: the only full-size copy is of the trimmed part."""
    table = np.arange(256, dtype=np.uint8)  # grey level -> its value after each step
    if negated:
        table = 255 - table
    corner = float(np.median(table[grey[[0, 0, -1, -1], [0, -1, 0, -1]]]))
    # Trimming keeps the pixels whose value differs from the corner by more than TRIM_FUZZ;
    # the grey levels it drops form one interval [low, high], so a row or column holds a
    # pixel to keep exactly when its minimum is below it or its maximum above it.
    dropped = np.flatnonzero(np.abs(table.astype(np.int16) - corner) <= TRIM_FUZZ)
    low, high = dropped.min(), dropped.max()
    rows = np.flatnonzero((grey.min(axis=1) < low) | (grey.max(axis=1) > high))
    cols = np.flatnonzero((grey.min(axis=0) < low) | (grey.max(axis=0) > high))
    if rows.size:  # else a blank image: nothing to trim to
        grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if corner > 0:
        # The shop's #fdfdfd background became 2 under negation; a photo's grey table would
        # stay grey, so the background level moves to 0, the rest stretched to keep 255.
        level = table.astype(np.float32) - corner
        table = np.clip(level * (255.0 / (255.0 - corner)), 0, 255).round().astype(np.uint8) \
            if corner < 255 else np.zeros(256, np.uint8)  # white: nothing is lighter than it
    grey = table[grey]
    h, w = grey.shape
    image = Image.fromarray(grey)
    if max(h, w) > THUMBNAIL_EDGE:
        # The paper subsampled 51x73 thumbnails; subsampling a large photo directly would
        # alias, so it first becomes such a thumbnail, as the shop's image server made them.
        s = THUMBNAIL_EDGE / max(h, w)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))),
                             Image.Resampling.LANCZOS)
    s = IMAGE_SIZE / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))  # (width, height), aspect kept
    image = image.resize(size, Image.Resampling.NEAREST)  # subsampling: rows/columns skipped
    # Unsharp masking with a Gaussian of radius 1: it only acts where the blur differs from
    # the image, near outlines.
    image = image.filter(ImageFilter.UnsharpMask(radius=1.0, percent=100, threshold=0))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    top, left = (IMAGE_SIZE - size[1]) // 2, (IMAGE_SIZE - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = np.asarray(image)
    return out


def convert(image: Image.Image | np.ndarray, invert: Invert = "auto",
            max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """One image -> (28, 28) uint8 as Fashion-MNIST's, and whether it was negated (``auto``:
    when its border is light, a dark object on a light background).

    ``image``: a PIL image of any size and mode (see :func:`decode` for ``max_pixels``), or an
    (H, W) uint8 greyscale array. Every image predict and ingest read goes through here; N
    images already 28x28 may go through :func:`negate` at once, which gives the same.
    """
    if isinstance(image, Image.Image):
        grey = decode(image, max_pixels)
    else:
        grey = np.asarray(image)
        if grey.ndim != 2 or grey.dtype != np.uint8:
            raise ValueError(f"a greyscale image must be (H, W) uint8, got {grey.dtype} "
                             f"{grey.shape}")
        grey = _reduce(grey)
    negated = bool(_to_negate(grey[None], invert)[0])
    if grey.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return (255 - grey if negated else grey), negated
    return _fit(grey, negated), negated


def prepare(images: torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image],
            invert: Invert = "auto") -> Prepared:
    """Images as the model takes them, from PIL images of any size and mode (converted as
    Fashion-MNIST's were), or from a tensor/array of 28x28 images: (N, 28, 28), (28, 28) or
    (N, 1, 28, 28); uint8, or floats in [0, 1], which are rounded to 8 bits as the data's are."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor | np.ndarray):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu()
            array = (images.float() if images.is_floating_point() else images).numpy()
        else:
            array = np.asarray(images)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be (N, 28, 28), (28, 28) or (N, 1, 28, 28), got "
                             f"{array.shape}")
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise ValueError(f"images must be uint8 or floats in [0, 1], got {array.dtype}")
        return Prepared(*negate(array, invert))
    converted = [convert(image, invert) for image in images]
    if not converted:
        raise ValueError("no images given")
    return Prepared(np.stack([c for c, _ in converted]), np.array([f for _, f in converted]))
