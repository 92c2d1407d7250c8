"""The report's tables, from the CSV files the stages and commands write: this run beside the
reference result, the spread over training seeds, the last sweep; as markdown."""

from __future__ import annotations

import pandas as pd

from fashionnet.data import CLASSES
from fashionnet.reference import REFERENCE_ACCURACY, REFERENCE_PER_CLASS

# The columns the tables need of metrics/seeds.csv (one row per training seed) and of
# metrics/sweep.csv (one row per grid point, and one more column per swept param).
SEED_COLUMNS = ["seed", "train_accuracy", "val_accuracy", "test_accuracy", "train_seconds",
                "epochs", "limit"]
SWEEP_COLUMNS = ["experiment", "train_accuracy", "val_accuracy", "test_accuracy", "test_loss",
                 "train_seconds", "device"]
_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def duration(seconds: float) -> str:
    """``seconds`` as the report writes a time: seconds up to two minutes, then minutes."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def accuracy_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and loss per split (metrics/accuracy.csv) beside the reference's accuracy; the
    incoming batches' held-out images, which the reference never saw, with none beside them."""
    rows = []
    for row in accuracy.itertuples(index=False):
        reference = REFERENCE_ACCURACY.get(row.split)
        rows.append({"split": "incoming (held out)" if row.split == "incoming" else row.split,
                     "accuracy": f"{row.accuracy:.2%}",
                     "reference accuracy": "-" if reference is None else f"{reference:.2%}",
                     "difference": "-" if reference is None
                     else f"{(row.accuracy - reference) * 100:+.2f} pts",
                     "loss": f"{row.loss:.4f}"})
    return pd.DataFrame(rows)


def per_class_table(report: pd.DataFrame) -> pd.DataFrame:
    """Per-class precision/recall/f1 (metrics/classification_report.csv), each cell followed
    by the reference's figure in brackets."""
    reference = REFERENCE_PER_CLASS.set_index("class")
    rows = []
    for row in report[report["class"].isin(CLASSES)].to_dict("records"):
        ref = reference.loc[row["class"]]
        rows.append({
            "class": row["class"],
            "precision": f"{row['precision']:.2f} ({ref['precision']:.2f})",
            "recall": f"{row['recall']:.2f} ({ref['recall']:.2f})",
            "f1-score": f"{row['f1-score']:.2f} ({ref['f1-score']:.2f})",
            "support": f"{int(row['support'])} ({int(ref['support'])})",
        })
    return pd.DataFrame(rows)


def seed_spread_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per training seed (metrics/seeds.csv), then mean ± standard deviation (n - 1)
    over them, then the reference's single run."""
    rows = []
    for row in seeds.to_dict("records"):
        rows.append({"run": f"train.seed {int(row['seed'])}",
                     **{name: f"{row[f'{split}_accuracy']:.2%}"
                        for split, name in _SPLIT_NAMES.items()},
                     "training time": duration(row["train_seconds"])})
    n = len(seeds)
    spread = {}
    for split, name in _SPLIT_NAMES.items():
        values = seeds[f"{split}_accuracy"] * 100
        std = values.std(ddof=1) if n > 1 else float("nan")
        spread[name] = f"**{values.mean():.2f} ± {std:.2f}%**"
    rows.append({"run": f"**mean ± std, {n} seeds**", **spread,
                 "training time": duration(seeds["train_seconds"].mean())})
    rows.append({"run": "the reference's single run",
                 **{name: f"{REFERENCE_ACCURACY[split]:.2%}"
                    for split, name in _SPLIT_NAMES.items()},
                 "training time": "-"})
    return pd.DataFrame(rows)


DEMO_COLUMNS = ["version", "outcome", "experiment", "batches", "train_images", "val_accuracy",
                "test_accuracy", "incoming_accuracy", "drift_accuracy"]


def demo_table(demo: pd.DataFrame) -> pd.DataFrame:
    """One row per retrain of the retraining demonstration: the version it was registered as
    (or its refusal), what it trained on, and its accuracies; '-' where a figure does not
    exist (no hold-out before the first batch, no drift without new images)."""
    def percent(value: float) -> str:
        return "-" if pd.isna(value) else f"{value:.2%}"

    return pd.DataFrame([{
        "version": row["version"], "gate": row["outcome"], "batches": int(row["batches"]),
        "training images": f"{int(row['train_images']):,}",
        "validation (decides)": percent(row["val_accuracy"]),
        "test": percent(row["test_accuracy"]),
        "incoming hold-out": percent(row["incoming_accuracy"]),
        "drift (HEAD's model on the new batch)": percent(row["drift_accuracy"]),
    } for row in demo.to_dict("records")])


def sweep_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point (metrics/sweep.csv): its params, accuracies and training time;
    the best validation accuracy in bold, since the validation set is what chooses."""
    params = [c for c in sweep.columns if c not in SWEEP_COLUMNS]
    best = sweep["val_accuracy"].max()
    rows = []
    for row in sweep.to_dict("records"):
        mark = "**" if row["val_accuracy"] == best else ""
        rows.append({"experiment": f"`{row['experiment']}`",
                     **{key: str(row[key]) for key in params},
                     **{name: f"{row[f'{split}_accuracy']:.2%}"
                        for split, name in _SPLIT_NAMES.items()},
                     "training time": f"{duration(row['train_seconds'])} ({row['device']})"})
        rows[-1]["validation"] = f"{mark}{rows[-1]['validation']}{mark}"
    return pd.DataFrame(rows)
