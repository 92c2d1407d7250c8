"""Stage `report`: reports/report.md and its figures, also published as Prefect artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fashionnet import report
from fashionnet.files import write_text
from pipeline import paths
from pipeline.params import Params


def run_description(info: dict, test_images: int) -> dict[str, str]:
    """What was run and on what, from models/train_info.json."""
    split, cfg = info["params"]["split"], info["params"]["train"]
    return {
        "data": f"Fashion-MNIST, {info['train_images']:,} training / {info['val_images']:,} "
                f"validation images (split seed {split['seed']}, limit {split['limit']}), "
                f"official {test_images:,}-image test set",
        "recipe": f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} "
                  f"weight decay {cfg['weight_decay']} amsgrad {cfg['amsgrad']}, StepLR "
                  f"step {cfg['step_size']} gamma {cfg['gamma']}, seed {cfg['seed']}",
        "machine": f"{info['device']} ({info['cpu']}, {info['cpu_threads']} threads), "
                   f"torch {info['torch']}",
        "training time": f"{info['seconds']:.0f} s, started {info['started']}",
    }


@flow(name="report")
def report_flow(params: Params) -> Path:
    """The accuracy and per-class tables beside the seed's, learning curves, confusion matrix."""
    history = pd.read_csv(paths.HISTORY)
    accuracy = pd.read_csv(paths.ACCURACY)
    per_class = pd.read_csv(paths.CLASS_REPORT)
    predictions = pd.read_csv(paths.PREDICTIONS)
    info = json.loads(paths.TRAIN_INFO.read_text(encoding="utf-8"))
    report.plot_learning_curves(history, paths.LEARNING_CURVES)
    report.plot_confusion_matrix(predictions["actual"].to_numpy(),
                                 predictions["predicted"].to_numpy(), paths.CONFUSION_MATRIX)
    figures = {"Learning curves": paths.LEARNING_CURVES.name,
               "Test confusion matrix": paths.CONFUSION_MATRIX.name}
    markdown = report.render_markdown(accuracy, per_class,
                                      figures, run_description(info, len(predictions)))
    write_text(paths.REPORT, markdown)
    create_markdown_artifact(markdown, key="fashionnet-report",
                             description="FashionNet accuracy and per-class report")
    create_table_artifact(per_class.round(4).to_dict("records"), key="fashionnet-per-class",
                          description="Per-class test metrics")
    get_run_logger().info("report written to %s", paths.REPORT)
    return paths.REPORT
