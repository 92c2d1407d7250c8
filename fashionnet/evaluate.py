"""Evaluation: loss, accuracy, predictions and the per-class report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import CLASSES, LabeledImages, to_input
from fashionnet.model import autocast
from fashionnet.runtime import retain_freed_memory

EVAL_BATCH = 128  # images per forward pass: small batches stay in cache (fastest on CPU)


@dataclass(frozen=True)
class SplitResult:
    """Mean cross-entropy, accuracy (fraction) and per-image predictions on one split."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64 class indices


@torch.inference_mode()
def evaluate(model: nn.Module, data: LabeledImages, device: torch.device | str = "cpu",
             batch_size: int = EVAL_BATCH, dtype: torch.dtype = torch.float32) -> SplitResult:
    """Evaluate ``model`` on the whole of ``data`` in eval mode (BatchNorm running stats,
    no dropout); the model's training mode is restored afterwards. With ``dtype`` bfloat16
    the forward passes run under autocast."""
    retain_freed_memory()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        preds = []
        for start in range(0, len(data), batch_size):
            # uint8 crosses to the device, a quarter of the bytes; it is scaled there.
            x = to_input(data.images[start : start + batch_size].to(device))
            y = data.labels[start : start + batch_size].to(device)
            with autocast(device, dtype):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            preds.append(logits.argmax(1))
        predictions = torch.cat(preds).cpu().numpy()
    finally:
        model.train(was_training)
    labels = data.labels.numpy()
    return SplitResult(
        loss=float(loss_sum) / len(data),
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
