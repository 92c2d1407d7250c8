"""Evaluation: loss, accuracy, predictions and the per-class report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from torch import nn
from torch.nn import functional as F

from fashionnet.data import CLASSES, LabeledImages
from fashionnet.inference import EVAL_BATCH, map_batches


class EvaluateConfig(BaseModel):
    """How the evaluate stage predicts; the default is the reference's (one view per image)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tta: StrictBool = Field(False, description="test-time augmentation: average the class "
                            "probabilities of each image and its mirror image")


@dataclass(frozen=True)
class SplitResult:
    """Mean cross-entropy, accuracy (fraction) and per-image predictions on one split."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64 class indices


def evaluate(model: nn.Module, data: LabeledImages, device: torch.device | str = "cpu",
             batch_size: int = EVAL_BATCH, dtype: torch.dtype = torch.float32,
             tta: bool = False) -> SplitResult:
    """Evaluate ``model`` on the whole of ``data`` in eval mode, through the engine's batch
    loop (:func:`fashionnet.inference.map_batches`: BatchNorm folded, fused kernels, batches
    in parallel on a CPU); the model's training mode is restored afterwards. With ``tta``
    each image is also seen mirrored left to right and the two views' class probabilities
    are averaged: the loss is the cross-entropy of that average, the prediction its argmax."""
    device = torch.device(device)
    if tta:
        return _evaluate_two_views(model, data, device, batch_size, dtype)

    def step(logits: torch.Tensor, batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, predictions) of one batch."""
        y = data.labels[batch].to(device)
        # float32 logits: bfloat16 ones would round to 1/16 and tie in argmax. InferenceNet
        # returns float32; another module's autocast logits are bfloat16 (B, 10).
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="sum").double()
        return loss, logits.argmax(1)

    results = map_batches(model, data.images, step, device, dtype, batch_size)
    loss_sum = torch.stack([loss for loss, _ in results]).sum().item()  # float64
    predictions = torch.cat([preds for _, preds in results]).cpu().numpy()
    labels = data.labels.numpy()
    return SplitResult(
        loss=loss_sum / len(data),
        accuracy=float((predictions == labels).mean()),
        predictions=predictions,
    )


def _evaluate_two_views(model: nn.Module, data: LabeledImages, device: torch.device,
                        batch_size: int, dtype: torch.dtype) -> SplitResult:
    """:func:`evaluate` with flip test-time augmentation."""

    def probabilities(logits: torch.Tensor, batch: slice) -> torch.Tensor:
        return logits.float().softmax(1)  # (B, 10)

    views = [torch.cat(map_batches(model, images, probabilities, device, dtype, batch_size))
             for images in (data.images, data.images.flip(-1))]  # the mirror: a (N, 28, 28) copy
    mean = (views[0] + views[1]) / 2
    labels = data.labels.to(device)
    loss = F.nll_loss(mean.log(), labels, reduction="sum").double().item()
    predictions = mean.argmax(1).cpu().numpy()
    return SplitResult(loss=loss / len(data),
                       accuracy=float((predictions == data.labels.numpy()).mean()),
                       predictions=predictions)


def per_class_report(labels: np.ndarray, predictions: np.ndarray) -> pd.DataFrame:
    """scikit-learn's classification report as a frame: one row per class, then the averages.

    Columns ``class, precision, recall, f1-score, support``.
    """
    # Imported here: scikit-learn adds ~1 s to the start-up of train, which never needs it.
    from sklearn.metrics import classification_report

    report = classification_report(
        labels, predictions, labels=list(range(len(CLASSES))), target_names=list(CLASSES),
        output_dict=True, zero_division=0,
    )
    rows = [{"class": name, **report[name]} for name in (*CLASSES, "macro avg", "weighted avg")]
    frame = pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])
    frame["support"] = frame["support"].astype(int)
    return frame
