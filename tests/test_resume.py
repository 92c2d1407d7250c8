"""kill -9 of a training process at named points, then a rerun: history and weights end bit
for bit where an uninterrupted run ends. Also `fashionnet train` itself, killed and rerun, and
stopped by a diverging loss."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashionnet import FashionNet
from fashionnet.checkpoint import read_checkpoint
from fashionnet.data import save_split
from fashionnet.split import SplitConfig, stratified_split
from pipeline import paths
from tests.helpers import REPO, set_params, wait_for
from tests.train_child import CFG

STEPS_PER_EPOCH = 10  # 240 images in batches of 24


@pytest.fixture(scope="module")
def prepared(official, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.npz (240 images) and val.npz (100), split from the real training set."""
    work = tmp_path_factory.mktemp("prepared")
    full = official[0]
    train_idx, val_idx = stratified_split(full.labels.numpy(),
                                          SplitConfig(val_size=100, limit=240, seed=3))
    save_split(work / "train.npz", full.subset(train_idx), train_idx)
    save_split(work / "val.npz", full.subset(val_idx), val_idx)
    assert len(train_idx) == STEPS_PER_EPOCH * CFG.batch_size
    return work


def child(work: Path, point: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tests.train_child", str(work),
                           *([point] if point else [])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def fresh(prepared: Path, tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    work.mkdir()
    for split in ("train.npz", "val.npz"):
        shutil.copy(prepared / split, work / split)
    return work


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run's history and weights."""
    work = tmp_path_factory.mktemp("reference")
    for split in ("train.npz", "val.npz"):
        shutil.copy(prepared / split, work / split)
    result = child(work)
    assert result.returncode == 0, result.stderr
    return torch.load(work / "result.pt", weights_only=True)


def assert_identical(result: dict, reference: dict) -> None:
    assert result["history"] == reference["history"]  # floats compared exactly
    assert len(result["history"]) == CFG.epochs
    assert result["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(result["model"][name], tensor), name


def checkpoint_epoch(work: Path) -> int:
    return read_checkpoint(work / "checkpoints" / "train.pt")[0]["epoch"]


def killed(work: Path, point: str) -> subprocess.CompletedProcess[str]:
    result = child(work, point)
    assert result.returncode == -9, result.stderr
    assert not (work / "result.pt").exists()
    return result


@pytest.mark.slow
def test_killed_again_and_again_ends_identical(prepared, reference, tmp_path):
    work = fresh(prepared, tmp_path, "work")
    killed(work, "after-save:1")  # between epochs 1 and 2
    assert checkpoint_epoch(work) == 1
    run = killed(work, f"step:{STEPS_PER_EPOCH // 2}")  # halfway through epoch 2
    assert "resuming after epoch 1 of 3" in run.stderr
    assert checkpoint_epoch(work) == 1
    killed(work, "mid-save:2")  # half of checkpoint 2 written to its temporary file
    assert checkpoint_epoch(work) == 1  # the previous checkpoint is untouched
    assert len(list((work / "checkpoints").glob(".train.pt.*.tmp"))) == 1
    killed(work, "after-save:3")  # the last epoch saved, the outputs not yet written
    assert checkpoint_epoch(work) == 3
    assert not list((work / "checkpoints").glob(".*.tmp"))  # the torn write was cleaned up
    run = child(work)
    assert run.returncode == 0, run.stderr
    assert "resuming after epoch 3 of 3" in run.stderr
    assert_identical(torch.load(work / "result.pt", weights_only=True), reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:3", "validate:2"])
def test_killed_before_a_checkpoint_ends_identical(prepared, reference, tmp_path, point):
    """Killed before any checkpoint exists (step 3 of epoch 1), or after an epoch's last step
    but before its checkpoint (epoch 2's validation): the rerun redoes that epoch."""
    work = fresh(prepared, tmp_path, "work")
    killed(work, point)
    if point.startswith("step"):
        assert not (work / "checkpoints" / "train.pt").exists()
    else:
        assert checkpoint_epoch(work) == 1
    run = child(work)
    assert run.returncode == 0, run.stderr
    assert_identical(torch.load(work / "result.pt", weights_only=True), reference)


def prepare(repo: Path, official, cfg: SplitConfig) -> None:
    """data/prepared/{train,val}.npz as `fashionnet split` writes them, without its start-up."""
    full = official[0]
    train_idx, val_idx = stratified_split(full.labels.numpy(), cfg)
    save_split(repo / paths.PREPARED["train"], full.subset(train_idx), train_idx)
    save_split(repo / paths.PREPARED["val"], full.subset(val_idx), val_idx)


def fashionnet_train(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fashionnet", "train"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_fashionnet_train_killed_and_rerun_matches_an_uninterrupted_run(repo_copy, cli_env,
                                                                        official):
    split = SplitConfig(val_size=100, limit=400)
    set_params(repo_copy, **{"split.val_size": split.val_size, "split.limit": split.limit,
                             "train.epochs": 4, "train.batch_size": 40})
    prepare(repo_copy, official, split)
    result = fashionnet_train(repo_copy, cli_env)
    assert result.returncode == 0, result.stderr
    history = (repo_copy / paths.HISTORY).read_text()
    model = torch.load(repo_copy / paths.MODEL, weights_only=True)
    assert not (repo_copy / paths.CHECKPOINT).exists()  # a finished run leaves none behind
    for output in (paths.HISTORY, paths.MODEL, paths.TRAIN_INFO):
        (repo_copy / output).unlink()

    process = subprocess.Popen(["fashionnet", "train"], cwd=repo_copy, env=cli_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed the moment the checkpoint of epoch 1 is on disk (renamed into place whole):
    # in epoch 2, three epochs before the run could end.
    wait_for((repo_copy / paths.CHECKPOINT).exists, "the checkpoint of epoch 1", 120,
             proc=process, interval=0.005)
    process.kill()
    assert process.wait() == -9
    assert not (repo_copy / paths.MODEL).exists() and not (repo_copy / paths.HISTORY).exists()

    result = fashionnet_train(repo_copy, cli_env)
    assert result.returncode == 0, result.stderr
    # Killed in epoch 2 (or, on a slow machine, after its checkpoint too): resumed, not rerun.
    assert re.search(r"resuming after epoch [12] of 4", result.stdout)
    assert (repo_copy / paths.HISTORY).read_text() == history
    resumed = torch.load(repo_copy / paths.MODEL, weights_only=True)
    assert resumed.keys() == model.keys()
    for name, tensor in model.items():
        assert torch.equal(resumed[name], tensor), name
    assert not (repo_copy / paths.CHECKPOINT).exists()


@pytest.mark.slow
def test_diverging_training_exits_1_naming_epoch_and_step_and_writes_no_model(repo_copy,
                                                                              cli_env, official):
    split = SplitConfig(val_size=100, limit=200)
    set_params(repo_copy, **{"split.val_size": split.val_size, "split.limit": split.limit,
                             "train.epochs": 2, "train.batch_size": 50, "train.lr": 1e20})
    prepare(repo_copy, official, split)
    model = repo_copy / paths.MODEL
    model.parent.mkdir()
    torch.save(FashionNet().state_dict(), model)  # the last good model
    before = model.read_bytes()
    result = fashionnet_train(repo_copy, cli_env)
    # One AdamW step of 1e20, and the next step's activations overflow (test_checkpoint.py).
    assert (result.returncode, result.stderr) == (
        1, "fashionnet train: failed: FloatingPointError: training diverged at epoch 1, step 2 "
           "of 4: the loss is nan\n")
    assert model.read_bytes() == before
    assert not (repo_copy / paths.HISTORY).exists()
