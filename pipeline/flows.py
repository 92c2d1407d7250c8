"""One Prefect flow per DVC stage. Each is a thin entry point: params in, library call,
outputs written atomically. ``dvc.yaml`` runs them through the ``fashionnet`` CLI."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from fashionnet import FashionNet, download, report
from fashionnet.data import RAW_FILES, LabeledImages, load_raw, load_split, save_split
from fashionnet.data import stratified_split as split_indices
from fashionnet.errors import DataError
from fashionnet.evaluate import SplitResult, evaluate, per_class_report
from fashionnet.files import atomic_path, write_text
from fashionnet.train import EpochStats, init_model, resolve_device, train
from pipeline import paths
from pipeline.params import DownloadConfig, Params

SPLITS = ("train", "val", "test")


# --- download -----------------------------------------------------------------------------

def _network_error(task, task_run, state) -> bool:
    """Retry a download only for network trouble, not for a file that fails verification."""
    try:
        state.result()
    except DataError:
        return False
    except Exception:
        return True
    return False


@task(cache_policy=NO_CACHE)
def copy_local(name: str, source: Path) -> Path:
    """Verify a local copy (plain or .gz) and install it into data/raw/."""
    get_run_logger().info("%s: from %s", name, source)
    return download.install(paths.RAW_DIR, name, download.read_verified(source, name))


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=_network_error)
def fetch_remote(name: str, mirrors: tuple[str, ...]) -> Path:
    """Download from the first mirror that answers; only this touches the network."""
    logger = get_run_logger()
    errors = []
    for mirror in mirrors:
        logger.info("%s: downloading from %s", name, mirror)
        try:
            data = download.fetch(name, mirror)
        except DataError:
            raise
        except Exception as e:  # network trouble: try the next mirror, then retry the task
            errors.append(f"{mirror}: {e!r}")
            continue
        return download.install(paths.RAW_DIR, name, data)
    raise ConnectionError(f"{name}: no mirror could be reached: " + "; ".join(errors))


def local_sources(cfg: DownloadConfig) -> list[Path]:
    """Directories searched before the network, in order."""
    named = os.environ.get("FASHIONNET_SOURCE_DIR") or cfg.source_dir
    return [Path(d) for d in (named, download.DEBIAN_DIR) if d]


@flow(name="download")
def download_flow(params: Params) -> list[Path]:
    """The four official IDX files into data/raw/, verified, each written atomically."""
    logger = get_run_logger()
    written = []
    for name in RAW_FILES:
        target = paths.RAW_DIR / name
        if download.is_official(target, name):
            logger.info("%s: already present and verified", name)
            written.append(target)
            continue
        source = download.find_local(name, local_sources(params.download))
        if source is not None:
            written.append(copy_local(name, source))
        else:
            written.append(fetch_remote(name, params.download.mirrors))
    return written


# --- split --------------------------------------------------------------------------------

@flow(name="split")
def split_flow(params: Params) -> dict[str, int]:
    """Stratified train/validation split of the official training set, plus the test set."""
    train_full, test = load_raw(paths.RAW_DIR)
    train_idx, val_idx = split_indices(train_full.labels.numpy(), params.split)
    parts = {
        "train": (train_full.subset(train_idx), train_idx),
        "val": (train_full.subset(val_idx), val_idx),
        "test": (test, torch.arange(len(test)).numpy()),
    }
    for name, (data, index) in parts.items():
        save_split(paths.PREPARED[name], data, index)
    sizes = {name: len(data) for name, (data, _) in parts.items()}
    get_run_logger().info("split sizes: %s", sizes)
    return sizes


# --- train --------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def load_prepared(name: str) -> LabeledImages:
    return load_split(paths.PREPARED[name])


@task(cache_policy=NO_CACHE)
def fit(model: FashionNet, train_set: LabeledImages, val_set: LabeledImages,
        params: Params) -> list[EpochStats]:
    return train(model, train_set, val_set, params.train)


@flow(name="train")
def train_flow(params: Params) -> list[EpochStats]:
    """Train FashionNet; write models/fashionnet.pt, metrics/history.csv, models/train_info.json."""
    cfg = params.train
    started = datetime.now(timezone.utc)
    train_set, val_set = load_prepared("train"), load_prepared("val")
    device = resolve_device(cfg.device)
    model = init_model(cfg.seed)
    history = fit(model, train_set, val_set, params)
    with atomic_path(paths.MODEL) as tmp:
        torch.save(model.cpu().state_dict(), tmp)
    frame = pd.DataFrame([vars(s) for s in history])
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    write_text(paths.HISTORY, frame[columns].to_csv(index=False))
    info = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(sum(s.seconds for s in history), 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "params": params.model_dump(include={"split", "train"}),
    }
    write_text(paths.TRAIN_INFO, json.dumps(info, indent=2) + "\n")
    return history


# --- evaluate -----------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def evaluate_split(model: FashionNet, data: LabeledImages, device: str) -> SplitResult:
    return evaluate(model, data, device)


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict[str, float]:
    """Loss and accuracy on train, val and test (eval mode); per-class report; predictions."""
    device = resolve_device(params.train.device)
    model = FashionNet()
    model.load_state_dict(torch.load(paths.MODEL, map_location="cpu", weights_only=True))
    model.to(device)
    data = {name: load_prepared(name) for name in SPLITS}
    results = {name: evaluate_split(model, data[name], str(device)) for name in SPLITS}
    accuracy = {name: r.accuracy for name, r in results.items()}
    metrics = {"accuracy": accuracy, "loss": {name: r.loss for name, r in results.items()}}
    write_text(paths.METRICS_JSON, json.dumps(metrics, indent=2) + "\n")
    table = pd.DataFrame({"split": list(SPLITS), "accuracy": list(accuracy.values()),
                          "loss": list(metrics["loss"].values())})
    write_text(paths.ACCURACY, table.to_csv(index=False))
    test_labels = data["test"].labels.numpy()
    test_predictions = results["test"].predictions
    write_text(paths.CLASS_REPORT,
               per_class_report(test_labels, test_predictions).to_csv(index=False))
    predictions = pd.DataFrame({"index": range(len(test_labels)), "actual": test_labels,
                                "predicted": test_predictions})
    write_text(paths.PREDICTIONS, predictions.to_csv(index=False))
    get_run_logger().info("accuracy: %s", {k: round(v, 4) for k, v in accuracy.items()})
    return accuracy


# --- report -------------------------------------------------------------------------------

@flow(name="report")
def report_flow(params: Params) -> Path:
    """reports/report.md with its figures, and the same tables as Prefect artifacts."""
    history = pd.read_csv(paths.HISTORY)
    accuracy = pd.read_csv(paths.ACCURACY)
    per_class = pd.read_csv(paths.CLASS_REPORT)
    predictions = pd.read_csv(paths.PREDICTIONS)
    info = json.loads(paths.TRAIN_INFO.read_text())
    report.plot_learning_curves(history, paths.LEARNING_CURVES)
    report.plot_confusion_matrix(predictions["actual"].to_numpy(),
                                 predictions["predicted"].to_numpy(), paths.CONFUSION_MATRIX)
    split, cfg = info["params"]["split"], info["params"]["train"]
    run = {
        "data": f"Fashion-MNIST, {info['train_images']:,} training / {info['val_images']:,} "
                f"validation images (split seed {split['seed']}, limit {split['limit']}), "
                f"official {len(predictions):,}-image test set",
        "recipe": f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} "
                  f"weight decay {cfg['weight_decay']} amsgrad {cfg['amsgrad']}, StepLR "
                  f"{cfg['step_size']}/{cfg['gamma']}, seed {cfg['seed']}",
        "machine": f"{info['device']} ({info['cpu']}, {info['cpu_threads']} threads), "
                   f"torch {info['torch']}",
        "training time": f"{info['seconds']:.0f} s, started {info['started']}",
    }
    figures = {"Learning curves": paths.LEARNING_CURVES.name,
               "Test confusion matrix": paths.CONFUSION_MATRIX.name}
    markdown = report.render_markdown(accuracy, per_class, figures, run)
    write_text(paths.REPORT, markdown)
    create_markdown_artifact(markdown, key="fashionnet-report",
                             description="FashionNet accuracy and per-class report")
    create_table_artifact(per_class.round(4).to_dict("records"), key="fashionnet-per-class",
                          description="Per-class test metrics")
    get_run_logger().info("report written to %s", paths.REPORT)
    return paths.REPORT


STAGES = {
    "download": download_flow,
    "split": split_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "report": report_flow,
}
