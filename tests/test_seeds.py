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
from tests.helpers import REPO, copy_repo, git, ok, repo_env, run, set_params, wait_for


def test_committed_seeds_file_has_the_flows_columns():
    header = (REPO / paths.SEEDS).read_text().splitlines()[0]
    assert header.split(",") == COLUMNS


@pytest.mark.parametrize(("args", "message"), [
    (["--jobs", "0"], "argument -j/--jobs: '0' is below 1"),
    (["x"], "argument SEED: invalid int value: 'x'"),
    (["--", "-1"], "fashionnet seeds: error: override train.seed: Input should be greater "
                   "than or equal to 0 (got -1)")])
def test_seeds_refuses_bad_arguments_before_anything_runs(repo_copy, cli_env, cli, args,
                                                          message):
    code, _, err = cli(repo_copy, "seeds", *args)
    assert code == 2 and message in err.splitlines()[-1], err
    assert "No experiment tasks" in ok(repo_copy, cli_env, "dvc", "queue", "status")


def small_repo(tmp_path: Path, prefect_api: str, raw_dir: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the repository on small params, committed, and its environment."""
    repo = copy_repo(tmp_path / "repo")
    set_params(repo, **{"split.limit": 600, "split.val_size": 500, "train.epochs": 1})
    git(repo, "commit", "-qam", "small params")
    return repo, repo_env(repo, prefect_api, raw_dir)


@pytest.mark.slow
def test_seeds_runs_experiments_records_them_and_applies_the_own_seed(tmp_path, prefect_api,
                                                                      raw_dir):
    repo, env = small_repo(tmp_path, prefect_api, raw_dir)
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

    # Again on the same commit: the finished experiment is the result, nothing runs.
    again = run(repo, env, "fashionnet", "seeds", "7")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "$ dvc exp run" not in again.stdout
    assert pd.read_csv(repo / paths.SEEDS).to_dict("records") == \
        seeds[seeds["seed"] == 7].to_dict("records")


@pytest.mark.slow
def test_a_failed_seed_run_fails_and_changes_nothing(tmp_path, prefect_api, raw_dir):
    repo, env = small_repo(tmp_path, prefect_api, raw_dir)
    # A valid params.yaml whose run fails in its first stage: the raw files' directory is not
    # there (and the environment names none, which would take its place).
    del env["FASHIONNET_SOURCE_DIR"]
    set_params(repo, **{"download.source_dir": str(tmp_path / "nowhere")})
    git(repo, "commit", "-qam", "a source directory that is not there")
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", str(paths.SEEDS))}
    result = run(repo, env, "fashionnet", "seeds", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("fashionnet seeds: failed: CommandFailed: dvc exp run "
                                    "--temp --name seed-3"), result.stderr
    assert f"download.source_dir: {tmp_path / 'nowhere'} is not a directory" in result.stdout
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert not (repo / "dvc.lock").exists() and not (repo / paths.METRICS_JSON).exists()


def test_uncommitted_changes_are_refused_before_anything_runs(repo_copy, cli_env, cli):
    readme = repo_copy / "README.md"
    readme.write_text(readme.read_text() + "\nwork in progress\n")
    code, out, err = cli(repo_copy, "seeds")
    assert code == 1, out + err
    assert err.splitlines() == [
        "fashionnet seeds: failed: UncommittedChanges: uncommitted changes to README.md: "
        "commit or stash them first (`dvc exp apply` at the end would overwrite them)"]
    assert readme.read_text().endswith("work in progress\n")
    assert ok(repo_copy, cli_env, "dvc", "exp", "list", "--all-commits", "--name-only") == ""
    assert "No experiment tasks" in ok(repo_copy, cli_env, "dvc", "queue", "status")


def test_seeds_refuses_a_recipe_that_sets_the_seed(repo_copy, cli_env, cli):
    # load_recipe's other refusals are in tests/test_recipe.py.
    (repo_copy / "recipes" / "seeded.yaml").write_text("train.flip: random\ntrain.seed: 3\n")
    code, out, err = cli(repo_copy, "seeds", "--recipe", "recipes/seeded.yaml")
    assert code == 2, out + err
    assert err.splitlines() == [
        "fashionnet seeds: error: recipes/seeded.yaml: train.seed: is set per run by "
        "`fashionnet seeds`; remove it from the recipe"]
    assert "No experiment tasks" in ok(repo_copy, cli_env, "dvc", "queue", "status")


@pytest.mark.slow
def test_seeds_with_a_recipe_records_its_runs_apart_and_applies_nothing(tmp_path, prefect_api,
                                                                        raw_dir):
    repo, env = small_repo(tmp_path, prefect_api, raw_dir)
    recipe = {"train.flip": "alternate", "train.translate": 1, "train.ema": 0.9,
              "train.bn_recalibrate": True, "evaluate.tta": True}
    (repo / "recipes" / "mini.yaml").write_text(yaml.safe_dump(recipe))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a recipe")
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "metrics/seeds.csv")}
    baseline = git(repo, "rev-parse", "HEAD").strip()

    with open(tmp_path / "seeds.log", "w") as log:
        proc = subprocess.Popen(["fashionnet", "seeds", "7", "--recipe", "recipes/mini.yaml",
                                 "--threads", "1"], cwd=repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    try:
        # A commit while the run is under way, once its train stage is done: the runs are
        # filed under the commit they started from, and are still found there.
        wait_for(lambda: list(repo.glob(".dvc/tmp/exps/**/models/train_info.json")),
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
    # Nothing applied: the workspace keeps params.yaml's recipe and the reference recipe's table.
    for name, content in before.items():
        assert (repo / name).read_bytes() == content, name
    assert not (repo / "dvc.lock").exists()
