"""Stage `split`: stratified train/validation split + the official test set, and the incoming
batches (data/incoming/) added to training, less each batch's held-out share.

Validation and test never change: every version of the model is measured on the same
yardsticks. Without incoming batches the outputs are byte for byte those of the official data
alone.
"""

from __future__ import annotations

import numpy as np
import torch
from prefect import flow, get_run_logger

from fashionnet import download
from fashionnet.data import LabeledImages, save_split
from fashionnet.errors import DataError
from fashionnet.idx import RAW_FILES, load_raw
from fashionnet.incoming import holdout_index, load_batch
from fashionnet.split import stratified_split
from pipeline import manifest, paths
from pipeline.params import Params


def _join(train: LabeledImages, index: np.ndarray, batches: list[str], params: Params
          ) -> dict[str, dict[str, np.ndarray]]:
    """The training split with each batch's training share appended, and the held-out shares:
    {"train": arrays, "incoming": arrays} for data/prepared/{train,incoming}.npz. ``source``:
    -1 for an official image, else the position of its batch in ``batches``."""
    parts = {"train": [(train.images.numpy(), train.labels.numpy().astype(np.uint8),
                        index, np.full(len(index), -1))], "incoming": []}
    for k, batch in enumerate(batches):
        images, labels = load_batch(paths.INCOMING_DIR / f"{batch}.npz")
        held = holdout_index(batch, len(images), params.incoming.holdout, params.split.seed)
        kept = np.setdiff1d(np.arange(len(images)), held)
        for name, rows in (("train", kept), ("incoming", held)):
            parts[name].append((images[rows], labels[rows], rows, np.full(len(rows), k)))
    return {name: {key: np.concatenate([p[i] for p in found]) if found else np.empty(0)
                   for i, key in enumerate(("images", "labels", "index", "source"))}
            for name, found in parts.items()}


def _save(name: str, arrays: dict[str, np.ndarray], batches: list[str]) -> int:
    data = LabeledImages(torch.from_numpy(arrays["images"].reshape(-1, 28, 28)),
                         torch.from_numpy(arrays["labels"].astype(np.int64)))
    save_split(paths.PREPARED_DIR / f"{name}.npz", data, arrays["index"],
               source=arrays["source"].astype(np.int16), batches=np.array(batches))
    return len(data)


@flow(name="split")
def split_flow(params: Params) -> dict[str, int]:
    """data/prepared/{train,val,test}.npz, each keeping its images' index in the source file;
    with incoming batches, also incoming.npz (their held-out images)."""
    train_full, test = load_raw(paths.RAW_DIR)  # well-formed IDX files that belong together
    for name in RAW_FILES:  # and the official release, not some other well-formed data
        if not download.is_official(paths.RAW_DIR / name, name):
            raise DataError(paths.RAW_DIR / name, f"is well formed but not the official {name} "
                                                  "(SHA-256 differs); run `fashionnet download`")
    train_idx, val_idx = stratified_split(train_full.labels.numpy(), params.split)
    batches = manifest.read(paths.MANIFEST)["batch"].tolist()
    for name, (data, index) in {"val": (train_full.subset(val_idx), val_idx),
                                "test": (test, np.arange(len(test)))}.items():
        save_split(paths.PREPARED[name], data, index)
    sizes = {"val": len(val_idx), "test": len(test)}
    if batches:
        for name, arrays in _join(train_full.subset(train_idx), train_idx, batches,
                                  params).items():
            sizes[name] = _save(name, arrays, batches)
    else:  # the official data alone, as before incoming data existed
        save_split(paths.PREPARED["train"], train_full.subset(train_idx), train_idx)
        paths.INCOMING_HOLDOUT.unlink(missing_ok=True)
        sizes["train"] = len(train_idx)
    get_run_logger().info("split sizes: %s (%d incoming batches)", sizes, len(batches))
    return sizes
