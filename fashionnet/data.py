"""Fashion-MNIST in memory: IDX parsing with validation, the stratified split, tensors."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from fashionnet.errors import ConfigError, DataError
from fashionnet.files import atomic_path

# The ten classes, in label order.
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 28
OFFICIAL_TRAIN_SIZE = 60_000  # images in train-images-idx3-ubyte, which the download verifies

# The official file names, uncompressed (what data/raw/ holds).
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one Fashion-MNIST uses


@dataclass(frozen=True)
class LabeledImages:
    """Images (N, 28, 28) uint8 and labels (N,) int64, held in memory as tensors."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be (N, 28, 28) uint8, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabeledImages:
        idx = torch.as_tensor(index, dtype=torch.long)
        return LabeledImages(self.images[idx], self.labels[idx])


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


class SplitConfig(BaseModel):
    """How the official training set is split into train and validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_size: StrictInt = Field(6000, ge=NUM_CLASSES, description="validation images, stratified")
    limit: StrictInt = Field(0, ge=0, description="0 = all; N = stratified N-image train subset")
    seed: StrictInt = Field(42, ge=0, le=2**32 - 1)  # scikit-learn's random_state range

    @field_validator("val_size")
    @classmethod
    def _leaves_training_images(cls, value: int) -> int:
        if value > OFFICIAL_TRAIN_SIZE - NUM_CLASSES:
            raise ValueError(f"{value} leaves fewer than {NUM_CLASSES} of the "
                             f"{OFFICIAL_TRAIN_SIZE:,} official training images for training")
        return value

    @field_validator("limit")
    @classmethod
    def _fits_beside_validation(cls, value: int, info: ValidationInfo) -> int:
        if 0 < value < NUM_CLASSES:
            raise ValueError(f"{value} is too few: a stratified subset needs one image of each "
                             f"of the {NUM_CLASSES} classes")
        val_size = info.data.get("val_size")  # absent when val_size itself was invalid
        if val_size is not None and value + val_size > OFFICIAL_TRAIN_SIZE:
            raise ValueError(f"{value} + split.val_size {val_size} exceeds the "
                             f"{OFFICIAL_TRAIN_SIZE:,} official training images")
        return value


def stratified_split(labels: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_index, val_index) into ``labels``, both stratified by class."""
    # Imported here: scikit-learn adds ~1 s to every stage's start-up, and only split needs it.
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    if cfg.val_size >= n:
        raise ConfigError("split.val_size", f"{cfg.val_size} is not smaller than the {n} "
                          "images of the training set")
    train_idx, val_idx = train_test_split(
        np.arange(n), test_size=cfg.val_size, stratify=labels, random_state=cfg.seed
    )
    if cfg.limit:
        if cfg.limit > len(train_idx):
            raise ConfigError("split.limit", f"{cfg.limit} exceeds the {len(train_idx)} "
                              "images left for training after the validation split")
        if cfg.limit < len(train_idx):
            train_idx, _ = train_test_split(
                train_idx, train_size=cfg.limit, stratify=labels[train_idx],
                random_state=cfg.seed,
            )
    return np.sort(train_idx), np.sort(val_idx)


def save_split(path: str | os.PathLike[str], data: LabeledImages, index: np.ndarray) -> None:
    """Write one split as ``.npz`` (images, labels, index into its source file), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=data.images.numpy(), labels=data.labels.numpy().astype(np.uint8),
                 index=np.asarray(index, dtype=np.int64))


def load_split(path: str | os.PathLike[str]) -> LabeledImages:
    """Read one split written by :func:`save_split`, validating shapes and labels."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError:
        raise DataError(path, "file not found (run `fashionnet split`)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, f"not a valid prepared split ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(path, f"images must be (N, 28, 28) uint8, got {images.dtype} "
                              f"{images.shape}")
    if len(images) == 0:
        raise DataError(path, "holds no images")
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(path, f"labels must be ({len(images)},) uint8 to match the images, got "
                              f"{labels.dtype} {labels.shape}")
    if labels.max() >= NUM_CLASSES:
        raise DataError(path, f"label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    return LabeledImages(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], what ToTensor gave the seed."""
    return images.unsqueeze(1).float().div_(255.0)
