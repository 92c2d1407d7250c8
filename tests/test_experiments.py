"""The experiments layer every command shares: names, and the one rule for an experiment that
exists already. Real runs: tests/test_seeds.py, test_sweep_e2e.py and test_retrain_e2e.py."""

from __future__ import annotations

import pytest

from pipeline import experiments
from pipeline.experiments import Experiment, ExperimentConflict
from pipeline.params import load_params
from tests.helpers import REPO


def test_seed_names_carry_the_recipe():
    assert experiments.seed_name(7) == "seed-7"
    assert experiments.seed_name(7, "plus") == "plus-seed-7"
    assert experiments.point_name({"train.lr": 0.001}, "plus") == "plus_lr-0.001"


def test_an_experiment_with_the_same_name_and_params_is_not_run_again(monkeypatch):
    monkeypatch.chdir(REPO)
    seven, eight = Experiment("seed-7", {"train.seed": 7}), Experiment("seed-8", {"train.seed": 8})
    done = {"seed-7": {"Experiment": "seed-7", "train.seed": 7, "train.lr": 0.003}}
    assert experiments.to_run([seven, eight], "a" * 40, done) == [eight]
    # Values compare as params.yaml holds them once validated: "3e-3" is 0.003; and as
    # `dvc exp show` gives them: a boolean as 'True'.
    same = Experiment("seed-7", {"train.seed": 7, "train.lr": "3e-3", "evaluate.tta": True})
    assert experiments.to_run([same], "a" * 40, {"seed-7": {**done["seed-7"],
                                                           "evaluate.tta": "True"}}) == []
    # A null and a list as DVC writes them, with str(): 'None', "['http://...']".
    mirrors = str(list(load_params().download.mirrors))
    assert experiments.to_run([seven], "a" * 40, {"seed-7": {
        **done["seed-7"], "download.source_dir": "None", "download.mirrors": mirrors}}) == []


def test_an_experiment_of_that_name_with_other_params_is_refused_naming_it(monkeypatch):
    monkeypatch.chdir(REPO)
    done = {"seed-7": {"Experiment": "seed-7", "train.seed": 8}}
    with pytest.raises(ExperimentConflict) as error:
        experiments.to_run([Experiment("seed-7", {"train.seed": 7})], "a" * 40, done)
    assert str(error.value) == (
        "experiment seed-7 exists on aaaaaaa with other params (train.seed=8, not 7): "
        "`dvc exp remove seed-7` to run it again")


def test_an_experiment_run_with_an_override_not_asked_for_now_is_refused(monkeypatch):
    monkeypatch.chdir(REPO)
    done = {"seed-7": {"Experiment": "seed-7", "train.seed": 7, "train.epochs": 3}}
    with pytest.raises(ExperimentConflict) as error:
        experiments.to_run([Experiment("seed-7", {"train.seed": 7})], "a" * 40, done)
    assert "(train.epochs=3, not 60)" in str(error.value)
