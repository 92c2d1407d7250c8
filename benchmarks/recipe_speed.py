"""Training speed of the recipe options against the reference recipe, in one process.

Each configuration trains the same epochs of ``fashionnet.train.train_epoch`` over the same
real images, interleaved and repeated; the best of the repeats is kept. Time is this process's
CPU time (``time.process_time``): with one thread, on a machine shared with other work, it
counts the work done, where wall-clock time counts the waiting for a core too. Per-step costs
measured: the flip and translation of each batch (on the device), label smoothing, a per-step
scheduler, the EMA update.

    OMP_NUM_THREADS=1 python benchmarks/recipe_speed.py          # ~1 minute
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashionnet.augment import draw_epoch
from fashionnet.data import load_split
from fashionnet.runtime import resolve_precision
from fashionnet.train import init_model, train_epoch
from pipeline import paths

CONFIGS = {
    "reference recipe": {},
    "flip + translate 1": {"flip": "random", "translate": 1},
    "flip + translate 2": {"flip": "random", "translate": 2},
    "all training options": {"flip": "random", "translate": 1, "label_smoothing": 0.1,
                             "cosine": True, "ema": 0.999},
}


def epoch_seconds(images: torch.Tensor, labels: torch.Tensor, options: dict,
                  batch_size: int, dtype: torch.dtype) -> float:
    """CPU seconds for one epoch of train_epoch over ``images`` with ``options``."""
    model = init_model(0).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5, amsgrad=True)
    n = len(images)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator)
    steps = -(-n // batch_size)
    start = time.process_time()
    augment = draw_epoch(options.get("flip", "none"), options.get("translate", 0), order, 1,
                         generator, None, torch.device("cpu"))
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
                 if options.get("cosine") else None)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(options["ema"]),
                         use_buffers=True) if options.get("ema") else None)
    train_epoch(model, optimizer, images, labels, order, batch_size, dtype=dtype,
                augment=augment, label_smoothing=options.get("label_smoothing", 0.0),
                step_scheduler=scheduler, ema=ema)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_split(paths.PREPARED["train"])
    images, labels = data.images[: args.images], data.labels[: args.images]
    dtype = resolve_precision("auto", torch.device("cpu"))
    epoch_seconds(images[:640], labels[:640], {}, args.batch_size, dtype)  # warm-up
    best = dict.fromkeys(CONFIGS, float("inf"))
    for _ in range(args.repeats):
        for name, options in CONFIGS.items():
            best[name] = min(best[name], epoch_seconds(images, labels, options,
                                                       args.batch_size, dtype))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{str(dtype).removeprefix('torch.')}, {args.images} images, batch {args.batch_size},"
          f" best of {args.repeats}, CPU time")
    reference = best["reference recipe"]
    for name, seconds in best.items():
        print(f"{name:22} {args.images / seconds:7.0f} images/s  {seconds / reference:.3f}x "
              "the reference recipe's time")


if __name__ == "__main__":
    main()
