"""The stratified train/validation split of the official training set."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from fashionnet.data import NUM_CLASSES
from fashionnet.errors import ConfigError
from fashionnet.fields import Seed

OFFICIAL_TRAIN_SIZE = 60_000  # images in train-images-idx3-ubyte, which the download verifies


class SplitConfig(BaseModel):
    """How the official training set is split into train and validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_size: StrictInt = Field(6000, ge=NUM_CLASSES, description="validation images, stratified")
    limit: StrictInt = Field(0, ge=0, description="0 = all; N = stratified N-image train subset")
    seed: Seed = 42

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

