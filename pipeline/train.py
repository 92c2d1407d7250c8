"""Stage `train`: FashionNet with the reference recipe (and the options params.yaml turns on)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from fashionnet import FashionNet
from fashionnet.data import HISTORY_COLUMNS, LabeledImages, load_split
from fashionnet.files import atomic_path, write_text
from fashionnet.recipe import EpochStats, TrainConfig
from fashionnet.runtime import describe_device, resolve_device, resolve_precision
from fashionnet.train import init_model, train
from pipeline import paths
from pipeline.params import Params

PROGRESS_KEY = "fashionnet-train-progress"


def write_history(history: list[EpochStats]) -> None:
    """metrics/history.csv, one row per epoch so far, atomically (`dvc plots show` reads it
    while training runs)."""
    frame = pd.DataFrame([vars(s) for s in history], columns=list(HISTORY_COLUMNS))
    write_text(paths.HISTORY, frame[list(HISTORY_COLUMNS)].to_csv(index=False))


@task(cache_policy=NO_CACHE)
def fit(model: FashionNet, train_set: LabeledImages, val_set: LabeledImages,
        cfg: TrainConfig, checkpoint: Path) -> list[EpochStats]:
    """Train, and after each epoch rewrite metrics/history.csv and update the run's progress
    artifact (the Prefect UI's progress bar)."""
    progress = create_progress_artifact(0.0, key=PROGRESS_KEY,
                                        description=f"training: 0 of {cfg.epochs} epochs")
    done: list[EpochStats] = []

    def on_epoch(stats: EpochStats) -> None:
        done.append(stats)
        write_history(done)
        update_progress_artifact(
            progress, 100 * stats.epoch / cfg.epochs,
            description=f"training: {stats.epoch} of {cfg.epochs} epochs, validation "
                        f"accuracy {stats.val_accuracy:.2%}")

    return train(model, train_set, val_set, cfg, checkpoint, on_epoch=on_epoch)


def save_model(model: FashionNet, path: Path) -> None:
    """``model``'s state_dict at ``path``, atomically; the file's bytes depend on the weights
    alone. (Given a path, torch.save names the archive's folder in the file after it, here a
    random temporary name, so every run wrote a file of its own md5; given a file, "archive".)"""
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        torch.save(model.cpu().state_dict(), file)


@flow(name="train")
def train_flow(params: Params) -> list[EpochStats]:
    """models/fashionnet.pt (state_dict), metrics/history.csv, models/train_info.json."""
    cfg = params.train
    started = datetime.now(timezone.utc)
    train_set, val_set = load_split(paths.PREPARED["train"]), load_split(paths.PREPARED["val"])
    device = resolve_device(cfg.device)
    model = init_model(cfg.seed)
    history = fit(model, train_set, val_set, cfg, paths.CHECKPOINT)
    save_model(model, paths.MODEL)
    write_history(history)
    info = {  # what the report states about the run
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(sum(s.seconds for s in history), 1),
        "device": describe_device(device),
        "precision": str(resolve_precision(cfg.precision, device)).removeprefix("torch."),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "params": params.model_dump(include={"split", "train"}),
    }
    write_text(paths.TRAIN_INFO, json.dumps(info, indent=2) + "\n")
    # Every output is written: the checkpoint's work is done. (Were this line not reached, a
    # rerun would resume the final checkpoint, train no further and write the same outputs.)
    paths.CHECKPOINT.unlink(missing_ok=True)
    return history
