"""Prediction on users' own images: reading them, converting them as Fashion-MNIST's images were
made, and classifying them with the evaluation engine (:func:`fashionnet.inference.map_batches`).

The conversion follows the Fashion-MNIST paper (Xiao, Rasul, Vollgraf 2017, section 2), which
made each image from a shop thumbnail (51x73, a light #fdfdfd background) by: trimming the
edges within 5% of the corner colour; resizing the longest edge to 28 by subsampling; sharpening
(Gaussian, radius and sigma 1, stronger near outlines); extending the shortest edge to 28 with
the image centred; negating; 8-bit greyscale. An image already 28x28 is taken to be such an
image: it is only made greyscale (and negated if it has a light background), never resampled.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import nn
from torch.nn import functional as F

from fashionnet.checkpoint import load_weights
from fashionnet.data import CLASSES, IMAGE_SIZE
from fashionnet.errors import DataError
from fashionnet.idx import read_images
from fashionnet.inference import EVAL_BATCH, map_batches
from fashionnet.model import FashionNet
from fashionnet.runtime import resolve_precision

Invert = Literal["auto", "yes", "no"]
INVERT_MODES: tuple[Invert, ...] = ("auto", "yes", "no")

THUMBNAIL_EDGE = 73  # the longest edge of the shop thumbnails Fashion-MNIST was made from
TRIM_FUZZ = 0.05 * 255  # trimming keeps what differs from the corner colour by more than 5%
# Fashion-MNIST's border pixels average at most 107.5 of 255 over all 70,000 images (an object
# may touch the border): a mean above the midpoint is a light background, to be negated.
LIGHT_BORDER = 127.5
# Formats Pillow identifies but cannot decode here (stubs, video, EPS without Ghostscript):
# a directory's files in these are not taken for images.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}
_IDX3_MAGIC = b"\x00\x00\x08\x03"  # unsigned bytes, 3 dimensions: an IDX image file
_ZIP_MAGIC = b"PK\x03\x04"  # .npz files are zip archives
CHUNK = 256  # files per decoding task: a task per file would cost more than a 28x28 PNG's decode


@dataclass(frozen=True)
class Source:
    """Where one image came from: a file, and its index inside an .npz or IDX file."""

    file: str
    index: int | None = None

    def __str__(self) -> str:
        return self.file if self.index is None else f"{self.file}[{self.index}]"


@dataclass(frozen=True)
class Prepared:
    """Images as the model takes them, (N, 28, 28) uint8, and which of them were negated."""

    images: np.ndarray
    inverted: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Predictions:
    """The model's answer for N images."""

    probabilities: np.ndarray  # (N, 10) float32: softmax, computed in float32
    classes: np.ndarray  # (N,) int64 class indices (the argmax)
    inverted: np.ndarray  # (N,) bool: negated before the model saw it
    images: np.ndarray  # (N, 28, 28) uint8: what the model saw

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """The predicted class names."""
        return [CLASSES[i] for i in self.classes]

    @property
    def confidence(self) -> np.ndarray:
        """(N,) float32, the probability of the predicted class."""
        return self.probabilities[np.arange(len(self)), self.classes]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) class indices and (N, k) probabilities, most probable first."""
        # A stable sort on the negated probabilities: ties keep class order, as argmax does.
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.probabilities, order, axis=1)


# --- conversion ----------------------------------------------------------------------------


def _light_border(images: np.ndarray) -> np.ndarray:
    """(N,) bool for (N, H, W) uint8 images: whether the one-pixel border is light on average."""
    h, w = images.shape[1:]
    total = images.sum(axis=(1, 2), dtype=np.int64)
    inner = images[:, 1:-1, 1:-1].sum(axis=(1, 2), dtype=np.int64)
    return (total - inner) / (h * w - max(h - 2, 0) * max(w - 2, 0)) > LIGHT_BORDER


def _negate(images: np.ndarray, invert: Invert) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 with light objects on dark, and (N,) bool of which were negated."""
    if invert not in INVERT_MODES:
        raise ValueError(f"invert must be one of {INVERT_MODES}, got {invert!r}")
    flip = (_light_border(images) if invert == "auto"
            else np.full(len(images), invert == "yes"))
    if flip.any():
        images = images.copy()
        images[flip] = 255 - images[flip]
    return images, flip


def greyscale(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 luma of ``image`` in its upright orientation; transparency counts as white,
    the shop's background."""
    image = ImageOps.exif_transpose(image) if "exif" in image.info else image
    if image.mode.startswith("I;16"):  # 16-bit greyscale: its top 8 bits
        return (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    if image.mode != "L":
        image = image.convert("L")  # ITU-R 601-2 luma
    return np.asarray(image)


def _fit(grey: np.ndarray) -> np.ndarray:
    """The paper's steps 2-5 on a light-on-dark (H, W) uint8 image: trim, longest edge to 28 by
    subsampling, sharpen, centre on a 28x28 canvas. -> (28, 28) uint8."""
    corner = float(np.median(grey[[0, 0, -1, -1], [0, -1, 0, -1]]))
    keep = np.abs(grey.astype(np.int16) - corner) > TRIM_FUZZ
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if rows.size:  # else a blank image: nothing to trim to
        grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if corner > 0:
        # The shop's #fdfdfd background became 2 under negation; a photo's grey table would
        # stay grey, so the background level moves to 0, the rest stretched to keep 255.
        level = grey.astype(np.float32) - corner
        grey = np.clip(level * (255.0 / (255.0 - corner)), 0, 255).round().astype(np.uint8)
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


def convert(grey: np.ndarray, invert: Invert = "auto") -> tuple[np.ndarray, bool]:
    """One (H, W) uint8 greyscale image -> (28, 28) uint8 as Fashion-MNIST's, and whether it
    was negated (``auto``: when its border is light, a dark object on a light background)."""
    (grey,), (flipped,) = _negate(grey[None], invert)
    if grey.shape != (IMAGE_SIZE, IMAGE_SIZE):
        grey = _fit(grey)
    return grey, bool(flipped)


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
        return Prepared(*_negate(array, invert))
    converted = [convert(greyscale(image), invert) for image in images]
    if not converted:
        raise ValueError("no images given")
    return Prepared(np.stack([c for c, _ in converted]), np.array([f for _, f in converted]))


# --- the model ------------------------------------------------------------------------------


def classify(prepared: Prepared, model: nn.Module, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = EVAL_BATCH) -> Predictions:
    """The model's probabilities for prepared images, through the evaluation engine: the same
    batches, kernels and precision as ``fashionnet evaluate``, so the same argmax."""
    device = torch.device(device)
    # A writable copy only where needed: torch warns about read-only arrays (np.frombuffer).
    images = torch.from_numpy(np.require(prepared.images, requirements=["C", "W"]))

    def step(logits: torch.Tensor, batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()  # softmax in float32 whatever the compute dtype
        return logits.argmax(1), F.softmax(logits, dim=1)

    results = map_batches(model, images, step, device, dtype, batch_size)
    return Predictions(
        probabilities=torch.cat([p for _, p in results]).cpu().numpy(),
        classes=torch.cat([c for c, _ in results]).cpu().numpy(),
        inverted=prepared.inverted,
        images=prepared.images,
    )


def load_model(path: str | os.PathLike[str]) -> FashionNet:
    """A FashionNet from a state_dict file, read with ``weights_only=True``; DataError naming
    the file unless it holds exactly FashionNet's tensors."""
    return load_weights(path, FashionNet()).eval()


def predict(images: torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image],
            model: nn.Module | str | os.PathLike[str], *, invert: Invert = "auto",
            device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Predictions:
    """Classes and probabilities for ``images`` (see :func:`prepare`) from ``model``, a
    FashionNet or the path of its state_dict (``models/fashionnet.pt``). ``dtype`` defaults to
    ``train.precision: auto``'s choice, as ``fashionnet evaluate`` computes."""
    device = torch.device(device)
    if not isinstance(model, nn.Module):
        model = load_model(model)
    dtype = dtype or resolve_precision("auto", device)
    return classify(prepare(images, invert), model.to(device), device, dtype)


# --- files ----------------------------------------------------------------------------------


def image_suffixes() -> frozenset[str]:
    """File name suffixes taken for images inside directories: what Pillow decodes, and .npz."""
    Image.init()
    return frozenset({ext for ext, fmt in Image.registered_extensions().items()
                      if fmt in Image.OPEN and fmt not in _UNDECODABLE} | {".npz"})


def _wanted(name: str, suffixes: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes or name.endswith("idx3-ubyte")


def _walk(directory: str, suffixes: frozenset[str]) -> Iterator[str]:
    """The wanted files under ``directory``, depth first, each level sorted by name: the
    order of sorting their paths part by part. os.scandir's entries know their type, so it
    costs no stat per file (pathlib's rglob and sort took 0.4 s for 10,000 files)."""
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk(entry.path, suffixes)
        elif entry.is_file() and _wanted(entry.name, suffixes):
            yield entry.path


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files to read, in order: each file as given, each directory's image, .npz and IDX
    files recursively, sorted by path (hidden files and directories left out). DataError for a
    missing path or a directory without any."""
    suffixes = image_suffixes()
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = [Path(p) for p in _walk(str(path), suffixes)]
            if not inside:
                raise DataError(path, "directory holds no image, .npz or IDX files")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise DataError(path, "no such file or directory")
    return found


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "images" in keys:
                key = "images"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise DataError(path, f"holds arrays {keys}: none named 'images'")
            images = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, f"not a readable .npz file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if images.ndim == 2:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(path, f"'{key}' must be (N, 28, 28) uint8 images, got {images.dtype} "
                              f"{images.shape}")
    if len(images) == 0:
        raise DataError(path, "holds no images")
    return images


def _read_image(f: BinaryIO, path: Path) -> np.ndarray:
    try:
        with Image.open(f) as image:
            image.load()
            return greyscale(image)
    except Image.UnidentifiedImageError:
        raise DataError(path, "not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise DataError(path, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated, bad CRC, ...
        raise DataError(path, f"damaged or truncated image ({e})") from None


def _decode(path: Path) -> tuple[list[Source], np.ndarray]:
    """One file's images, (N, H, W) uint8 greyscale, neither negated nor fitted yet: an image
    Pillow reads (N = 1), an .npz (the array named ``images``, or its only array) or an IDX
    image file of (N, 28, 28) uint8. DataError naming the file."""
    try:
        # Opened once (closed below): a second open costs as much as decoding a 28x28 PNG.
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror}") from None
    with f:
        magic = f.read(4)
        if magic == _IDX3_MAGIC:
            images = read_images(path)
        elif magic == _ZIP_MAGIC or path.suffix.lower() == ".npz":
            images = _read_npz(path)
        else:
            f.seek(0)
            return [Source(str(path))], _read_image(f, path)[None]
    return [Source(str(path), i) for i in range(len(images))], images


def _finish(decoded: Sequence[np.ndarray], invert: Invert) -> Prepared:
    """Decoded images negated where ``invert`` says, and fitted to 28x28 where they are not:
    those already 28x28 in one vectorised pass (the per-image cost is that of the decode)."""
    parts, known = [], []  # known: the negation decided while fitting, else None
    for images in decoded:
        if images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
            parts.append(images)
            known.append(None)
        else:
            image, flipped = convert(images[0], invert)
            parts.append(image[None])
            known.append(flipped)
    images = np.concatenate(parts)
    pending = np.concatenate([np.full(len(p), k is None) for p, k in zip(parts, known,
                                                                          strict=True)])
    inverted = np.zeros(len(images), dtype=bool)
    inverted[~pending] = [k for k in known if k is not None]
    if pending.any():
        images[pending], inverted[pending] = _negate(images[pending], invert)
    return Prepared(images, inverted)


def read_file(path: str | os.PathLike[str], invert: Invert = "auto"
              ) -> tuple[list[Source], Prepared]:
    """The images in one file (see :func:`find_images`), converted; DataError naming it."""
    sources, images = _decode(Path(path))
    return sources, _finish([images], invert)


@dataclass(frozen=True)
class ReadResult:
    """What reading files gave: one Source per image, the images, and the files refused."""

    sources: list[Source]
    prepared: Prepared
    bad: list[DataError]


def read_files(files: Sequence[Path], invert: Invert = "auto", skip_bad: bool = False,
               progress: Callable[[int], None] | None = None,
               workers: int | None = None) -> ReadResult:
    """Read and convert ``files`` in parallel (Pillow decodes without the GIL), in order.

    A bad file raises its DataError, the first in file order; with ``skip_bad`` it is listed
    in ``bad`` and the rest are read. ``progress(n)`` is called as each n files are done.
    """
    def chunk(start: int) -> ReadResult:
        sources: list[Source] = []
        decoded: list[np.ndarray] = []
        bad: list[DataError] = []
        for path in files[start : start + CHUNK]:
            try:
                names, images = _decode(Path(path))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(e)
                continue
            sources += names
            decoded.append(images)
        if progress is not None:
            progress(len(files[start : start + CHUNK]))
        prepared = _finish(decoded, invert) if decoded else _EMPTY
        return ReadResult(sources, prepared, bad)

    pool = ThreadPoolExecutor(workers or torch.get_num_threads(), thread_name_prefix="read")
    try:
        parts = list(pool.map(chunk, range(0, len(files), CHUNK)))
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, the chunks not yet started
    return ReadResult(
        sources=[s for part in parts for s in part.sources],
        prepared=Prepared(np.concatenate([_EMPTY.images] + [p.prepared.images for p in parts]),
                          np.concatenate([_EMPTY.inverted]
                                         + [p.prepared.inverted for p in parts])),
        bad=[e for part in parts for e in part.bad],
    )


_EMPTY = Prepared(np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.empty(0, bool))
