"""The named recipes against the reference recipe, on the test set: the tables of
docs/recipe.md, printed from the runs' tables.

    python research/compare_recipes.py        # from the repository root

The reference recipe's runs are `fashionnet seeds`' metrics/seeds.csv, and its per-class recall
is that of the committed run (metrics/classification_report.csv, one seed). A named recipe's
runs are what `fashionnet seeds 1 2 3 --recipe recipes/NAME.yaml` wrote to
metrics/seeds-NAME.csv and metrics/seeds-NAME-recall.csv, kept in research/results/. Mean ±
standard deviation over seeds, n - 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fashionnet.checked_csv import read_table
from fashionnet.data import CLASSES
from fashionnet.report import SEED_COLUMNS, markdown_table
from pipeline import paths
from pipeline.params import load_params

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("plus", "fast")  # recipes/NAME.yaml, in the order the tables list them


def mean_std(values: pd.Series, digits: int = 2, scale: float = 100, unit: str = "%") -> str:
    """Mean ± standard deviation (n - 1) of ``values`` times ``scale``; one run has no spread."""
    values = values * scale
    if len(values) == 1:
        return f"{values.mean():.{digits}f}{unit} (one run)"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}{unit}"


def recipe_table(reference: pd.DataFrame, recipes: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Validation and test accuracy of the reference recipe's runs, of the same runs on each
    named recipe's seeds where those differ, and of each named recipe's runs."""
    rows: list[tuple[str, pd.DataFrame]] = [("reference recipe", reference)]
    for runs in recipes.values():
        seeds = list(runs["seed"])
        same = reference[reference["seed"].isin(seeds)]
        label = "reference recipe, seeds " + ", ".join(map(str, seeds))
        if len(same) == len(seeds) < len(reference) and label not in dict(rows):
            rows.append((label, same))
    rows += [(f"`{name}`", runs) for name, runs in recipes.items()]
    return pd.DataFrame([
        {"recipe": label, "train.seed": ", ".join(str(int(s)) for s in runs["seed"]),
         "epochs": ", ".join(str(int(e)) for e in sorted(set(runs["epochs"]))),
         "validation": mean_std(runs["val_accuracy"]), "test": mean_std(runs["test_accuracy"])}
        for label, runs in rows])


def recall_table(reference: pd.Series, reference_label: str,
                 recalls: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Test recall per class: ``reference`` (class -> recall, one run) beside each named
    recipe's mean ± std over its seeds, with the mean's difference from the reference."""
    rows = []
    for cls in CLASSES:
        row = {"class": cls, reference_label: f"{reference[cls]:.3f}"}
        for name, recall in recalls.items():
            diff = recall[cls].mean() - reference[cls]
            row[f"`{name}`"] = f"{mean_std(recall[cls], 3, 1, '')} ({diff:+.3f})"
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where seeds-NAME.csv and seeds-NAME-recall.csv are")
    args = parser.parse_args(argv)
    reference = read_table(paths.SEEDS, SEED_COLUMNS)
    runs = {name: read_table(args.results / f"seeds-{name}.csv", SEED_COLUMNS)
            for name in RECIPES}
    recalls = {name: read_table(args.results / f"seeds-{name}-recall.csv", ["seed", *CLASSES])
               for name in RECIPES}
    committed = read_table(paths.CLASS_REPORT, ["class", "recall"], text=["class"])
    seed = load_params().train.seed  # the committed run's
    print(markdown_table(recipe_table(reference, runs)))
    print()
    print(markdown_table(recall_table(committed.set_index("class")["recall"],
                                      f"reference recipe, train.seed {seed}", recalls)))


if __name__ == "__main__":
    main()
