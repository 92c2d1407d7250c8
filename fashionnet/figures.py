"""The report's figures as PNG files: learning curves and the test confusion matrix."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
from sklearn.metrics import confusion_matrix

from fashionnet.data import CLASSES
from fashionnet.files import atomic_path


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_learning_curves(history: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Loss and accuracy per epoch, train and validation, from metrics/history.csv."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(history["epoch"], history[f"train_{metric}"], marker=".", label="train")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title("Cross-entropy loss")
    ax_acc.set_title("Accuracy")
    _save(fig, path)


def plot_confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                          path: str | os.PathLike[str]) -> None:
    """Test-set confusion matrix, counts, rows = actual class."""
    cm = confusion_matrix(labels, predictions, labels=list(range(len(CLASSES))))
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Test confusion matrix")
    threshold = cm.max() / 2
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                color="white" if cm[i, j] > threshold else "black")
    _save(fig, path)
