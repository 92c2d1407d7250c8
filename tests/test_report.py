"""The report's tables from the tables the stages and commands write: this run beside the
reference result, the spread over training seeds (metrics/seeds.csv), the sweep
(metrics/sweep.csv); and the words around them, which name the commands that fill them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashionnet import report
from fashionnet.data import CLASSES
from fashionnet.errors import DataError
from pipeline import paths
from pipeline.report import read_demo, read_seeds, read_sweep
from pipeline.report_text import render_markdown, seed_spread_markdown, sweep_markdown
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
                                     "**mean ± std, 3 seeds**", "the reference's single run"]
    test = frame["test_accuracy"].to_numpy() * 100
    expected = f"**{test.mean():.2f} ± {np.std(test, ddof=1):.2f}%**"
    assert table.loc[3, "test"] == expected == "**91.57 ± 0.34%**"
    assert table.loc[0, "validation"] == "92.60%"
    assert table.loc[3, "training time"] == "11.8 min"
    assert table.loc[4, "test"] == "90.30%"


def test_spread_section_flags_another_recipe_and_says_when_there_is_none():
    frame = seeds_frame(epochs=[60, 60, 1], limit=[0, 0, 3000])
    text = seed_spread_markdown(frame, {"epochs": 60, "limit": 0})
    assert "1 of these runs used another recipe" in text
    assert "seed 2: epochs 1, limit 3000" in text
    assert "another recipe" not in seed_spread_markdown(seeds_frame(),
                                                               {"epochs": 60, "limit": 0})
    assert "`fashionnet seeds`" in seed_spread_markdown(None)


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
    assert "`fashionnet sweep" in sweep_markdown(None)


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


DEMO_CSV = """version,outcome,experiment,batches,train_images,val_accuracy,test_accuracy,\
incoming_accuracy,drift_accuracy
v0.0.1,promoted,demo-subset,0,12000,0.88,0.875,,
-,refused,demo-batch-1,1,21450,0.879,0.88,0.9,0.87
v0.0.2,promoted,demo-batch-2,2,30900,0.9,0.895,0.91,0.89
"""


def test_read_demo_keeps_the_figures_that_do_not_exist_empty_and_refuses_others(
        tmp_path: Path):
    path = tmp_path / "versions.csv"
    assert read_demo(path) is None  # the demonstration has not run
    path.write_text(DEMO_CSV.splitlines()[0] + "\n")
    assert read_demo(path) is None  # its header only: a project that has not run it
    path.write_text(DEMO_CSV)
    demo = read_demo(path)
    assert demo["version"].tolist() == ["v0.0.1", "-", "v0.0.2"]
    table = report.demo_table(demo)
    assert table.iloc[0].tolist() == ["v0.0.1", "promoted", 0, "12,000", "88.00%", "87.50%",
                                      "-", "-"]
    assert table.iloc[1]["gate"] == "refused" and table.iloc[1]["incoming hold-out"] == "90.00%"
    text = render_markdown(*minimal_run(), demo=demo, val_images=6000)
    assert "trained on 12,000 official training images, then retrained after each of 2 " in text
    path.write_text(DEMO_CSV.replace("0.9,0.87", "high,0.87"))
    with pytest.raises(DataError, match="column incoming_accuracy holds a value that is not"):
        read_demo(path)
    path.write_text(DEMO_CSV.replace("0.88,0.875", ",0.875"))  # the gate's figure is required
    with pytest.raises(DataError, match="column val_accuracy"):
        read_demo(path)


def test_accuracy_and_per_class_tables_put_the_reference_result_beside_the_run():
    accuracy = pd.DataFrame({"split": ["train", "val", "test"],
                             "accuracy": [0.9511, 0.9255, 0.9165],
                             "loss": [0.1428, 0.2059, 0.2357]})
    table = report.accuracy_table(accuracy)
    assert table.columns.tolist() == ["split", "accuracy", "reference accuracy", "difference",
                                      "loss"]
    assert table.loc[2].tolist() == ["test", "91.65%", "90.30%", "+1.35 pts", "0.2357"]
    assert table.loc[1].tolist() == ["val", "92.55%", "89.35%", "+3.20 pts", "0.2059"]
    per_class = pd.DataFrame({"class": [*CLASSES, "macro avg"], "precision": [0.78] * 11,
                              "recall": [0.72] * 11, "f1-score": [0.75] * 11,
                              "support": [1000] * 10 + [10000]})
    rows = report.per_class_table(per_class).set_index("class")
    assert rows.index.tolist() == list(CLASSES)  # the averages have no reference figure
    assert rows.loc["Shirt"].tolist() == ["0.78 (0.76)", "0.72 (0.70)", "0.75 (0.73)",
                                          "1000 (406)"]


def minimal_run() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str], dict[str, str]]:
    """render_markdown's first arguments: accuracies, per-class metrics, figures, run."""
    accuracy = pd.DataFrame({"split": ["train", "val", "test"],
                             "accuracy": [0.95, 0.92, 0.91], "loss": [0.1, 0.2, 0.3]})
    per_class = pd.DataFrame({"class": CLASSES, "precision": [0.9] * 10, "recall": [0.9] * 10,
                              "f1-score": [0.9] * 10, "support": [1000] * 10})
    return accuracy, per_class, {"Learning curves": "curves.png"}, {"data": "Fashion-MNIST"}


def test_report_sections_and_their_words_name_the_reference_not_the_seed():
    text = render_markdown(*minimal_run(), seeds_frame(), {"epochs": 60, "limit": 0},
                           sweep_frame(), val_images=6000)
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        "# FashionNet report", "## What was run", "## Accuracy", "## Per-class test metrics",
        "## Spread over training seeds", "## Sweep", "## New data, version by version",
        "## Why these figures differ from the reference's", "## Figures"]
    assert "seed's" not in text and "the reference's single run" in text
    assert "The retraining demonstration has not run here" in text
    assert "sampling error alone is ±0.45 points on 4,000 images and ±0.29 on 10,000" in text
    assert "![Learning curves](curves.png)" in text
