"""Stage `split`: stratified train/validation split + the official test set."""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from fashionnet import download
from fashionnet.data import save_split
from fashionnet.errors import DataError
from fashionnet.idx import RAW_FILES, load_raw
from fashionnet.split import stratified_split
from pipeline import paths
from pipeline.params import Params


@flow(name="split")
def split_flow(params: Params) -> dict[str, int]:
    """data/prepared/{train,val,test}.npz; each keeps its images' index in the source file."""
    train_full, test = load_raw(paths.RAW_DIR)  # well-formed IDX files that belong together
    for name in RAW_FILES:  # and the official release, not some other well-formed data
        if not download.is_official(paths.RAW_DIR / name, name):
            raise DataError(paths.RAW_DIR / name, f"is well formed but not the official {name} "
                                                  "(SHA-256 differs); run `fashionnet download`")
    train_idx, val_idx = stratified_split(train_full.labels.numpy(), params.split)
    parts = {
        "train": (train_full.subset(train_idx), train_idx),
        "val": (train_full.subset(val_idx), val_idx),
        "test": (test, np.arange(len(test))),
    }
    for name, (data, index) in parts.items():
        save_split(paths.PREPARED[name], data, index)
    sizes = {name: len(data) for name, (data, _) in parts.items()}
    get_run_logger().info("split sizes: %s", sizes)
    return sizes
