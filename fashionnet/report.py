"""The report: learning curves, confusion matrix and tables beside the seed's figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
from sklearn.metrics import confusion_matrix

from fashionnet.data import CLASSES
from fashionnet.errors import DataError
from fashionnet.files import atomic_path

# The seed's published single run (SEED.md). Its per-class support sums to 4,000 images.
SEED_ACCURACY: dict[str, float] = {"train": 0.9222, "val": 0.8935, "test": 0.9030}
SEED_PER_CLASS = pd.DataFrame(
    [
        ("T-shirt/top", 0.87, 0.87, 0.87, 408),
        ("Trouser", 0.99, 0.97, 0.98, 395),
        ("Pullover", 0.86, 0.87, 0.87, 383),
        ("Dress", 0.91, 0.92, 0.91, 386),
        ("Coat", 0.84, 0.88, 0.86, 402),
        ("Sandal", 0.98, 0.96, 0.97, 408),
        ("Shirt", 0.76, 0.70, 0.73, 406),
        ("Sneaker", 0.92, 0.94, 0.93, 389),
        ("Bag", 0.98, 0.98, 0.98, 391),
        ("Ankle boot", 0.94, 0.93, 0.94, 432),
    ],
    columns=["class", "precision", "recall", "f1-score", "support"],
)


def read_table(path: str | os.PathLike[str], columns: Sequence[str],
               text: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV an earlier stage wrote, refused (DataError naming it) unless it has ``columns``
    and rows, with finite numbers in every column but those named in ``text``."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(path, "file not found (run the stages before this one)") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError, bad bytes
        raise DataError(path, f"not a readable CSV file ({type(e).__name__})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, f"lacks the column(s) {', '.join(missing)}")
    if frame.empty:
        raise DataError(path, "has no rows")
    for column in columns:
        values = frame[column]
        if column in text:
            bad = values.isna().any()
        else:
            numbers = pd.to_numeric(values, errors="coerce")
            bad = not np.isfinite(numbers.to_numpy(dtype=float)).all()
        if bad:
            what = "empty cells" if column in text else "a value that is not a finite number"
            raise DataError(path, f"column {column} holds {what}")
    return frame


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


def _table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def accuracy_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and loss per split (metrics/accuracy.csv) beside the seed's accuracy."""
    rows = []
    for row in accuracy.itertuples(index=False):
        seed = SEED_ACCURACY[row.split]
        rows.append({"split": row.split, "accuracy": f"{row.accuracy:.2%}",
                     "seed accuracy": f"{seed:.2%}",
                     "difference": f"{(row.accuracy - seed) * 100:+.2f} pts",
                     "loss": f"{row.loss:.4f}"})
    return pd.DataFrame(rows)


def per_class_table(report: pd.DataFrame) -> pd.DataFrame:
    """Per-class precision/recall/f1 (metrics/classification_report.csv) beside the seed's."""
    seed = SEED_PER_CLASS.set_index("class")
    rows = []
    for row in report[report["class"].isin(CLASSES)].to_dict("records"):
        s = seed.loc[row["class"]]
        rows.append({
            "class": row["class"],
            "precision": f"{row['precision']:.2f} ({s['precision']:.2f})",
            "recall": f"{row['recall']:.2f} ({s['recall']:.2f})",
            "f1-score": f"{row['f1-score']:.2f} ({s['f1-score']:.2f})",
            "support": f"{int(row['support'])} ({int(s['support'])})",
        })
    return pd.DataFrame(rows)


def render_markdown(accuracy: pd.DataFrame, report: pd.DataFrame,
                    figures: Mapping[str, str], run: Mapping[str, str]) -> str:
    """The report's markdown: what was run, the two tables, the figures (relative paths)."""
    run_lines = "\n".join(f"- **{key}**: {value}" for key, value in run.items())
    figure_lines = "\n\n".join(f"![{title}]({src})" for title, src in figures.items())
    return f"""# FashionNet report

## What was run
{run_lines}

## Accuracy
Measured after training, in eval mode, over each whole split; the seed's single run beside it.

{_table(accuracy_table(accuracy))}

## Per-class test metrics
Each cell: this run (the seed's figure). The seed's support sums to 4,000 test images;
this project tests on the official 10,000-image test set, 1,000 per class.

{_table(per_class_table(report))}

## Figures
{figure_lines}
"""
