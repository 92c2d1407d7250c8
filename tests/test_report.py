"""The report's tables from the tables the commands write: the spread over training seeds
(metrics/seeds.csv), the sweep (metrics/sweep.csv) and the named recipe's comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashionnet import report
from fashionnet.data import CLASSES
from fashionnet.errors import DataError
from pipeline import paths
from pipeline.report import read_seeds, read_sweep
from pipeline.seeds import COLUMNS
from pipeline.sweep import METRIC_COLUMNS
from tests.helpers import REPO


def seeds_frame(**columns: list) -> pd.DataFrame:
    base = {"seed": [42, 1, 2], "experiment": ["seed-42", "seed-1", "seed-2"],
            "train_accuracy": [0.95, 0.951, 0.949], "val_accuracy": [0.926, 0.921, 0.93],
            "test_accuracy": [0.9164, 0.9121, 0.9187], "train_seconds": [700.0, 720.0, 710.0],
            "epochs": [60] * 3, "limit": [0] * 3, "device": ["cpu"] * 3,
            "precision": ["bfloat16"] * 3, "threads": [1] * 3}
    return pd.DataFrame({**base, **columns}, columns=COLUMNS)


def test_spread_table_mean_and_sample_std():
    frame = seeds_frame()
    table = report.seed_spread_table(frame)
    assert table["run"].tolist() == ["train.seed 42", "train.seed 1", "train.seed 2",
                                     "**mean ± std, 3 seeds**", "the seed's single run"]
    test = frame["test_accuracy"].to_numpy() * 100
    expected = f"**{test.mean():.2f} ± {np.std(test, ddof=1):.2f}%**"
    assert table.loc[3, "test"] == expected == "**91.57 ± 0.34%**"
    assert table.loc[0, "validation"] == "92.60%"
    assert table.loc[3, "training time"] == "11.8 min"
    assert table.loc[4, "test"] == "90.30%"


def test_spread_section_flags_another_recipe_and_says_when_there_is_none():
    frame = seeds_frame(epochs=[60, 60, 1], limit=[0, 0, 3000])
    text = report.seed_spread_markdown(frame, {"epochs": 60, "limit": 0})
    assert "1 of these runs used another recipe" in text
    assert "seed 2: epochs 1, limit 3000" in text
    assert "another recipe" not in report.seed_spread_markdown(seeds_frame(),
                                                               {"epochs": 60, "limit": 0})
    assert "`fashionnet seeds`" in report.seed_spread_markdown(None)


def test_read_seeds(tmp_path: Path):
    path = tmp_path / "seeds.csv"
    assert read_seeds(path) is None  # missing: nothing recorded yet
    path.write_text(",".join(COLUMNS) + "\n")
    assert read_seeds(path) is None  # the committed header-only file
    seeds_frame().to_csv(path, index=False)
    assert read_seeds(path)["seed"].tolist() == [42, 1, 2]
    seeds_frame(test_accuracy=[0.9, "n/a", 0.9]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"seeds\.csv.*test_accuracy"):
        read_seeds(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"seeds\.csv"):
        read_seeds(path)


def sweep_frame() -> pd.DataFrame:
    return pd.DataFrame({"experiment": ["lr-0.001", "lr-0.003"], "train.lr": [0.001, 0.003],
                         "train_accuracy": [0.95, 0.96], "val_accuracy": [0.92, 0.93],
                         "test_accuracy": [0.91, 0.905], "test_loss": [0.25, 0.27],
                         "train_seconds": [700.0, 90.0], "device": ["cpu", "cuda"]})


def test_report_marks_the_best_validation_accuracy_not_the_best_test():
    table = report.sweep_table(sweep_frame())
    assert table.columns.tolist() == ["experiment", "train.lr", "train", "validation", "test",
                                      "training time"]
    assert table["validation"].tolist() == ["92.00%", "**93.00%**"]
    assert table["test"].tolist() == ["91.00%", "90.50%"]  # the better test score is not chosen
    assert table["training time"].tolist() == ["11.7 min (cpu)", "90 s (cuda)"]
    assert "`fashionnet sweep" in report.sweep_markdown(None)


def test_read_sweep(tmp_path: Path):
    assert ["experiment", *METRIC_COLUMNS] == report.SWEEP_COLUMNS  # what the sweep writes
    path = tmp_path / "sweep.csv"
    assert read_sweep(path) is None
    path.write_text((REPO / paths.SWEEP).read_text())  # the committed header-only file
    assert read_sweep(path) is None
    sweep_frame().to_csv(path, index=False)
    assert read_sweep(path)["train.lr"].tolist() == [0.001, 0.003]
    sweep_frame().drop(columns="val_accuracy").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"sweep\.csv.*val_accuracy"):
        read_sweep(path)


def test_report_compares_the_seed_recipe_with_the_named_one():
    from fashionnet import report
    from pipeline.seeds import COLUMNS

    def runs(val: list[float], test: list[float], epochs: int) -> pd.DataFrame:
        n = len(val)
        return pd.DataFrame({"seed": range(n), "experiment": ["x"] * n,
                             "train_accuracy": [0.95] * n, "val_accuracy": val,
                             "test_accuracy": test, "train_seconds": [600.0] * n,
                             "epochs": [epochs] * n, "limit": [0] * n, "device": ["cpu"] * n,
                             "precision": ["bfloat16"] * n, "threads": [1] * n},
                            columns=COLUMNS)

    seed_runs = runs([0.926, 0.928], [0.918, 0.920], 60)
    plus_runs = runs([0.93, 0.932, 0.931], [0.925, 0.927, 0.926], 15)
    recall = pd.DataFrame([{"seed": s, "experiment": "x", **{c: 0.9 for c in CLASSES}}
                           for s in range(3)])
    recall.loc[0, "Shirt"] = 0.8
    per_class = pd.DataFrame({"class": list(CLASSES), "recall": [0.85] * len(CLASSES)})
    text = report.recipe_comparison_markdown("plus", {"train.flip": "random"}, seed_runs,
                                             plus_runs, recall, per_class)
    assert "| seed recipe | 2 | 60 | 92.70 ± 0.14% | 91.90 ± 0.14% | 10.0 min |" in text
    assert "| named recipe `plus` | 3 | 15 | 93.10 ± 0.10% | 92.60 ± 0.10% | 10.0 min |" in text
    assert "| Shirt | 0.850 | 0.867 ± 0.058 | +0.017 |" in text
    assert "`train.flip: random`" in text
    empty = report.recipe_comparison_markdown("plus", None, seed_runs, None, None, per_class)
    assert "fashionnet seeds --recipe recipes/plus.yaml" in empty
