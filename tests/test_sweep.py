"""`fashionnet sweep`: the grid, its experiments' names, and what it refuses before anything runs.
The runs on Prefect workers are in tests/test_sweep_e2e.py."""

from __future__ import annotations

import subprocess

import pytest

from fashionnet.errors import ConfigError
from pipeline.experiments import point_name
from pipeline.sweep import grid_points, parse_grid, sweep_runs
from tests.helpers import REPO, git, ok


def test_grid_is_every_combination_in_dvc_queue_order():
    grid = parse_grid(["train.lr=0.001,0.003", "train.epochs=1,2"])
    assert grid == {"train.lr": [0.001, 0.003], "train.epochs": [1, 2]}
    points = grid_points(grid)
    assert [tuple(p.values()) for p in points] == [(0.001, 1), (0.001, 2), (0.003, 1), (0.003, 2)]
    assert [point_name(p) for p in points] == ["lr-0.001_epochs-1", "lr-0.001_epochs-2",
                                               "lr-0.003_epochs-1", "lr-0.003_epochs-2"]


def test_names_are_git_ref_safe_and_unambiguous():
    assert point_name({"train.seed": 1, "split.seed": 2}) == "train-seed-1_split-seed-2"
    assert point_name({"train.device": "cuda"}) == "device-cuda"
    long = point_name({"train.lr": 0.001, "train.weight_decay": 1e-5, "train.gamma": 0.5,
                       "train.step_size": 10, "train.batch_size": 128})
    assert len(long) == 60 and long.startswith("lr-0.001_weight_decay-1e-05_gamma-0.5_")
    assert long != point_name({"train.lr": 0.001, "train.weight_decay": 1e-5, "train.gamma": 0.5,
                               "train.step_size": 10, "train.batch_size": 256})
    for name in (long, point_name({"train.lr": 1e-3})):
        subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=True)


@pytest.mark.parametrize(("specs", "key"), [
    (["train.lr"], "train.lr"), (["train.lr=0.1", "train.lr=0.2"], "train.lr"),
    (["train.nope=1,2"], "train.nope"), (["train.epochs=1,-1"], "train.epochs")])
def test_bad_grid_names_the_key(specs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_grid(specs)


def test_a_named_recipe_is_under_every_point_and_prefixes_its_name():
    recipe = {"train.schedule": "cosine", "train.epochs": 15}
    grid = parse_grid(["train.epochs=1,2"], recipe)
    runs = sweep_runs(grid, recipe, "plus")
    assert [point for point, _ in runs] == [{"train.epochs": 1}, {"train.epochs": 2}]
    assert [run.name for _, run in runs] == ["plus_epochs-1", "plus_epochs-2"]
    assert runs[1][1].overrides == {"train.schedule": "cosine", "train.epochs": 2}
    assert [(run.name, run.overrides) for _, run in sweep_runs(grid)] == [
        ("epochs-1", {"train.epochs": 1}), ("epochs-2", {"train.epochs": 2})]
    with pytest.raises(ConfigError, match=r"train\.flpi"):  # checked with the recipe under it
        parse_grid(["train.epochs=1,2"], {"train.flpi": 1})


def test_sweep_refuses_a_bad_recipe_before_anything_runs(repo_copy, cli_env, cli):
    (repo_copy / "recipes" / "bad.yaml").write_text("train.flip: sideways\n")
    code, _, err = cli(repo_copy, "sweep", "-S", "train.epochs=1,2", "--recipe",
                       "recipes/bad.yaml")
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith("fashionnet sweep: error: recipes/bad.yaml: train.flip: Input "
                           "should be 'none', 'random', 'alternate' or 'random-except-footwear'")
    assert "No experiment tasks" in ok(repo_copy, cli_env, "dvc", "queue", "status")


@pytest.mark.parametrize("argv", [["sweep", "-S", "train.lr=0.1,0.2", "--pool", "p"],
                                  ["seeds", "5", "--pool", "p"]])
def test_pool_without_a_server_is_refused(argv, monkeypatch, cli):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code, _, err = cli(REPO, *argv)
    assert code == 2
    assert err.splitlines() == [
        f"fashionnet {argv[0]}: error: --pool: needs the Prefect server of the pool's workers: "
        "set PREFECT_API_URL (and PREFECT_API_AUTH_STRING)"]


def test_a_git_remote_url_with_a_password_is_refused(repo_copy, cli, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    git(repo_copy, "remote", "add", "origin", "https://me:hunter2@git.example/fashionnet.git")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        code, out, err = cli(repo_copy, "sweep", "-S", "train.lr=0.1,0.2", "--pool", "p")
    assert code == 2, out + err
    assert err.splitlines() == [
        "fashionnet sweep: error: git remote origin's URL holds a password, which each run "
        "would carry in its job variables: use SSH or a git credential helper "
        "(docs/distributed.md)"]
    assert "hunter2" not in out + err
