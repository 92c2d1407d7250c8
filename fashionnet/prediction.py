"""The prediction API: classes and probabilities for users' images from a trained FashionNet,
computed by the evaluation engine (:func:`fashionnet.inference.map_batches`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from fashionnet.checkpoint import load_weights
from fashionnet.conversion import Invert, Prepared, prepare
from fashionnet.data import CLASSES
from fashionnet.inference import EVAL_BATCH, map_batches
from fashionnet.model import FashionNet
from fashionnet.runtime import resolve_precision


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
    """Classes and probabilities for ``images`` (see :func:`fashionnet.conversion.prepare`)
    from ``model``, a FashionNet or the path of its state_dict (``models/fashionnet.pt``).
    ``dtype`` defaults to ``train.precision: auto``'s choice, as ``fashionnet evaluate``
    computes."""
    device = torch.device(device)
    if not isinstance(model, nn.Module):
        model = load_model(model)
    dtype = dtype or resolve_precision("auto", device)
    return classify(prepare(images, invert), model.to(device), device, dtype)
