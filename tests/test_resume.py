"""kill -9 of a training process at several points, then a rerun: history and weights end bit
for bit where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fashionnet.checkpoint import read_checkpoint
from fashionnet.data import SplitConfig, save_split, stratified_split
from tests.conftest import REPO
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
    start = time.monotonic()
    result = child(work)
    assert result.returncode == 0, result.stderr
    return {**torch.load(work / "result.pt", weights_only=True),
            "seconds": time.monotonic() - start}


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


def test_killed_at_a_random_moment_ends_identical(prepared, reference, tmp_path):
    work = fresh(prepared, tmp_path, "work")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "tests.train_child", str(work)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Anywhere from start-up to the last epoch: the result must not depend on where.
    delay = random.uniform(0.5, reference["seconds"])
    print(f"killed after {delay:.2f} s")  # shown if the test fails
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.kill()  # SIGKILL
        process.wait()
    run = child(work)
    assert run.returncode == 0, run.stderr
    assert_identical(torch.load(work / "result.pt", weights_only=True), reference)
