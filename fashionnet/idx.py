"""The IDX file format of the Fashion-MNIST release: reading with validation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from fashionnet.data import IMAGE_SIZE, NUM_CLASSES, LabeledImages
from fashionnet.errors import DataError

# The official file names, uncompressed (what data/raw/ holds).
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an uncompressed IDX file of unsigned bytes with ``ndim`` dimensions."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found (run `fashionnet download`)") from None
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(path, f"truncated: {len(raw)} bytes, shorter than the IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        hint = "; gzip-compressed? data/raw holds the uncompressed files" \
            if raw[:2] == b"\x1f\x8b" else ""
        raise DataError(
            path,
            f"bad magic number 0x{raw[:4].hex()} "
            f"(expected 0x0000{_UBYTE:02x}{ndim:02x}: unsigned bytes, {ndim} dimensions{hint})",
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)  # Python ints: a forged header cannot overflow
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            path,
            f"{what}: {len(raw)} bytes, but its header {dims} says {expected}",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_images(path: str | os.PathLike[str]) -> np.ndarray:
    """(N, 28, 28) uint8 from an IDX3 image file."""
    images = read_idx(path, ndim=3)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(path, f"images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) == 0:
        raise DataError(path, "holds no images")
    return images


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """(N,) uint8 class indices from an IDX1 label file."""
    labels = read_idx(path, ndim=1)
    if len(labels) and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(path, f"label {labels[bad]} at index {bad} is outside 0..{NUM_CLASSES - 1}")
    return labels


def load_idx_pair(images_path: str | os.PathLike[str],
                  labels_path: str | os.PathLike[str]) -> LabeledImages:
    """An image file and its label file, checked to belong together."""
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(
            labels_path,
            f"{len(labels)} labels do not match the {len(images)} images of {images_path}",
        )
    return LabeledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def load_raw(raw_dir: str | os.PathLike[str]) -> tuple[LabeledImages, LabeledImages]:
    """The official training and test sets from the four IDX files in ``raw_dir``."""
    raw_dir = Path(raw_dir)
    train = load_idx_pair(raw_dir / TRAIN_IMAGES, raw_dir / TRAIN_LABELS)
    test = load_idx_pair(raw_dir / TEST_IMAGES, raw_dir / TEST_LABELS)
    return train, test

