"""A training run's state besides the weights: the optimizer, the learning-rate schedule, every
random stream it draws from and the weight average; made fresh at a run's start, saved whole
after each epoch, restored exactly, so that a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import torch

from fashionnet.average import WeightAverage
from fashionnet.model import FashionNet
from fashionnet.recipe import EpochStats, TrainConfig


def derived_seed(seed: int, stream: int) -> int:
    """A seed for the run's ``stream``-th extra random stream, apart from ``seed``'s own
    (two generators with the same seed would draw the same numbers)."""
    return (seed * 0x9E3779B1 + stream * 0x85EBCA77) % 2**63  # golden-ratio hashing


RunState = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                 dict[str, torch.Generator], WeightAverage | None]


def fresh_run(model: FashionNet, cfg: TrainConfig, device: torch.device,
               steps: int) -> RunState:
    """The optimizer, scheduler, seeded random streams and weight average of a run at its
    start; ``steps`` is the number of optimizer steps per epoch."""
    torch.manual_seed(cfg.seed)  # the default generators: dropout masks
    # Every random stream training draws from, saved and restored with each checkpoint.
    generators = {"torch": torch.default_generator,
                  "shuffle": torch.Generator().manual_seed(cfg.seed)}
    if cfg.flip in ("random", "random-except-footwear") or cfg.translate > 0:  # flips and shifts
        generators["augment"] = torch.Generator().manual_seed(derived_seed(cfg.seed, 1))
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


def snapshot(history: list[EpochStats], model: FashionNet, run_state: RunState) -> dict:
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


def restore(saved: dict, model: FashionNet, run_state: RunState,
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
