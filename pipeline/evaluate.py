"""Stage `evaluate`: loss and accuracy on train, val and test (and on the incoming batches'
held-out images, when there are any); per-class report; predictions."""

from __future__ import annotations

import json

import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fashionnet import FashionNet
from fashionnet.checkpoint import load_weights
from fashionnet.data import SPLITS, LabeledImages, load_split
from fashionnet.evaluate import SplitResult, evaluate, per_class_report
from fashionnet.files import write_text
from fashionnet.runtime import resolve_device, resolve_precision
from pipeline import paths
from pipeline.params import Params


@task(cache_policy=NO_CACHE, task_run_name="evaluate-{name}")
def evaluate_split(model: FashionNet, name: str, data: LabeledImages,
                   device: torch.device, dtype: torch.dtype, tta: bool) -> SplitResult:
    return evaluate(model, data, device, dtype=dtype, tta=tta)


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict[str, float]:
    """metrics/{metrics.json, accuracy.csv, classification_report.csv, predictions.csv}."""
    device = resolve_device(params.train.device)
    dtype = resolve_precision(params.train.precision, device)  # as in training
    model = load_weights(paths.MODEL, FashionNet())
    model.to(device, memory_format=torch.channels_last)  # the fast layout for the convolutions
    data = {name: load_split(paths.PREPARED[name]) for name in SPLITS}
    if paths.INCOMING_HOLDOUT.exists():  # incoming batches: their held-out images, if any
        held = load_split(paths.INCOMING_HOLDOUT, allow_empty=True)
        data.update({"incoming": held} if len(held) else {})
    results = {name: evaluate_split(model, name, images, device, dtype, params.evaluate.tta)
               for name, images in data.items()}
    accuracy = {name: r.accuracy for name, r in results.items()}
    loss = {name: r.loss for name, r in results.items()}
    write_text(paths.METRICS_JSON,
               json.dumps({"accuracy": accuracy, "loss": loss}, indent=2) + "\n")
    table = pd.DataFrame({"split": list(data), "accuracy": accuracy.values(),
                          "loss": loss.values()})
    write_text(paths.ACCURACY, table.to_csv(index=False))
    labels, predicted = data["test"].labels.numpy(), results["test"].predictions
    write_text(paths.CLASS_REPORT, per_class_report(labels, predicted).to_csv(index=False))
    predictions = pd.DataFrame({"index": range(len(labels)), "actual": labels,
                                "predicted": predicted})
    write_text(paths.PREDICTIONS, predictions.to_csv(index=False))
    get_run_logger().info("accuracy: %s", {k: round(v, 4) for k, v in accuracy.items()})
    return accuracy
