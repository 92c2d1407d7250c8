"""benchmarks/recipe_search.py: the choice is made on validation accuracy alone, among the
configurations that finished every seed, and the test set is read for the chosen recipe and
the seed's only; a run past the deadline is stopped and left out."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import recipe_search  # noqa: E402

COLUMNS = ["name", "seed", "weights", "bn", "tta", "val_accuracy"]


def write_ablation(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def test_choice_is_the_best_mean_validation_among_configurations_with_every_seed(tmp_path):
    grid = {"seed": {}, "a": {}, "b": {}}
    path = write_ablation(tmp_path / "ablation.csv", [
        ("seed-s1", 1, "online", "trained", False, 0.910),
        ("seed-s2", 2, "online", "trained", False, 0.912),
        ("a-s1", 1, "online", "trained", False, 0.905),
        ("a-s1", 1, "ema", "recalibrated", True, 0.930),
        ("a-s2", 2, "online", "trained", False, 0.915),
        ("a-s2", 2, "ema", "recalibrated", True, 0.920),  # mean 0.925: the best complete one
        ("b-s1", 1, "online", "trained", False, 0.990),  # best of all, but seed 2 never ended
    ])
    assert recipe_search.choose(path, grid, [1, 2]) == pytest.approx(
        ("a", "ema", "recalibrated", True, 0.925))
    # A configuration not in the grid (a run of an earlier search in the same file) is ignored.
    assert recipe_search.choose(path, {"seed": {}}, [1, 2])[0] == "seed"
    assert recipe_search.choose(path, grid, [1, 2, 3]) is None  # none has seed 3


def test_overrides_become_ablation_arguments_read_back_as_yaml():
    args = recipe_search.overrides_args({"train.flip": "random-except-footwear", "train.ema": 0.999,
                                         "train.bn_recalibrate": True}, 3)
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[::2] == ["-S"] * 4
    assert {k: yaml.safe_load(v) for k, v in pairs.items()} == {
        "train.flip": "random-except-footwear", "train.ema": 0.999, "train.bn_recalibrate": True,
        "train.seed": 3}


@pytest.mark.slow
def test_search_tests_only_the_chosen_and_seed_recipes(tmp_path, raw_dir):
    tiny = {"split.limit": 600, "train.epochs": 1, "train.ema": 0.9}
    grid = {"cosine": {**tiny, "train.schedule": "cosine"}, "seed": tiny}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    work = work_dir(tmp_path, raw_dir)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipe_search.py"), "--grid",
         str(tmp_path / "grid.yaml"), "--out", str(out), "--seeds", "1", "--final-seeds", "2",
         "--jobs", "2", "--budget", "600", "--solo-epochs", "1"],
        cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.index("start seed-s1") < result.stdout.index("start cosine-s1")
    assert pd.read_csv(out / "solo.csv")["epochs"].eq(1).all()

    ablation = pd.read_csv(out / "ablation.csv")
    phase1 = ablation[ablation["seed"] == 1].copy()
    phase1["config"] = phase1["name"].str.replace(r"-s\d+$", "", regex=True)
    means = phase1.groupby(["config", "weights", "bn", "tta"])["val_accuracy"].mean()
    best = means.idxmax()
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert (chosen["config"], chosen["weights"], chosen["bn"], chosen["tta"]) == best

    final = pd.read_csv(out / "final.csv")
    expected = {(best[0], s) for s in (1, 2)} | {("seed", s) for s in (1, 2)}
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
    pool = recipe_search.Pool(2, tmp_path)
    begin = time.monotonic()
    # An ablation run that could not end for hours, stopped by the deadline 8 s in.
    pool.run([("endless-s1", ["-S", "train.epochs=100000", "-S", "split.limit=600",
                              "--out", str(tmp_path / "a.csv")])], begin + 8)
    assert "stop  endless-s1 (deadline)" in capsys.readouterr().out
    assert time.monotonic() - begin < 30
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
