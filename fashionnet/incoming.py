"""New labelled images, after the official release: the batch file, the share of each batch held
out to measure the model on new data, and the checks a batch must pass before it may train the
model (no leaked yardstick images, no conflicting labels, labels the model mostly agrees with).

A batch is an .npz of ``images`` (N, 28, 28) uint8, already converted as `fashionnet predict`
converts users' images, and ``labels`` (N,) uint8; its id is a digest of that content, so the
same images and labels always make the same, immutable file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fashionnet.data import CLASSES, NUM_CLASSES, read_labelled
from fashionnet.errors import DataError
from fashionnet.fields import Number
from fashionnet.files import atomic_path

BATCH_ID = re.compile(r"[0-9a-f]{16}")
# Class names as a directory or a CSV cell may spell them: "t-shirt-top", "ankle-boot".
SLUGS: tuple[str, ...] = tuple(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
                               for name in CLASSES)


class IncomingConfig(BaseModel):
    """What happens to new labelled images (params.yaml's ``incoming`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holdout: Number = Field(0.1, ge=0, lt=1, description="seeded share of each batch kept out "
                            "of training, on which the model is measured as accuracy.incoming")
    max_disagreement: Number = Field(3.0, ge=1, description="a batch is refused when the "
                                     "current model disagrees with its labels significantly "
                                     "more often than this many times its validation error")


def class_index(name: str) -> int | None:
    """The class a directory name or a CSV label means: its index (``0``-``9``), its slug
    (``ankle-boot``) or its name (``Ankle boot``), any case; None for anything else."""
    text = name.strip()
    if text.isdigit() and int(text) < NUM_CLASSES:
        return int(text)
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return SLUGS.index(slug) if slug in SLUGS else None


def batch_id(images: np.ndarray, labels: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the batch's images and labels: its file's name."""
    h = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, np.uint8).tobytes())
    return h.hexdigest()[:16]


def save_batch(directory: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray
               ) -> Path:
    """Write a batch as ``<id>.npz`` in ``directory``, atomically; its path."""
    path = Path(directory) / f"{batch_id(images, labels)}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.uint8))
    return path


def load_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's (images, labels), checked: the shapes, the labels, and that the content is
    still the one its name is the digest of. DataError naming the file otherwise."""
    path = Path(path)
    images, labels = read_labelled(path, "incoming batch", "run `dvc pull` to fetch the batches")
    if path.stem != batch_id(images, labels):
        raise DataError(path, "content does not match its name: the file was modified")
    return images, labels


def holdout_index(batch: str, n: int, share: float, seed: int) -> np.ndarray:
    """The sorted positions of a batch's held-out images: round(share * n) of its ``n``,
    drawn from a generator seeded by ``seed`` and the batch id, so that a batch keeps its
    hold-out whatever other batches arrive."""
    rng = np.random.default_rng([seed, int(batch, 16) % 2**63])
    return np.sort(rng.permutation(n)[: round(share * n)])


def keys(images: np.ndarray) -> list[bytes]:
    """One key per image, equal exactly when the (28, 28) pixels are equal."""
    flat = np.ascontiguousarray(images, np.uint8).reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


@dataclass(frozen=True)
class Sorted:
    """A batch's images sorted against what the project holds already, by position."""

    new: list[int]  # not seen before: to be added
    repeated: list[int]  # seen in the training data or an earlier batch with the same label
    conflicting: list[tuple[int, int]]  # (position, the other label) seen with another label
    leaked: list[tuple[int, str]]  # (position, "validation" | "test"): a yardstick's image


def sort_batch(images: np.ndarray, labels: np.ndarray, known: dict[bytes, int],
               yardsticks: dict[str, Iterable[bytes]]) -> Sorted:
    """Each image of a batch against ``known`` (key -> label of the training data and earlier
    batches) and the ``yardsticks`` ({"validation": keys, "test": keys}), and against the
    batch's own earlier images: a repeat with the same label is skipped, with another label
    it conflicts."""
    held = {name: set(found) for name, found in yardsticks.items()}
    seen = dict(known)
    new, repeated, conflicting, leaked = [], [], [], []
    for i, (key, label) in enumerate(zip(keys(images), labels.tolist(), strict=True)):
        if where := next((name for name, found in held.items() if key in found), None):
            leaked.append((i, where))
        elif key not in seen:
            seen[key] = label
            new.append(i)
        elif seen[key] == label:
            repeated.append(i)
        else:
            conflicting.append((i, seen[key]))
    return Sorted(new, repeated, conflicting, leaked)


def disagreement_p_value(disagreements: int, n: int, val_error: float, ratio: float) -> float:
    """How likely ``disagreements`` or more of ``n`` labels would differ from the model's
    predictions if the batch's true error rate were ``ratio`` times the model's validation
    error: a one-sided binomial tail. A small value means the labels disagree with the model
    far more than its validation error predicts, as shuffled labels do."""
    from scipy.stats import binom

    p = min(1.0, max(val_error, 1.0 / 1000) * ratio)  # a perfect model still errs sometimes
    return float(binom.sf(disagreements - 1, n, p)) if disagreements else 1.0


def counts(labels: Sequence[int] | np.ndarray) -> dict[str, int]:
    """Images per class, by slug."""
    found = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)
    return dict(zip(SLUGS, found.tolist(), strict=True))
