"""The IDX file format of the Fashion-MNIST release: reading with validation, bounded by the
file's size and a byte limit before anything is allocated."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

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
# The most bytes of data one file may claim when it is read whole: 1 GiB, 1.37 million images,
# 22 times the official training file. Larger files of images are read in chunks
# (fashionnet.arrays), never whole.
MAX_ARRAY_BYTES = 1 << 30
_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading; a DataError naming it unless it is a regular file (after
    symbolic links): a read from a FIFO, socket or device could block or never end. Opened
    non-blocking, so that not even a FIFO swapped in after the check can block. Other failures
    raise open()'s OSError (FileNotFoundError, PermissionError, ...)."""
    _check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_data(path: str | os.PathLike[str], missing: str = "no such file or directory"
              ) -> BinaryIO:
    """:func:`open_regular`, its failures as DataErrors naming ``path`` (``missing`` the
    problem when it is not there)."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise DataError(path, missing) from None
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror}") from None


def _check_regular(path: str | os.PathLike[str], mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise DataError(path, f"not a regular file: {kind}")


def read_header(f: BinaryIO, path: str | os.PathLike[str], ndim: int) -> tuple[int, ...]:
    """The dimensions in the header of an IDX file of unsigned bytes with ``ndim`` dimensions,
    open at its start, checked against the file's size before any data is read."""
    size = os.fstat(f.fileno()).st_size
    header = 4 + 4 * ndim
    raw = f.read(header)
    if len(raw) < header:
        raise DataError(path, f"truncated: {size} bytes, shorter than the IDX header")
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
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(path, f"{what}: {size} bytes, but its header {dims} says {expected}")
    return dims


def read_idx(path: str | os.PathLike[str], ndim: int,
             max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """Read an uncompressed IDX file of unsigned bytes with ``ndim`` dimensions; refused
    before reading its data if its header disagrees with its size or claims more than
    ``max_bytes``."""
    path = Path(path)
    with open_data(path, "file not found (run `fashionnet download`)") as f:
        dims = read_header(f, path, ndim)
        size = math.prod(dims)
        if size > max_bytes:
            raise DataError(path, f"its header {dims} claims {size:,} bytes, more than the "
                                  f"{max_bytes:,} read into memory at once")
        try:
            raw = f.read(size)
        except OSError as e:
            raise DataError(path, f"cannot be read: {e.strerror}") from None
    if len(raw) != size:  # it shrank since its size was checked
        raise DataError(path, f"truncated: {len(raw)} bytes of data, its header {dims} says "
                              f"{size}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


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

