"""Fashion-MNIST in memory: the class names, the prepared splits' files and their tensors."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fashionnet.errors import DataError
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
SPLITS = ("train", "val", "test")  # the prepared splits, in data/prepared/{name}.npz
# metrics/history.csv, one row per epoch: written by the train stage, read by the report.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


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


def save_split(path: str | os.PathLike[str], data: LabeledImages, index: np.ndarray,
               **extra: np.ndarray) -> None:
    """Write one split as ``.npz`` (images, labels, index into its source file, and any
    ``extra`` arrays after them), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=data.images.numpy(), labels=data.labels.numpy().astype(np.uint8),
                 index=np.asarray(index, dtype=np.int64), **extra)


def read_labelled(path: str | os.PathLike[str], what: str, missing: str,
                  allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8 class indices from an .npz this
    project wrote (``what`` it should be), checked; DataError naming the file otherwise, with
    the advice ``missing`` when it is not there. One without images is refused unless
    ``allow_empty``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError:
        raise DataError(path, f"file not found ({missing})") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, f"not a valid {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(path, f"images must be (N, 28, 28) uint8, got {images.dtype} "
                              f"{images.shape}")
    if len(images) == 0 and not allow_empty:
        raise DataError(path, "holds no images")
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(path, f"labels must be ({len(images)},) uint8 to match the images, got "
                              f"{labels.dtype} {labels.shape}")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataError(path, f"label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    return images, labels


def load_split(path: str | os.PathLike[str], allow_empty: bool = False) -> LabeledImages:
    """Read one split written by :func:`save_split`, validating shapes and labels; one without
    images is refused unless ``allow_empty``."""
    images, labels = read_labelled(path, "prepared split", "run `fashionnet split`",
                                   allow_empty)
    return LabeledImages(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], what ToTensor gave the reference."""
    return images.unsqueeze(1).float().div_(255.0)
