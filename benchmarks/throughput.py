"""Training and evaluation throughput: the seed-style reference loop against the engine.

Both run in this one process, on the same images and threads, so their ratio holds on a busy
machine too. The reference is the seed's recipe written the usual way: torchvision's
FashionMNIST with ``ToTensor``, a ``DataLoader`` with batch 64 (training, validation and
evaluation), ``nn.Dropout``. The engine is ``fashionnet.train.train_epoch`` and
``fashionnet.evaluate.evaluate``. A training epoch counts its validation pass, one image of
validation per nine of training (the 54,000/6,000 split).

    python benchmarks/throughput.py                     # ~1 minute on 2 cores
    python benchmarks/throughput.py --train-images 54000 --batch-sizes 64 128 256
"""

from __future__ import annotations

import argparse
import os
import platform
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
    """The seed's network as a plain ``nn.Sequential`` with ``nn.Dropout``."""
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
    parser.add_argument("--repeats", type=int, default=1, help="timings per figure; best kept")
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
          f"{len(test)} evaluation images; best of {args.repeats}")

    # The reference: DataLoader + ToTensor + nn.Dropout, batch 64 throughout.
    torch.manual_seed(0)
    ref = reference_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=1e-5, amsgrad=True)
    ref_train = DataLoader(Subset(tv_train, range(n_train)), REFERENCE_BATCH, shuffle=True)
    ref_val = DataLoader(Subset(tv_train, range(n_train, n_train + n_val)), REFERENCE_BATCH)
    ref_test = DataLoader(Subset(tv_test, range(len(test))), REFERENCE_BATCH)
    warm_up = DataLoader(Subset(tv_train, range(min(640, n_train))), REFERENCE_BATCH)
    reference_train_epoch(ref, ref_opt, warm_up)
    ref_epoch = timed(lambda: (reference_train_epoch(ref, ref_opt, ref_train),
                               reference_evaluate(ref, ref_val)), args.repeats)
    ref_eval = timed(lambda: reference_evaluate(ref, ref_test), args.repeats)
    ref_train_ips, ref_eval_ips = n_train / ref_epoch, len(test) / ref_eval
    print(f"{'':28s}{'train img/s':>12s}{'ratio':>8s}{'eval img/s':>12s}{'ratio':>8s}")
    print(f"{'reference (batch 64)':28s}{ref_train_ips:12.0f}{1:8.2f}{ref_eval_ips:12.0f}{1:8.2f}")

    for precision in args.precisions:
        dtype = resolve_precision(precision, torch.device("cpu"))
        for batch_size in args.batch_sizes:
            train_ips, eval_ips = engine_throughput(train_set, val_set, test, batch_size,
                                                    args.repeats, dtype)
            name = f"engine (batch {batch_size}, {precision})"
            print(f"{name:28s}{train_ips:12.0f}{train_ips / ref_train_ips:8.2f}"
                  f"{eval_ips:12.0f}{eval_ips / ref_eval_ips:8.2f}")


def engine_throughput(train_set: LabeledImages, val_set: LabeledImages, test: LabeledImages,
                      batch_size: int, repeats: int,
                      dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(training images/s with validation, evaluation images/s) of the engine."""
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

    train_ips = len(train_set) / timed(epoch, repeats)
    return train_ips, len(test) / timed(lambda: evaluate(model, test, dtype=dtype), repeats)

if __name__ == "__main__":
    main()
