"""Prediction throughput: `fashionnet predict` on 10,000 PNG files and on one .npz, against the
usual way of doing it, measured in this one process on the same files and threads.

The reference is what a user would write: a Dataset that opens each file with Pillow,
``convert("L")`` and ``ToTensor``, a ``DataLoader`` with batch 64, the model in eval mode and a
softmax. The command's figures are ``pipeline.predict.run`` after start-up: finding the files,
reading and converting them, the model, and the CSV it writes. A separate figure is the whole
command in a fresh process, start-up included.

    python benchmarks/predict.py                 # ~1 minute on 2 cores
    python benchmarks/predict.py --images 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from throughput import timed  # benchmarks/throughput.py: the same best-of-N timer
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fashionnet import FashionNet, download
from fashionnet.data import LabeledImages, save_split
from fashionnet.idx import TEST_IMAGES, TEST_LABELS, load_idx_pair
from fashionnet.prediction import load_model
from pipeline import predict as command

REFERENCE_BATCH = 64


class PngFiles(Dataset):
    """The reference's dataset: each file opened with Pillow, greyscale, ToTensor."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.to_tensor = files, transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            return self.to_tensor(image.convert("L"))


@torch.no_grad()
def reference(model: FashionNet, files: list[Path]) -> np.ndarray:
    """(N,) predicted classes, the usual way."""
    model.eval()
    out = []
    for x in DataLoader(PngFiles(files), REFERENCE_BATCH):
        out.append(torch.softmax(model(x), dim=1).argmax(1))
    return torch.cat(out).numpy()


def test_set(raw_dir: Path, images: int) -> LabeledImages:
    """The first ``images`` official test images, from ``raw_dir`` or Debian's package."""
    found = [download.find_local(name, [raw_dir, download.DEBIAN_DIR])
             for name in (TEST_IMAGES, TEST_LABELS)]
    if None in found:
        sys.exit(f"the test set is not in {raw_dir} or {download.DEBIAN_DIR}: run "
                 "`fashionnet download` first")
    with tempfile.TemporaryDirectory() as scratch:
        for name, source in zip((TEST_IMAGES, TEST_LABELS), found, strict=True):
            download.install(scratch, name, download.read_verified(source, name))
        data = load_idx_pair(Path(scratch) / TEST_IMAGES, Path(scratch) / TEST_LABELS)
    return data.subset(np.arange(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--images", type=int, default=10_000, help="of the test set")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; best kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = test_set(args.raw_dir, args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as scratch:
        pngs = Path(scratch) / "pngs"
        pngs.mkdir()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: Image.fromarray(data.images[i].numpy()).save(
                pngs / f"{i:05d}.png"), range(len(data))))
        npz = Path(scratch) / "test.npz"
        save_split(npz, data, np.arange(len(data)))
        model_file = Path(scratch) / "fashionnet.pt"
        torch.manual_seed(0)  # the weights do not change the speed
        torch.save(FashionNet().state_dict(), model_file)
        files = sorted(pngs.iterdir())
        model = load_model(model_file)

        def run(path: Path) -> None:
            command.run([str(path)], model_file, fmt="csv", out=io.StringIO(),
                        err=io.StringIO())

        run(npz)  # warm-up: first calls into oneDNN and Pillow
        reference(model, files[:256])
        ref_s = timed(lambda: reference(model, files), args.repeats)
        png_s = timed(lambda: run(pngs), args.repeats)
        npz_s = timed(lambda: run(npz), args.repeats)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(pngs), "--model",
                        str(model_file), "--format", "csv"], check=True,
                       stdout=subprocess.DEVNULL)
        cold_s = time.perf_counter() - start

    n = len(data)
    print(f"{n} images, best of {args.repeats}; ratio against the reference")
    print(f"{'':44s}{'images/s':>10s}{'ratio':>8s}")
    for name, seconds in (("reference: Dataset + DataLoader(64), PNG", ref_s),
                          ("fashionnet predict, PNG files", png_s),
                          ("fashionnet predict, one .npz", npz_s),
                          ("fashionnet predict, PNG, with start-up", cold_s)):
        print(f"{name:44s}{n / seconds:10.0f}{ref_s / seconds:8.2f}")


if __name__ == "__main__":
    main()
