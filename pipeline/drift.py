"""Drift: how the model committed at a revision does on the incoming batches it has not trained on,
measured before a retrain, so that the retrain's summary says how far the new data had moved.

Which batches a model trained on is what its split wrote: data/prepared/incoming.npz lists them
(``batches``), as committed in dvc.lock at that revision; the batches the manifest lists beyond
those are new to it. Everything is read at the revision through DVC (from its cache, or its
remote), so this works in a worker's fresh clone as in a workspace.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from fashionnet.data import LabeledImages
from fashionnet.evaluate import evaluate
from fashionnet.model import FashionNet
from pipeline import manifest, paths
from pipeline.workspace import read, show


@dataclass(frozen=True)
class Drift:
    """The model's accuracy on the images of the batches it has not trained on."""

    batches: list[str]
    images: int
    accuracy: float | None  # None without new images


def trained_batches(rev: str) -> set[str]:
    """The incoming batches the model at ``rev`` trained on."""
    from dvc.exceptions import PathMissingError

    try:
        with np.load(io.BytesIO(read(paths.INCOMING_HOLDOUT, rev, "rb"))) as z:
            return set(z["batches"].tolist())
    except PathMissingError:  # no incoming data when that model was trained
        return set()


def new_batches(rev: str) -> list[str]:
    """The batches the manifest at ``rev`` lists that the model at ``rev`` has not trained on,
    in the order they arrived."""
    text = show(rev, paths.MANIFEST)
    listed = [] if text is None else manifest.read_text(text)["batch"].tolist()
    seen = trained_batches(rev) if listed else set()
    return [batch for batch in listed if batch not in seen]


def measure(rev: str) -> Drift:
    """The model at ``rev`` on every image of the batches new to it (held-out share included)."""
    batches = new_batches(rev)
    if not batches:
        return Drift([], 0, None)
    images, labels = [], []
    for batch in batches:
        with np.load(io.BytesIO(read(paths.INCOMING_DIR / f"{batch}.npz", rev, "rb"))) as z:
            images.append(z["images"])
            labels.append(z["labels"])
    data = LabeledImages(torch.from_numpy(np.concatenate(images)),
                         torch.from_numpy(np.concatenate(labels).astype(np.int64)))
    model = FashionNet()
    model.load_state_dict(torch.load(io.BytesIO(read(paths.MODEL, rev, "rb")),
                                     map_location="cpu", weights_only=True))
    return Drift(batches, len(data), evaluate(model, data).accuracy)
