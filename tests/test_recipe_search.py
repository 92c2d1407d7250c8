"""research/: the recipe search chooses on validation accuracy alone, among the configurations
that finished every seed, and reads the test set for the chosen recipe and the reference recipe
only; a run past the deadline is stopped and left out; the scripts run without Prefect; the
recipe comparison of docs/recipe.md is what compare_recipes.py prints from the committed runs."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fashionnet.data import CLASSES, save_split
from fashionnet.split import SplitConfig, stratified_split
from pipeline import paths
from tests.helpers import REPO, ok

sys.path.insert(0, str(REPO / "research"))

import compare_recipes
import recipe_search

COLUMNS = ["name", "seed", "weights", "bn", "tta", "val_accuracy"]


def write_ablation(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def test_choice_is_the_best_mean_validation_among_configurations_with_every_seed(tmp_path):
    grid = {"reference": {}, "a": {}, "b": {}}
    path = write_ablation(tmp_path / "ablation.csv", [
        ("reference-s1", 1, "online", "trained", False, 0.910),
        ("reference-s2", 2, "online", "trained", False, 0.912),
        ("a-s1", 1, "online", "trained", False, 0.905),
        ("a-s1", 1, "ema", "recalibrated", True, 0.930),
        ("a-s2", 2, "online", "trained", False, 0.915),
        ("a-s2", 2, "ema", "recalibrated", True, 0.920),  # mean 0.925: the best complete one
        ("b-s1", 1, "online", "trained", False, 0.990),  # best of all, but seed 2 never ended
    ])
    assert recipe_search.choose(path, grid, [1, 2]) == pytest.approx(
        ("a", "ema", "recalibrated", True, 0.925))
    # A configuration not in the grid (a run of an earlier search in the same file) is ignored.
    assert recipe_search.choose(path, {"reference": {}}, [1, 2])[0] == "reference"
    assert recipe_search.choose(path, grid, [1, 2, 3]) is None  # none has seed 3


def test_overrides_become_ablation_arguments_read_back_as_yaml():
    args = recipe_search.overrides_args({"train.flip": "random-except-footwear", "train.ema": 0.999,
                                         "train.bn_recalibrate": True}, 3)
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[::2] == ["-S"] * 4
    assert {k: yaml.safe_load(v) for k, v in pairs.items()} == {
        "train.flip": "random-except-footwear", "train.ema": 0.999, "train.bn_recalibrate": True,
        "train.seed": 3}


def test_phase_two_runs_the_chosen_and_reference_recipes_seed_by_seed():
    grid = {"reference": {"train.ema": 0.9}, "cosine": {"train.schedule": "cosine"}}
    jobs = recipe_search.final_jobs("cosine", grid, [3, 4], ["--out", "a.csv"])
    assert [name for name, _ in jobs] == ["cosine-s3", "reference-s3", "cosine-s4",
                                          "reference-s4"]
    assert jobs[1][1] == ["-S", "train.ema=0.9", "-S", "train.seed=3", "--out", "a.csv"]
    only = recipe_search.final_jobs("reference", grid, [3], [])
    assert [name for name, _ in only] == ["reference-s3"]


def runs(seeds: list[int], val: list[float], test: list[float], epochs: int) -> pd.DataFrame:
    n = len(seeds)
    return pd.DataFrame({"seed": seeds, "val_accuracy": val, "test_accuracy": test,
                         "epochs": [epochs] * n})


def test_recipe_comparison_adds_the_reference_on_the_recipes_seeds():
    reference = runs([42, 1, 2], [0.926, 0.928, 0.930], [0.918, 0.920, 0.921], 60)
    recipes = {"plus": runs([1, 2], [0.93, 0.932], [0.925, 0.927], 60),
               "fast": runs([1, 2], [0.92, 0.921], [0.91, 0.912], 15)}
    table = compare_recipes.recipe_table(reference, recipes)
    assert table.values.tolist() == [
        ["reference recipe", "42, 1, 2", "60", "92.80 ± 0.20%", "91.97 ± 0.15%"],
        ["reference recipe, seeds 1, 2", "1, 2", "60", "92.90 ± 0.14%", "92.05 ± 0.07%"],
        ["`plus`", "1, 2", "60", "93.10 ± 0.14%", "92.60 ± 0.14%"],
        ["`fast`", "1, 2", "15", "92.05 ± 0.07%", "91.10 ± 0.14%"]]
    one = compare_recipes.recipe_table(reference.iloc[1:2], {"plus": recipes["plus"].iloc[:1]})
    assert one["test"].tolist() == ["92.00% (one run)", "92.50% (one run)"]

    recall = pd.DataFrame([{"seed": s, **dict.fromkeys(CLASSES, 0.9)} for s in range(3)])
    recall.loc[0, "Shirt"] = 0.8
    committed = pd.Series(0.85, index=list(CLASSES))
    rows = compare_recipes.recall_table(committed, "reference recipe, train.seed 42",
                                        {"plus": recall}).set_index("class")
    assert rows.loc["Shirt"].tolist() == ["0.850", "0.867 ± 0.058 (+0.017)"]


def test_docs_recipe_table_is_what_compare_recipes_prints_from_the_committed_runs(
        monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    compare_recipes.main([])
    printed = capsys.readouterr().out.splitlines()
    docs = (REPO / "docs" / "recipe.md").read_text().splitlines()
    for name in compare_recipes.RECIPES:
        [row] = [line for line in printed if line.startswith(f"| `{name}` | 1, 2, 3 |")]
        assert row in docs


@pytest.mark.slow
def test_search_tests_only_the_chosen_and_reference_recipes_without_prefect(tmp_path, raw_dir,
                                                                          official):
    work = work_dir(tmp_path, raw_dir)
    # A small split stage's output, which the runs read instead of splitting all 60,000 images.
    train_idx, val_idx = stratified_split(official[0].labels.numpy(),
                                          SplitConfig(val_size=500, limit=600, seed=42))
    test_idx = np.arange(1000)
    for name, data, index in (("train", official[0], train_idx), ("val", official[0], val_idx),
                              ("test", official[1], test_idx)):
        save_split(work / paths.PREPARED[name], data.subset(index), index)
    tiny = {"train.epochs": 1, "train.ema": 0.9}
    grid = {"cosine": {**tiny, "train.schedule": "cosine"}, "reference": tiny}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    # The GPU machine has no Prefect: neither the search nor its ablation runs may import it.
    blocker = tmp_path / "no-prefect" / "prefect"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the research scripts import "
                                         "Prefect')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    stdout = ok(work, env, sys.executable,
                REPO / "research" / "recipe_search.py", "--grid", tmp_path / "grid.yaml",
                "--out", out, "--seeds", "1", "--final-seeds", "--jobs", "2",
                "--budget", "600", "--solo-epochs", "1", timeout=600)
    assert stdout.index("start reference-s1") < stdout.index("start cosine-s1")
    assert pd.read_csv(out / "solo.csv")["epochs"].eq(1).all()

    ablation = pd.read_csv(out / "ablation.csv")
    phase1 = ablation[ablation["seed"] == 1].copy()
    phase1["config"] = phase1["name"].str.replace(r"-s\d+$", "", regex=True)
    means = phase1.groupby(["config", "weights", "bn", "tta"])["val_accuracy"].mean()
    best = means.idxmax()
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert (chosen["config"], chosen["weights"], chosen["bn"], chosen["tta"]) == best

    # No --final-seeds (phase 2: test_phase_two_runs_...): the test set for seed 1's models.
    final = pd.read_csv(out / "final.csv")
    expected = {(best[0], 1), ("reference", 1)}
    assert set(zip(final["config"], final["seed"], strict=True)) == expected
    assert final["test_accuracy"].between(0.1, 1).all()
    # Each test row carries the validation accuracy the choice saw for that run and variant.
    for row in final.itertuples():
        seen = ablation[(ablation["name"] == f"{row.config}-s{row.seed}")
                        & (ablation["weights"] == row.weights) & (ablation["bn"] == row.bn)
                        & (ablation["tta"] == row.tta)]["val_accuracy"]
        assert seen.tolist() == [pytest.approx(row.val_accuracy)]


def test_a_run_past_the_deadline_is_stopped_with_its_process_group(tmp_path, raw_dir,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(work_dir(tmp_path, raw_dir))
    started = []

    class Recording(recipe_search.Pool):
        def start(self, name: str, args: list[str]) -> None:
            super().start(name, args)
            started.append(self.running[name])

    pool = Recording(2, tmp_path)
    # An ablation run that could not end for hours, and a deadline 3 s after its start.
    pool.run([("endless-s1", ["-S", "train.epochs=100000", "-S", "split.limit=600",
                              "--out", str(tmp_path / "a.csv")])], time.monotonic() + 3)
    out = capsys.readouterr().out
    assert "stop  endless-s1 (deadline)" in out and "done  endless-s1" not in out
    # Ended by the deadline's SIGINT (or the SIGKILL that follows one ignored), not by itself.
    [proc] = started
    log = (tmp_path / "endless-s1.log").read_text()
    assert proc.returncode == -signal.SIGKILL or log.rstrip().endswith("KeyboardInterrupt"), log
    assert pool.running == {}
    assert not (tmp_path / "a.csv").exists()
    assert not any("endless-s1" in cmdline for cmdline in command_lines())


def work_dir(tmp_path: Path, raw_dir: Path) -> Path:
    """A working directory as a fresh clone has it after `fashionnet download`."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "raw").symlink_to(raw_dir)
    shutil.copy(REPO / "params.yaml", work)
    return work


def command_lines() -> list[str]:
    """Every running process's command line."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # ended while we looked
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines
