"""Training: AdamW (amsgrad), cross-entropy and StepLR over in-memory tensors (the seed's
recipe), with optional recipe options: flips, translations, label smoothing, a cosine or
one-cycle schedule, an EMA of the weights, BatchNorm recalibration (see docs/recipe.md)."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from torch.nn import functional as F
from tqdm import tqdm

from fashionnet.augment import FLIPS, EpochAugment, draw_epoch
from fashionnet.average import WeightAverage
from fashionnet.checkpoint import fingerprint, resumable, save_checkpoint
from fashionnet.data import LabeledImages, to_input
from fashionnet.evaluate import evaluate
from fashionnet.fields import Number, Seed
from fashionnet.model import FashionNet
from fashionnet.runtime import autocast, resolve_device, resolve_precision, retain_freed_memory

log = logging.getLogger("fashionnet")


def _renamed_flip(value: object) -> object:
    if value == "symmetric":  # the name until 2026-12: it never meant mirror symmetry
        raise ValueError("'symmetric' is now called 'random-except-footwear' (random flips, "
                         "never of the footwear classes)")
    return value


class TrainConfig(BaseModel):
    """The training recipe; defaults are the seed's (batch size aside, which it does not give)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: StrictInt = Field(60, ge=1)
    batch_size: StrictInt = Field(64, ge=2)  # BatchNorm needs two images to train
    lr: Number = Field(3e-3, gt=0)
    weight_decay: Number = Field(1e-5, ge=0)
    amsgrad: StrictBool = True
    step_size: StrictInt = Field(25, ge=1, description="epochs between learning-rate decays")
    gamma: Number = Field(0.1, gt=0, le=1)
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # see runtime.resolve_precision
    # Recipe options beyond the seed's; each default is the seed's recipe (docs/recipe.md).
    schedule: Literal["step", "cosine", "onecycle"] = Field(
        "step", description="step: StepLR(step_size, gamma) per epoch; cosine: cosine decay "
        "from lr to 0 per step; onecycle: OneCycleLR up to lr and down, per step")
    flip: Annotated[Literal[FLIPS], BeforeValidator(_renamed_flip)] = Field(  # type: ignore[valid-type]
        "none", description="horizontal flip: none, random (p=1/2), alternate (airbench), "
        "random-except-footwear (random, but never the footwear classes, which face one way)")
    translate: StrictInt = Field(0, ge=0, le=4, description="max shift in pixels, zero fill")
    label_smoothing: Number = Field(0.0, ge=0, lt=1)
    ema: Number = Field(0.0, ge=0, lt=1, description="per-step decay of an exponential moving "
                        "average of the weights, which becomes the model; 0 = off")
    bn_recalibrate: StrictBool = Field(False, description="after training, recompute BatchNorm "
                                       "running statistics over the train split, dropout off")


@dataclass(frozen=True)
class EpochStats:
    """One row of metrics/history.csv. Train figures are running means over the epoch's
    steps (training mode, dropout on); validation is measured after the epoch in eval mode."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


def init_model(seed: int) -> FashionNet:
    """A freshly initialised FashionNet; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return FashionNet()


class NonFiniteLoss(FloatingPointError):
    """A step's loss was NaN or infinite; ``step`` counts from 1 within the epoch."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"the loss of step {step} is {loss}")


def train_epoch(model: FashionNet, optimizer: torch.optim.Optimizer, x_all: torch.Tensor,
                y_all: torch.Tensor, order: torch.Tensor, batch_size: int,
                desc: str = "", dtype: torch.dtype = torch.float32,
                augment: EpochAugment | None = None, label_smoothing: float = 0.0,
                step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                ema: WeightAverage | None = None) -> tuple[float, int]:
    """One pass over ``x_all[order]`` in batches; returns (summed loss, correct predictions)
    over the epoch, measured in training mode on the fly. Raises NonFiniteLoss naming the
    first step whose loss was NaN or infinite.

    ``x_all`` is the whole split as uint8 (N, 28, 28) on the model's device and ``order`` a
    permutation on that device: each batch is gathered and scaled on the device, with no
    DataLoader and no host round trip. With ``dtype`` bfloat16 the step runs under autocast.
    ``augment`` transforms each uint8 batch on the device; ``step_scheduler`` and ``ema`` are
    stepped after every optimizer step.
    """
    retain_freed_memory()
    model.train()
    device = x_all.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    steps = -(-len(order) // batch_size)
    step_loss = torch.zeros(steps, device=device)  # read only if the epoch's sum is bad
    with tqdm(total=steps, desc=desc, unit="step", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for step, i in enumerate(range(0, len(order), batch_size)):
            idx = order[i : i + batch_size]
            images = x_all[idx]  # (B, 28, 28) uint8
            if augment is not None:
                images = augment(images, slice(i, i + batch_size))
            x, y = to_input(images), y_all[idx]  # (B, 1, 28, 28) float, (B,)
            with autocast(device, dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(idx)  # on the device: no sync per step
            step_loss[step] = loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            bar.update()
    total = float(loss_sum)
    if not math.isfinite(total):
        bad = int((~step_loss.isfinite()).nonzero()[0])
        raise NonFiniteLoss(bad + 1, float(step_loss[bad]))
    return total, int(correct)


def train(
    model: FashionNet,
    train_set: LabeledImages,
    val_set: LabeledImages,
    cfg: TrainConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_trained: Callable[[FashionNet], None] | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place with the recipe ``cfg``; one :class:`EpochStats` per epoch.

    With ``cfg.ema`` the model ends with the averaged weights (validated each epoch in their
    place); with ``cfg.bn_recalibrate`` its BatchNorm running statistics are then recomputed.
    ``on_trained`` sees the trained (online) weights before either replaces them.

    With ``checkpoint``, everything the rest of the run depends on is saved there after each
    epoch, and a checkpoint left by an interrupted run with the same params, data, code and
    machine is resumed: the result is bit for bit that of an uninterrupted run.
    ``on_epoch`` is called with each epoch's stats in order, those resumed included.
    """
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        # Same params, same metrics: cuDNN's autotuned kernels may sum in a varying order.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model.to(device, memory_format=torch.channels_last)  # the fast layout for the convolutions
    dtype = resolve_precision(cfg.precision, device)
    initial = copy.deepcopy(model.state_dict())
    x_all = train_set.images.to(device)  # uint8 (N, 28, 28): 42 MB for 54,000 images
    y_all = train_set.labels.to(device)
    n = len(train_set)
    steps = -(-n // cfg.batch_size)
    run_state = _fresh_run(model, cfg, device, steps)
    history: list[EpochStats] = []
    if checkpoint is not None:
        run = fingerprint({**cfg.model_dump(exclude={"device"}), "precision": str(dtype)},
                          (train_set.images, train_set.labels, val_set.images, val_set.labels),
                          device)
        saved = resumable(checkpoint, run)
        if saved is not None:
            try:
                history = _restore(saved, model, run_state, cfg.epochs)
                log.info("%s: resuming after epoch %d of %d", checkpoint, len(history),
                         cfg.epochs)
                for stats in history if on_epoch is not None else ():
                    on_epoch(stats)  # the restored epochs, so the caller sees every one
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                # Undo whatever was restored before the misfit was found.
                log.warning("%s: ignored, it does not fit this run (%s); training from scratch",
                            checkpoint, e)
                model.load_state_dict(initial)
                run_state = _fresh_run(model, cfg, device, steps)
    optimizer, scheduler, generators, ema = run_state
    # Which images alternate flipping odd/even epochs: a function of the seed alone, so it
    # needs no place in the checkpoint.
    alternate_base = (torch.rand(n, generator=torch.Generator().manual_seed(
        _derived_seed(cfg.seed, 2))) < 0.5) if cfg.flip == "alternate" else None
    per_step = cfg.schedule != "step"
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, generator=generators["shuffle"]).to(device)
        augment = draw_epoch(cfg.flip, cfg.translate, order, epoch, generators.get("augment"),
                             alternate_base, device, y_all)
        try:
            loss_sum, correct = train_epoch(
                model, optimizer, x_all, y_all, order, cfg.batch_size,
                desc=f"epoch {epoch}/{cfg.epochs}", dtype=dtype, augment=augment,
                label_smoothing=cfg.label_smoothing,
                step_scheduler=scheduler if per_step else None, ema=ema)
        except NonFiniteLoss as e:
            raise FloatingPointError(f"training diverged at epoch {epoch}, step {e.step} of "
                                     f"{steps}: the loss is {e.loss}") from None
        if not per_step:
            scheduler.step()
        val = evaluate(model if ema is None else ema.module, val_set, device, dtype=dtype)
        if not math.isfinite(val.loss):
            raise FloatingPointError(f"training diverged at epoch {epoch}: the validation "
                                     f"loss is {val.loss}")
        stats = EpochStats(epoch, loss_sum / n, correct / n, val.loss, val.accuracy, lr,
                           time.perf_counter() - start)
        history.append(stats)
        if checkpoint is not None:
            save_checkpoint(checkpoint, _snapshot(history, model, run_state), run)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.1e  %.1fs",
                 epoch, cfg.epochs, stats.train_loss, stats.train_accuracy, stats.val_loss,
                 stats.val_accuracy, lr, stats.seconds)
        if on_epoch is not None:
            on_epoch(stats)
    if on_trained is not None:
        on_trained(model)
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    if cfg.bn_recalibrate:
        recalibrate_batchnorm(model, x_all, dtype=dtype)
    model.to(memory_format=torch.contiguous_format)  # plain strides in the saved state_dict
    return history


RECALIBRATION_BATCH = 1000  # images per batch: each batch's variance is near the population's


@torch.no_grad()
def recalibrate_batchnorm(model: FashionNet, images: torch.Tensor,
                          batch_size: int = RECALIBRATION_BATCH,
                          dtype: torch.dtype = torch.float32) -> None:
    """Recompute every BatchNorm's running mean and variance over ``images`` (N, 28, 28) uint8
    on the model's device, with dropout off, as the eval-mode network sees its inputs; nothing
    else in the model changes. Training's statistics come with dropout on, which inflates the
    variance reaching bn2 (dropout sits between bn1 and conv2).

    Written here rather than with ``torch.optim.swa_utils.update_bn``, which sets the whole
    model to training mode and so would recompute the statistics with dropout on.
    """
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, equally weighted
        bn.train()
    try:
        for start in range(0, len(images), batch_size):
            with autocast(images.device, dtype):
                model(to_input(images[start : start + batch_size]))
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)


def _derived_seed(seed: int, stream: int) -> int:
    """A seed for the run's ``stream``-th extra random stream, apart from ``seed``'s own
    (two generators with the same seed would draw the same numbers)."""
    return (seed * 0x9E3779B1 + stream * 0x85EBCA77) % 2**63  # golden-ratio hashing


RunState = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                 dict[str, torch.Generator], WeightAverage | None]


def _fresh_run(model: FashionNet, cfg: TrainConfig, device: torch.device,
               steps: int) -> RunState:
    """The optimizer, scheduler, seeded random streams and weight average of a run at its
    start; ``steps`` is the number of optimizer steps per epoch."""
    torch.manual_seed(cfg.seed)  # the default generators: dropout masks
    # Every random stream training draws from, saved and restored with each checkpoint.
    generators = {"torch": torch.default_generator,
                  "shuffle": torch.Generator().manual_seed(cfg.seed)}
    if cfg.flip in ("random", "random-except-footwear") or cfg.translate > 0:  # flips and shifts
        generators["augment"] = torch.Generator().manual_seed(_derived_seed(cfg.seed, 1))
    if device.type == "cuda":
        generators["cuda"] = torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps)
    elif cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr,
                                                        total_steps=cfg.epochs * steps)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    ema = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    return optimizer, scheduler, generators, ema


def _snapshot(history: list[EpochStats], model: FashionNet, run_state: RunState) -> dict:
    """Everything the rest of a run depends on, after epoch ``len(history)``."""
    optimizer, scheduler, generators, ema = run_state
    snapshot = {
        "epoch": len(history),
        "history": [vars(s) for s in history],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {name: g.get_state() for name, g in generators.items()},
    }
    if ema is not None:
        snapshot["ema"] = ema.state_dict()
    return snapshot


def _restore(saved: dict, model: FashionNet, run_state: RunState,
             epochs: int) -> list[EpochStats]:
    """Load a :func:`_snapshot` into the run's objects; returns the history so far."""
    optimizer, scheduler, generators, ema = run_state
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.load_state_dict(saved["ema"])
    for name, generator in generators.items():
        generator.set_state(saved["rng"][name])
    history = [EpochStats(**row) for row in saved["history"]]
    if saved["epoch"] != len(history) or len(history) > epochs:
        raise ValueError(f"epoch {saved['epoch']} with {len(history)} history rows")
    return history
