"""Training: AdamW (amsgrad), cross-entropy and StepLR over in-memory tensors (the reference
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

import torch
from torch.nn import functional as F
from tqdm import tqdm

from fashionnet.augment import EpochAugment, draw_epoch
from fashionnet.average import WeightAverage
from fashionnet.checkpoint import fingerprint, resumable, save_checkpoint
from fashionnet.data import LabeledImages, to_input
from fashionnet.evaluate import evaluate
from fashionnet.model import FashionNet
from fashionnet.recipe import EpochStats, TrainConfig
from fashionnet.run_state import derived_seed, fresh_run, restore, snapshot
from fashionnet.runtime import autocast, resolve_device, resolve_precision, retain_freed_memory

log = logging.getLogger("fashionnet")


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
    run_state = fresh_run(model, cfg, device, steps)
    history: list[EpochStats] = []
    if checkpoint is not None:
        run = fingerprint({**cfg.model_dump(exclude={"device"}), "precision": str(dtype)},
                          (train_set.images, train_set.labels, val_set.images, val_set.labels),
                          device)
        saved = resumable(checkpoint, run)
        if saved is not None:
            try:
                history = restore(saved, model, run_state, cfg.epochs)
                log.info("%s: resuming after epoch %d of %d", checkpoint, len(history),
                         cfg.epochs)
                for stats in history if on_epoch is not None else ():
                    on_epoch(stats)  # the restored epochs, so the caller sees every one
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                # Undo whatever was restored before the misfit was found.
                log.warning("%s: ignored, it does not fit this run (%s); training from scratch",
                            checkpoint, e)
                model.load_state_dict(initial)
                run_state = fresh_run(model, cfg, device, steps)
    optimizer, scheduler, generators, ema = run_state
    # Which images alternate flipping odd/even epochs: a function of train.seed alone, so it
    # needs no place in the checkpoint.
    alternate_base = (torch.rand(n, generator=torch.Generator().manual_seed(
        derived_seed(cfg.seed, 2))) < 0.5) if cfg.flip == "alternate" else None
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
            save_checkpoint(checkpoint, snapshot(history, model, run_state), run)
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
