"""Evaluation: loss, accuracy, predictions and the per-class report."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import CLASSES, LabeledImages, to_input
from fashionnet.inference import InferenceNet
from fashionnet.model import FashionNet
from fashionnet.runtime import autocast, retain_freed_memory

EVAL_BATCH = 256  # images per forward pass: small batches stay in cache (fastest on CPU)


@dataclass(frozen=True)
class SplitResult:
    """Mean cross-entropy, accuracy (fraction) and per-image predictions on one split."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64 class indices


def evaluate(model: nn.Module, data: LabeledImages, device: torch.device | str = "cpu",
             batch_size: int = EVAL_BATCH, dtype: torch.dtype = torch.float32) -> SplitResult:
    """Evaluate ``model`` on the whole of ``data`` in eval mode (BatchNorm running stats,
    no dropout); the model's training mode is restored afterwards. A FashionNet runs as an
    :class:`InferenceNet` (BatchNorm folded, fused kernels) in ``dtype``; another module
    runs under autocast when ``dtype`` is bfloat16.

    On a CPU with several torch threads, batches run side by side, one thread each: a batch's
    activations then stay in one core's cache, which is about 1.2x the throughput of sharing
    every convolution between the cores. Each batch is computed the same way either way.
    """
    retain_freed_memory()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    forward = InferenceNet(model, dtype) if isinstance(model, FashionNet) else model

    def one_batch(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, predictions) of the batch at ``start``."""
        # inference_mode and autocast are per thread: set here, in the thread that runs it.
        with torch.inference_mode(), autocast(device, dtype):
            # uint8 crosses to the device, a quarter of the bytes; it is scaled there.
            x = to_input(data.images[start : start + batch_size].to(device))
            y = data.labels[start : start + batch_size].to(device)
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum").double()
            return loss, logits.argmax(1)

    starts = range(0, len(data), batch_size)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and threads > 1 and len(starts) > 1:
            torch.set_num_threads(1)  # inherited by the workers' threads
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="evaluate") as pool:
                    results = list(pool.map(one_batch, starts))  # in order
            finally:
                torch.set_num_threads(threads)
        else:
            results = [one_batch(start) for start in starts]
    finally:
        model.train(was_training)
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
