"""Training and evaluation throughput: the reference recipe's usual loop against the engine.

Both run in this one process, on the same images and threads, in alternating rounds (each
round times every row once, the order reversed every other round), so each round's ratio
compares timings a few seconds apart and holds on a busy machine too; the table gives the
median over rounds and the range of the ratio. The reference is the reference recipe written
the usual way: torchvision's FashionMNIST with ``ToTensor``, a ``DataLoader`` with batch 64
(training, validation and evaluation), ``nn.Dropout``. The engine is
``fashionnet.train.train_epoch`` and ``fashionnet.evaluate.evaluate``. A training epoch counts
its validation pass, one image of validation per nine of training (the 54,000/6,000 split).

    python benchmarks/throughput.py                     # ~3 minutes on 2 cores
    python benchmarks/throughput.py --train-images 54000 --batch-sizes 64 128 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from fashionnet import download
from fashionnet.data import LabeledImages
from fashionnet.evaluate import evaluate
from fashionnet.idx import RAW_FILES, load_raw
from fashionnet.runtime import resolve_precision
from fashionnet.train import init_model, train_epoch

REFERENCE_BATCH = 64


def reference_model() -> nn.Module:
    """The reference's network as a plain ``nn.Sequential`` with ``nn.Dropout``."""
    model = nn.Sequential(
        nn.Conv2d(1, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.Dropout(0.5), nn.LeakyReLU(0.1),
        nn.Conv2d(24, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.Dropout(0.5), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(64 * 14 * 14, 10),
    )
    for conv in (model[0], model[4]):
        nn.init.kaiming_normal_(conv.weight)
        nn.init.zeros_(conv.bias)
    return model


def reference_train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                          loader: DataLoader) -> None:
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def reference_evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(loader.dataset)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The best of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def raw_directory(raw_dir: Path, scratch: Path) -> Path:
    """A directory with the four uncompressed official files, as torchvision expects them:
    ``raw_dir`` when it has them, else a verified copy from Debian's package."""
    if all((raw_dir / name).is_file() for name in RAW_FILES):
        return raw_dir
    for name in RAW_FILES:
        source = download.find_local(name, [raw_dir, download.DEBIAN_DIR])
        if source is None:
            sys.exit(f"{name} not found in {raw_dir} or {download.DEBIAN_DIR}: "
                     "run `fashionnet download` first")
        download.install(scratch, name, download.read_verified(source, name))
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--train-images", type=int, default=9000)
    parser.add_argument("--eval-images", type=int, default=10_000, help="of the test set")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256],
                        help="engine training batch sizes (the reference always uses 64)")
    native = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32", "bfloat16"] if native else ["float32"],
                        help="engine compute precisions (default: bfloat16 too where native)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds: each times every row once, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_train, n_val = args.train_images, max(args.train_images // 9, 1)

    with tempfile.TemporaryDirectory() as scratch:
        raw = raw_directory(args.raw_dir, Path(scratch) / "raw")
        official_train, official_test = load_raw(raw)
        tv_root = Path(scratch) / "torchvision"
        (tv_root / "FashionMNIST").mkdir(parents=True)
        (tv_root / "FashionMNIST" / "raw").symlink_to(raw.resolve())
        tv_train = datasets.FashionMNIST(tv_root, train=True, transform=transforms.ToTensor())
        tv_test = datasets.FashionMNIST(tv_root, train=False, transform=transforms.ToTensor())

    train_set = official_train.subset(np.arange(n_train))
    val_set = official_train.subset(np.arange(n_train, n_train + n_val))
    test = official_test.subset(np.arange(args.eval_images))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"data: {n_train} training + {n_val} validation images per epoch, "
          f"{len(test)} evaluation images; median of {args.repeats} alternating rounds")

    # The reference: DataLoader + ToTensor + nn.Dropout, batch 64 throughout.
    torch.manual_seed(0)
    ref = reference_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=1e-5, amsgrad=True)
    ref_train = DataLoader(Subset(tv_train, range(n_train)), REFERENCE_BATCH, shuffle=True)
    ref_val = DataLoader(Subset(tv_train, range(n_train, n_train + n_val)), REFERENCE_BATCH)
    ref_test = DataLoader(Subset(tv_test, range(len(test))), REFERENCE_BATCH)
    warm_up = DataLoader(Subset(tv_train, range(min(640, n_train))), REFERENCE_BATCH)
    reference_train_epoch(ref, ref_opt, warm_up)
    rows = {"reference (batch 64)": (
        lambda: (reference_train_epoch(ref, ref_opt, ref_train), reference_evaluate(ref, ref_val)),
        lambda: reference_evaluate(ref, ref_test))}
    for precision in args.precisions:
        dtype = resolve_precision(precision, torch.device("cpu"))
        for batch_size in args.batch_sizes:
            rows[f"engine (batch {batch_size}, {precision})"] = engine(
                train_set, val_set, test, batch_size, dtype)

    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for round_ in range(args.repeats):
        for name in list(rows) if round_ % 2 == 0 else reversed(rows):
            train_fn, eval_fn = rows[name]
            seconds[name].append((timed(train_fn, 1), timed(eval_fn, 1)))
    reference = seconds.pop("reference (batch 64)")
    print(f"{'':28s}{'train img/s':>12s}{'ratio':>8s}{'range':>12s}"
          f"{'eval img/s':>12s}{'ratio':>8s}{'range':>12s}")
    median_train, median_eval = (statistics.median(t[i] for t in reference) for i in (0, 1))
    print(f"{'reference (batch 64)':28s}{n_train / median_train:12.0f}{1:8.2f}{'-':>12s}"
          f"{len(test) / median_eval:12.0f}{1:8.2f}{'-':>12s}")
    for name, times in seconds.items():
        cells = []
        for i, images in ((0, n_train), (1, len(test))):
            # Each round's ratio: the reference's time over the engine's, timed moments apart.
            ratios = [r[i] / t[i] for r, t in zip(reference, times, strict=True)]
            cells.append(f"{images / statistics.median(t[i] for t in times):12.0f}"
                         f"{statistics.median(ratios):8.2f}"
                         f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>12s}")
        print(f"{name:28s}{''.join(cells)}")


def engine(train_set: LabeledImages, val_set: LabeledImages, test: LabeledImages,
           batch_size: int, dtype: torch.dtype = torch.float32
           ) -> tuple[Callable[[], object], Callable[[], object]]:
    """The engine's (training epoch with validation, evaluation), set up as ``train()`` sets
    them up and warmed up."""
    model = init_model(0).to(memory_format=torch.channels_last)  # as train() sets it up
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5, amsgrad=True)
    x_all, y_all = train_set.images, train_set.labels  # uint8, as train() keeps them
    train_epoch(model, optimizer, x_all, y_all, torch.arange(min(640, len(train_set))),
                batch_size, dtype=dtype)  # warm-up
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        order = torch.randperm(len(train_set), generator=generator)
        train_epoch(model, optimizer, x_all, y_all, order, batch_size, dtype=dtype)
        evaluate(model, val_set, dtype=dtype)

    return epoch, lambda: evaluate(model, test, dtype=dtype)


if __name__ == "__main__":
    main()
