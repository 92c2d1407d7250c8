"""Checkpoints: what one holds, resuming from it, runs that must not resume, every way the file
can be damaged, and a loss that turns NaN or infinite."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fashionnet import FashionNet
from fashionnet.checkpoint import read_checkpoint, save_checkpoint
from fashionnet.data import LabeledImages
from fashionnet.errors import DataError
from fashionnet.recipe import EpochStats, TrainConfig
from fashionnet.runtime import resolve_precision
from fashionnet.split import SplitConfig, stratified_split
from fashionnet.train import init_model, train

CFG = TrainConfig(epochs=2, batch_size=15, step_size=1, device="cpu")  # 4 steps per epoch
STEPS = 4

Data = tuple[LabeledImages, LabeledImages]


@pytest.fixture(scope="module")
def small(official) -> Data:
    """60 training and 50 validation images from the real training set."""
    full = official[0]
    train_idx, val_idx = stratified_split(full.labels.numpy(),
                                          SplitConfig(val_size=50, limit=60, seed=5))
    return full.subset(train_idx), full.subset(val_idx)


def run(data: Data, cfg: TrainConfig = CFG, checkpoint: Path | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[FashionNet, list]:
    model = init_model(cfg.seed)
    history = train(model, *data, cfg, checkpoint, on_epoch)
    return model, history


class Stop(Exception):
    """Stands for the process dying after an epoch's checkpoint."""


def stopped_after(data: Data, epoch: int, checkpoint: Path, cfg: TrainConfig = CFG) -> None:
    def stop(stats: EpochStats) -> None:
        if stats.epoch == epoch:
            raise Stop
    with pytest.raises(Stop):
        run(data, cfg, checkpoint, stop)


def assert_same_run(a: tuple[FashionNet, list], b: tuple[FashionNet, list]) -> None:
    rows = [[(s.epoch, s.train_loss, s.train_accuracy, s.val_loss, s.val_accuracy, s.lr)
             for s in history] for _, history in (a, b)]
    assert rows[0] == rows[1]
    state_a, state_b = a[0].state_dict(), b[0].state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(small: Data) -> tuple[FashionNet, list]:
    return run(small)


def test_same_params_give_the_same_run(small, uninterrupted):
    assert_same_run(run(small), uninterrupted)


def test_checkpoint_holds_everything_a_resume_needs(small, tmp_path):
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint)
    state, made_by = read_checkpoint(checkpoint)
    assert set(state) == {"epoch", "history", "model", "optimizer", "scheduler", "rng"}
    assert state["epoch"] == 1 and [row["epoch"] for row in state["history"]] == [1]
    assert state["model"].keys() == FashionNet().state_dict().keys()
    assert "max_exp_avg_sq" in state["optimizer"]["state"][0]  # amsgrad's running maximum
    assert state["scheduler"]["last_epoch"] == 1
    assert set(state["rng"]) == {"torch", "shuffle"}
    assert set(made_by) == {"params", "data", "code", "torch", "device", "threads"}
    assert json.loads(made_by["params"]) == {**CFG.model_dump(exclude={"device"}),
                                             "precision": str(resolve_precision(
                                                 CFG.precision, torch.device("cpu")))}
    # Plain PyTorch reads it too, safely.
    assert torch.load(checkpoint, weights_only=True)["state"]["epoch"] == 1


def test_resumed_run_is_identical_to_an_uninterrupted_one(small, uninterrupted, tmp_path,
                                                          caplog):
    caplog.set_level(logging.INFO, logger="fashionnet")
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint)
    resumed = run(small, checkpoint=checkpoint)
    assert "resuming after epoch 1 of 2" in caplog.text
    assert_same_run(resumed, uninterrupted)
    assert read_checkpoint(checkpoint)[0]["epoch"] == 2


RECIPES = {
    "flip, translate, smoothing, cosine, EMA, BN recalibration": {
        "flip": "random", "translate": 2, "label_smoothing": 0.1, "schedule": "cosine",
        "ema": 0.9, "bn_recalibrate": True},
    "alternating flip, one-cycle": {"flip": "alternate", "schedule": "onecycle"},
    "flip except footwear, EMA": {"flip": "random-except-footwear", "ema": 0.5},
}


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_resumed_run_with_recipe_options_is_identical(small, tmp_path, caplog, options):
    """The EMA and the augmentation's random stream are in the checkpoint too."""
    caplog.set_level(logging.INFO, logger="fashionnet")
    cfg = CFG.model_copy(update=options)
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint, cfg)
    state = read_checkpoint(checkpoint)[0]
    assert ("ema" in state) == ("ema" in options)
    draws = options.get("flip") in ("random", "random-except-footwear") or "translate" in options
    assert ("augment" in state["rng"]) == draws
    resumed = run(small, cfg, checkpoint=checkpoint)
    assert "resuming after epoch 1 of 2" in caplog.text  # not ignored and run afresh
    assert_same_run(resumed, run(small, cfg))


def test_checkpoint_of_another_run_is_ignored_saying_why(small, uninterrupted, tmp_path,
                                                         caplog):
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint, CFG.model_copy(update={"lr": 0.01}))
    assert_same_run(run(small, checkpoint=checkpoint), uninterrupted)
    assert "ignored, made by a run with different params; training from scratch" in caplog.text
    caplog.clear()
    images = small[0].images.clone()
    images[0, 0, 0] += 1  # one pixel of one image
    stopped_after((LabeledImages(images, small[0].labels), small[1]), 1, checkpoint)
    assert_same_run(run(small, checkpoint=checkpoint), uninterrupted)
    assert "ignored, made by a run with different data; training from scratch" in caplog.text


def flip_a_weight(path: Path) -> None:
    """Change one byte inside the stored fc.weight: torch itself loads this without a word."""
    raw = bytearray(path.read_bytes())
    weight = read_checkpoint(path)[0]["model"]["fc.weight"]
    at = raw.find(weight.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 10] ^= 0x01
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)  # loads: only the digest tells


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


DAMAGE = {
    "a flipped bit in a weight": (flip_a_weight, "does not match its digest"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
                  "cannot be loaded"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be loaded"),
    "not a torch file": (lambda p: p.write_text("epoch: 3\n"), "cannot be loaded"),
    "a bare state_dict": (lambda p: torch.save(FashionNet().state_dict(), p),
                          "not a FashionNet training checkpoint"),
    "code to run": (lambda p: torch.save({"state": Exploit(p.with_name("pwned"))}, p),
                    "(?i)unsupported global"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_refused_and_training_starts_afresh(small, uninterrupted,
                                                                   tmp_path, caplog, damage):
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint)
    harm, message = DAMAGE[damage]
    harm(checkpoint)
    with pytest.raises(DataError, match=message) as error:
        read_checkpoint(checkpoint)
    assert str(checkpoint) in str(error.value) and "\n" not in str(error.value)
    assert_same_run(run(small, checkpoint=checkpoint), uninterrupted)
    assert "ignored, training from scratch" in caplog.text
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change", ["wrong shape", "missing optimizer", "bad rng state"])
def test_intact_checkpoint_that_does_not_fit_is_ignored(small, uninterrupted, tmp_path, caplog,
                                                        change):
    """A file with a valid digest and fingerprint whose content cannot be applied is rolled
    back, whatever it had already changed, and training starts afresh."""
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint)
    state, made_by = read_checkpoint(checkpoint)
    if change == "wrong shape":
        state["model"]["fc.weight"] = torch.zeros(3, 3)
    elif change == "missing optimizer":
        del state["optimizer"]  # model already loaded when this is found
    else:
        state["rng"]["shuffle"] = torch.zeros(3, dtype=torch.uint8)
    save_checkpoint(checkpoint, state, made_by)
    assert_same_run(run(small, checkpoint=checkpoint), uninterrupted)
    assert "it does not fit this run" in caplog.text


def test_failing_write_mid_save_keeps_the_previous_checkpoint(small, tmp_path, monkeypatch):
    checkpoint = tmp_path / "train.pt"
    stopped_after(small, 1, checkpoint)
    before = checkpoint.read_bytes()

    def disk_full(obj: object, f: Path) -> None:
        Path(f).write_bytes(before[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(small, checkpoint=checkpoint)  # resumes, trains epoch 2, fails saving it
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]  # no temporary file


def inject(monkeypatch: pytest.MonkeyPatch, training_call: int | None = None,
           eval_call: int | None = None, value: float = float("inf")) -> None:
    """Make the n-th training (or evaluation) cross-entropy, counting from 1, ``value``."""
    calls = {True: 0, False: 0}
    cross_entropy = F.cross_entropy

    def faulty(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        training = torch.is_grad_enabled()
        calls[training] += 1
        if calls[training] == (training_call if training else eval_call):
            loss = loss * value
        return loss

    monkeypatch.setattr(F, "cross_entropy", faulty)


def test_non_finite_loss_stops_training_naming_epoch_and_step(small, tmp_path, monkeypatch):
    checkpoint = tmp_path / "train.pt"
    inject(monkeypatch, training_call=STEPS + 3)
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step 3 of 4: the loss is inf"):
        run(small, checkpoint=checkpoint)
    assert read_checkpoint(checkpoint)[0]["epoch"] == 1  # the diverged epoch is not saved


def test_non_finite_validation_loss_stops_training(small, monkeypatch):
    inject(monkeypatch, eval_call=1, value=float("nan"))
    with pytest.raises(FloatingPointError, match=r"at epoch 1: the validation loss is nan"):
        run(small)


def test_a_learning_rate_that_diverges_is_caught(small):
    """One AdamW step of 1e20 makes the weights about 1e20; the next step's activations
    overflow float32 (and bfloat16, which has its range)."""
    with pytest.raises(FloatingPointError, match=r"^training diverged at epoch 1, step 2 of 4: "
                                                 r"the loss is nan$"):
        run(small, CFG.model_copy(update={"lr": 1e20}))
