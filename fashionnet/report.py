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
               text: Sequence[str] = (), allow_empty: bool = False) -> pd.DataFrame:
    """A CSV an earlier stage wrote, refused (DataError naming it) unless it has ``columns``
    and rows (or only its header, with ``allow_empty``), with finite numbers in every column
    but those named in ``text``."""
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
    if frame.empty and not allow_empty:
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


SEED_COLUMNS = ["seed", "train_accuracy", "val_accuracy", "test_accuracy", "train_seconds",
                "epochs", "limit"]
_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def seed_spread_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per training seed (metrics/seeds.csv), then mean ± standard deviation (n - 1)
    over them, then the seed's single run."""
    rows = []
    for row in seeds.to_dict("records"):
        rows.append({"run": f"train.seed {int(row['seed'])}",
                     **{name: f"{row[f'{split}_accuracy']:.2%}"
                        for split, name in _SPLIT_NAMES.items()},
                     "training time": _duration(row["train_seconds"])})
    n = len(seeds)
    spread = {}
    for split, name in _SPLIT_NAMES.items():
        values = seeds[f"{split}_accuracy"] * 100
        std = values.std(ddof=1) if n > 1 else float("nan")
        spread[name] = f"**{values.mean():.2f} ± {std:.2f}%**"
    rows.append({"run": f"**mean ± std, {n} seeds**", **spread,
                 "training time": _duration(seeds["train_seconds"].mean())})
    rows.append({"run": "the seed's single run",
                 **{name: f"{SEED_ACCURACY[split]:.2%}" for split, name in _SPLIT_NAMES.items()},
                 "training time": "-"})
    return pd.DataFrame(rows)


def seed_spread_markdown(seeds: pd.DataFrame | None,
                         recipe: Mapping[str, int] | None = None) -> str:
    """The report's section on the spread over training seeds; ``recipe`` holds the epochs
    and limit of the run this report is about, to flag seeds run with another recipe."""
    if seeds is None or seeds.empty:
        return ("No spread over training seeds is recorded (metrics/seeds.csv has no rows): "
                "`fashionnet seeds` runs the recipe once per seed and records it.")
    text = ("The recipe above, run once per `train.seed` as DVC experiments `seed-N` "
            "(`fashionnet seeds`, see `dvc exp show`); the split and everything else are the "
            "same. Standard deviation over runs, n - 1.\n\n" + _table(seed_spread_table(seeds)))
    if recipe is None:
        return text
    other = seeds[(seeds["epochs"] != recipe["epochs"]) | (seeds["limit"] != recipe["limit"])]
    if not other.empty:
        text += (f"\n\n**Note**: {len(other)} of these runs used another recipe than this "
                 f"report's run (epochs {recipe['epochs']}, limit {recipe['limit']}): "
                 + ", ".join(f"seed {int(r.seed)}: epochs {int(r.epochs)}, limit {int(r.limit)}"
                             for r in other.itertuples()) + ".")
    return text


SWEEP_COLUMNS = ["experiment", "train_accuracy", "val_accuracy", "test_accuracy", "test_loss",
                 "train_seconds", "device"]


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
                     "training time": f"{_duration(row['train_seconds'])} ({row['device']})"})
        rows[-1]["validation"] = f"{mark}{rows[-1]['validation']}{mark}"
    return pd.DataFrame(rows)


def sweep_markdown(sweep: pd.DataFrame | None) -> str:
    """The report's section on the last sweep (metrics/sweep.csv)."""
    if sweep is None or sweep.empty:
        return ("No sweep is recorded (metrics/sweep.csv has no rows): `fashionnet sweep -S "
                "KEY=V1,V2` runs a grid of params as DVC experiments and records it.")
    return ("The last `fashionnet sweep`, one DVC experiment per grid point (`dvc exp show`, "
            "`dvc exp apply NAME`); the best validation accuracy in bold. The test column only "
            "reports.\n\n" + _table(sweep_table(sweep)))


def _mean_std(values: pd.Series) -> str:
    """Percentages as mean ± standard deviation (n - 1); a single run has no spread."""
    values = values * 100
    return (f"{values.mean():.2f} ± {values.std(ddof=1):.2f}%" if len(values) > 1
            else f"{values.mean():.2f}% (one run)")


def recipe_comparison_table(seed_runs: pd.DataFrame, recipe_runs: pd.DataFrame,
                            name: str) -> pd.DataFrame:
    """The seed recipe's runs (metrics/seeds.csv) and the named recipe's (metrics/seeds-NAME.csv)
    side by side: mean ± std of validation and test accuracy, mean training time per run."""
    rows = []
    for label, runs in (("seed recipe", seed_runs), (f"named recipe `{name}`", recipe_runs)):
        epochs = sorted({int(e) for e in runs["epochs"]})
        rows.append({"recipe": label, "seeds": len(runs),
                     "epochs": ", ".join(map(str, epochs)),
                     "validation": _mean_std(runs["val_accuracy"]),
                     "test": _mean_std(runs["test_accuracy"]),
                     "training time per run": _duration(runs["train_seconds"].mean())})
    return pd.DataFrame(rows)


def recall_comparison_table(seed_report: pd.DataFrame, recipe_recall: pd.DataFrame,
                            name: str) -> pd.DataFrame:
    """Test recall per class: this report's run of the seed recipe (its
    classification_report.csv) beside the named recipe's mean ± std over its seeds."""
    seed = seed_report.set_index("class")["recall"]
    rows = []
    for cls in CLASSES:
        recall = recipe_recall[cls]
        rows.append({"class": cls, "seed recipe, this report's run": f"{seed[cls]:.3f}",
                     f"`{name}`, mean ± std": (f"{recall.mean():.3f} ± {recall.std(ddof=1):.3f}"
                                               if len(recall) > 1 else f"{recall.mean():.3f}"),
                     "difference": f"{recall.mean() - seed[cls]:+.3f}"})
    return pd.DataFrame(rows)


def recipe_comparison_markdown(name: str, overrides: Mapping[str, object] | None,
                               seed_runs: pd.DataFrame | None,
                               recipe_runs: pd.DataFrame | None,
                               recipe_recall: pd.DataFrame | None,
                               seed_report: pd.DataFrame) -> str:
    """The report's section on the seed recipe against the named recipe ``name``."""
    how = (f"`fashionnet seeds --recipe recipes/{name}.yaml` runs it once per seed as DVC "
           f"experiments `{name}-seed-N` and records them in metrics/seeds-{name}.csv.")
    if recipe_runs is None or recipe_runs.empty:
        return f"No run of the named recipe `{name}` is recorded yet: {how}"
    changes = ", ".join(f"`{k}: {str(v).lower() if isinstance(v, bool) else v}`"
                        for k, v in (overrides or {}).items()) or "(unknown)"
    text = (f"The same network (139,754 parameters, dropout 0.5) trained with the named recipe "
            f"`{name}`, chosen on validation accuracy alone (docs/recipe.md): {changes}. "
            f"{how} Standard deviation over runs, n - 1. Training time is each run's wall "
            f"clock, longer where runs shared the machine (`fashionnet seeds --jobs`).\n\n")
    if seed_runs is None or seed_runs.empty:
        text += "(metrics/seeds.csv has no runs of the seed recipe to compare with.)\n\n"
        seed_runs = recipe_runs.iloc[0:0]
    text += _table(recipe_comparison_table(seed_runs, recipe_runs, name).loc[
        lambda t: t["seeds"] > 0])
    if recipe_recall is not None and not recipe_recall.empty:
        text += ("\n\nTest recall per class.\n\n"
                 + _table(recall_comparison_table(seed_report, recipe_recall, name)))
    return text


def differences_markdown(accuracy: Mapping[str, float], test_images: int,
                         val_images: int) -> str:
    """Why this project's figures and the seed's cannot match exactly. One line per paragraph:
    the Prefect UI renders each newline inside a paragraph as a line break."""
    seed_images = int(SEED_PER_CLASS["support"].sum())
    test = accuracy["test"]

    def stderr(n: int) -> float:  # binomial standard error of an accuracy on n images
        return (test * (1 - test) / n) ** 0.5 * 100

    seed_per_class = round(seed_images / len(CLASSES), -2)
    items = [
        f"**Test set.** The seed's per-class support sums to {seed_images:,} images, about "
        f"{seed_per_class:,.0f} a class: its test set was a {seed_images:,}-image subset (or a "
        f"split) of unknown selection. This project tests on the official {test_images:,}-image "
        f"test set, {test_images // len(CLASSES):,} a class. At this accuracy, the sampling error "
        f"alone is ±{stderr(seed_images):.2f} points on {seed_images:,} images and "
        f"±{stderr(test_images):.2f} on {test_images:,} (one standard error), so per-class "
        f"figures, from about {seed_per_class:,.0f} images each in the seed, can differ by a few "
        "hundredths from sampling alone.",
        "**Train and validation accuracy.** Here both are measured after training, in eval "
        "mode (BatchNorm running statistics, no dropout), over the whole split: "
        f"{accuracy['train']:.2%} train and {accuracy['val']:.2%} validation here, "
        f"{SEED_ACCURACY['train']:.2%} and {SEED_ACCURACY['val']:.2%} in the seed. The seed "
        "does not say how it measured them, nor how large its validation split was or how it "
        "was drawn. A train accuracy averaged over an epoch while training, with dropout "
        "active, comes out lower than an eval-mode one; this project's validation split is "
        f"{val_images:,} images, stratified, from the official training set.",
        "**Run to run.** Training is seeded and repeatable on one machine, but the spread over "
        "training seeds (above) is the yardstick for comparing one run with another: "
        "differences within about two standard deviations are noise, not an effect of the "
        "code.",
        "**Precision.** On CPUs with native bfloat16 (and on CUDA) the convolutions compute in "
        "bfloat16 (`train.precision: auto`, see *What was run*); `train.precision: float32` "
        "reproduces the seed's float32 arithmetic, more slowly.",
    ]
    return "\n".join(f"- {item}" for item in items)


def render_markdown(accuracy: pd.DataFrame, report: pd.DataFrame,
                    figures: Mapping[str, str], run: Mapping[str, str],
                    seeds: pd.DataFrame | None = None,
                    recipe: Mapping[str, int] | None = None,
                    sweep: pd.DataFrame | None = None, comparison: str | None = None, *,
                    val_images: int) -> str:
    """The report's markdown: what was run, the accuracy and per-class tables, the spread
    over training seeds (``seeds``, metrics/seeds.csv; ``recipe``: this run's epochs and
    limit), the seed recipe against the named one (``comparison``, from
    :func:`recipe_comparison_markdown`), the last sweep (``sweep``, metrics/sweep.csv), why the
    figures differ from the seed's (``val_images``: the validation split's size), the figures
    (``figures``: title -> image URL, a relative path or a data: URI)."""
    run_lines = "\n".join(f"- **{key}**: {value}" for key, value in run.items())
    figure_lines = "\n\n".join(f"![{title}]({src})" for title, src in figures.items())
    by_split = accuracy.set_index("split")["accuracy"].to_dict()
    test_images = int(report[report["class"].isin(CLASSES)]["support"].sum())
    seed_images = int(SEED_PER_CLASS["support"].sum())
    comparison_section = ("" if comparison is None
                          else f"\n## Seed recipe vs named recipe\n{comparison}\n")
    return f"""# FashionNet report

## What was run
{run_lines}

## Accuracy
Measured after training, in eval mode, over each whole split; the seed's single run beside it.

{_table(accuracy_table(accuracy))}

## Per-class test metrics
Each cell: this run (the seed's figure). The seed's support sums to {seed_images:,} test \
images; this project tests on the official {test_images:,}-image test set, \
{test_images // len(CLASSES):,} per class.

{_table(per_class_table(report))}

## Spread over training seeds
{seed_spread_markdown(seeds, recipe)}
{comparison_section}

## Sweep
{sweep_markdown(sweep)}

## Why these figures differ from the seed's
{differences_markdown(by_split, test_images, val_images)}

## Figures
{figure_lines}
"""
