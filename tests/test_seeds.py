"""The spread over training seeds: the report's table, metrics/seeds.csv, and `fashionnet seeds`
running real DVC experiments in a fresh copy of the repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import paths
from pipeline.seeds import COLUMNS
from tests.helpers import REPO, copy_repo, git, repo_env, set_params, wait_for


def test_committed_seeds_file_has_the_flows_columns():
    header = (REPO / paths.SEEDS).read_text().splitlines()[0]
    assert header.split(",") == COLUMNS


@pytest.mark.slow
def test_seeds_cli_refuses_bad_arguments_before_queueing(repo_copy: Path, cli_env):
    for args, message in ((["--jobs", "0"], "below 1"), (["x"], "invalid int value"),
                          (["--", "-1"], "train.seed")):
        result = subprocess.run(["fashionnet", "seeds", *args], cwd=repo_copy, env=cli_env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    queue = subprocess.run(["dvc", "queue", "status"], cwd=repo_copy, env=cli_env,
                           capture_output=True, text=True, check=True).stdout
    assert "No experiment tasks" in queue


def run(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_seeds_runs_experiments_records_them_and_applies_the_own_seed(tmp_path, prefect_api,
                                                                      raw_dir):
    repo = copy_repo(tmp_path / "repo")
    env = repo_env(repo, prefect_api, raw_dir)
    set_params(repo, **{"split.limit": 1200, "split.val_size": 1000, "train.epochs": 1})
    git(repo, "commit", "-qam", "small params")
    params_before = (repo / "params.yaml").read_bytes()

    result = run(repo, env, "fashionnet", "seeds", "42", "7", "--jobs", "2", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr

    seeds = pd.read_csv(repo / paths.SEEDS)
    assert seeds["seed"].tolist() == [42, 7]
    assert seeds["experiment"].tolist() == ["seed-42", "seed-7"]
    assert (seeds["threads"] == 1).all() and (seeds["epochs"] == 1).all()
    shown = json.loads(run(repo, env, "dvc", "exp", "show", "--json").stdout)
    experiments = {e["name"]: e for b in shown for e in (b.get("experiments") or [])}
    for row in seeds.itertuples():
        data = experiments[row.experiment]["revs"][0]["data"]
        metrics = data["metrics"]["metrics/metrics.json"]["data"]["accuracy"]
        assert row.test_accuracy == metrics["test"] and row.val_accuracy == metrics["val"]
        assert data["params"]["params.yaml"]["data"]["train"]["seed"] == row.seed
    # The workspace holds seed 42's run, the report its spread, and DVC has nothing to do.
    workspace = json.loads((repo / paths.METRICS_JSON).read_text())["accuracy"]
    assert workspace["test"] == seeds.loc[0, "test_accuracy"]
    assert (repo / "params.yaml").read_bytes() == params_before
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["seed"] == 42
    text = (repo / paths.REPORT).read_text()
    assert "| train.seed 7 |" in text and "mean ± std, 2 seeds" in text
    assert "Data and pipelines are up to date" in run(repo, env, "dvc", "status").stdout


@pytest.mark.slow
def test_a_failed_seed_run_fails_and_changes_nothing(tmp_path, prefect_api, raw_dir):
    repo = copy_repo(tmp_path / "repo")
    env = repo_env(repo, prefect_api, raw_dir)
    # Valid params that fail at run time on this CPU-only machine, in the train stage.
    set_params(repo, **{"split.limit": 600, "train.epochs": 1, "train.device": "cuda"})
    git(repo, "commit", "-qam", "cuda on a machine without one")
    if "cuda" in run(repo, env, "python", "-c", "import torch; print("
                     "'cuda' if torch.cuda.is_available() else 'cpu')").stdout:
        pytest.skip("this machine has CUDA: the run would not fail")
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", str(paths.SEEDS))}
    result = run(repo, env, "fashionnet", "seeds", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fashionnet seeds: failed" in result.stderr
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert not (repo / "dvc.lock").exists() and not (repo / paths.METRICS_JSON).exists()


@pytest.mark.slow
def test_uncommitted_changes_are_refused_before_anything_is_queued(repo_copy, cli_env):
    readme = repo_copy / "README.md"
    readme.write_text(readme.read_text() + "\nwork in progress\n")
    result = run(repo_copy, cli_env, "fashionnet", "seeds")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "uncommitted changes to README.md" in result.stderr
    assert readme.read_text().endswith("work in progress\n")
    queue = run(repo_copy, cli_env, "dvc", "exp", "list", "--all-commits").stdout
    assert "seed-" not in queue
    assert "No experiment tasks" in run(repo_copy, cli_env, "dvc", "queue", "status").stdout


def test_seeds_cli_refuses_a_bad_recipe_naming_file_and_key(repo_copy: Path, cli_env):
    # One CLI start-up; load_recipe's other refusals are in tests/test_recipe.py.
    (repo_copy / "recipes" / "seeded.yaml").write_text("train.flip: random\ntrain.seed: 3\n")
    result = subprocess.run(["fashionnet", "seeds", "--recipe", "recipes/seeded.yaml"],
                            cwd=repo_copy, env=cli_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr
    assert "recipes/seeded.yaml: train.seed" in lines[0], lines[0]
    queue = subprocess.run(["dvc", "queue", "status"], cwd=repo_copy, env=cli_env,
                           capture_output=True, text=True, check=True).stdout
    assert "No experiment tasks" in queue


@pytest.mark.slow
def test_seeds_with_a_recipe_records_its_runs_apart_and_applies_nothing(tmp_path, prefect_api,
                                                                        raw_dir):
    repo = copy_repo(tmp_path / "repo")
    env = repo_env(repo, prefect_api, raw_dir)
    set_params(repo, **{"split.limit": 1200, "split.val_size": 1000, "train.epochs": 1})
    recipe = {"train.flip": "alternate", "train.translate": 1, "train.ema": 0.9,
              "train.bn_recalibrate": True, "evaluate.tta": True}
    (repo / "recipes" / "mini.yaml").write_text(yaml.safe_dump(recipe))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "small params, a recipe")
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "metrics/seeds.csv")}
    baseline = git(repo, "rev-parse", "HEAD").strip()

    with open(tmp_path / "seeds.log", "w") as log:
        proc = subprocess.Popen(["fashionnet", "seeds", "7", "--recipe", "recipes/mini.yaml",
                                 "--threads", "1"], cwd=repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    try:
        # A commit while the run is under way, once its train stage is done: the runs are
        # filed under the commit they started from, and are still found there.
        wait_for(lambda: list(repo.glob(".dvc/tmp/exps/*/models/train_info.json")),
                 "the experiment's train stage", timeout=300, proc=proc,
                 log=tmp_path / "seeds.log")
        git(repo, "commit", "-q", "--allow-empty", "-m", "work done meanwhile")
        assert proc.wait(timeout=300) == 0, (tmp_path / "seeds.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    seeds = pd.read_csv(repo / paths.recipe_seeds("mini"))
    assert list(seeds.columns) == COLUMNS
    assert seeds["experiment"].tolist() == ["mini-seed-7"]
    recall = pd.read_csv(repo / paths.recipe_recall("mini"))
    assert recall["seed"].tolist() == [7] and ((recall.iloc[:, 2:] >= 0).all().all())
    shown = json.loads(run(repo, env, "dvc", "exp", "show", "--json", "--rev", baseline).stdout)
    experiments = {e["name"]: e for b in shown for e in (b.get("experiments") or [])}
    data = experiments["mini-seed-7"]["revs"][0]["data"]
    metrics = data["metrics"]["metrics/metrics.json"]["data"]["accuracy"]
    assert seeds.loc[0, "test_accuracy"] == metrics["test"]
    params = data["params"]["params.yaml"]["data"]
    assert params["train"]["seed"] == 7 and params["evaluate"]["tta"] is True
    assert {k: params["train"][k] for k in ("flip", "translate", "ema", "bn_recalibrate")} == {
        "flip": "alternate", "translate": 1, "ema": 0.9, "bn_recalibrate": True}
    # Nothing applied: the workspace keeps params.yaml's recipe and the seed recipe's table.
    for name, content in before.items():
        assert (repo / name).read_bytes() == content, name
    assert not (repo / "dvc.lock").exists()
