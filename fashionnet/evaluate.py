"""Evaluation: loss, accuracy, predictions and the per-class report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import CLASSES, LabeledImages
from fashionnet.inference import EVAL_BATCH, map_batches


@dataclass(frozen=True)
class SplitResult:
    """Mean cross-entropy, accuracy (fraction) and per-image predictions on one split."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64 class indices


def evaluate(model: nn.Module, data: LabeledImages, device: torch.device | str = "cpu",
             batch_size: int = EVAL_BATCH, dtype: torch.dtype = torch.float32) -> SplitResult:
    """Evaluate ``model`` on the whole of ``data`` in eval mode, through the engine's batch
    loop (:func:`fashionnet.inference.map_batches`: BatchNorm folded, fused kernels, batches
    in parallel on a CPU); the model's training mode is restored afterwards."""
    device = torch.device(device)

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
