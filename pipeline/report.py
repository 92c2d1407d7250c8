"""Stage `report`: reports/report.md and its figures, also published as Prefect artifacts."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fashionnet.checked_csv import read_table
from fashionnet.data import CLASSES, HISTORY_COLUMNS, SPLITS
from fashionnet.errors import DataError
from fashionnet.figures import plot_confusion_matrix, plot_learning_curves
from fashionnet.files import write_text
from fashionnet.report import DEMO_COLUMNS, SEED_COLUMNS, SWEEP_COLUMNS
from pipeline import paths
from pipeline.params import Params
from pipeline.report_text import render_markdown, run_description

_FIGURE = re.compile(r"!\[(?P<title>[^\]]*)\]\((?P<src>[^)\s:]+\.png)\)")


def embed_figures(markdown: str, directory: Path) -> str:
    """``markdown`` with each relative PNG figure, read from ``directory``, inlined as a data:
    URI: the Prefect UI shows an artifact in a browser that cannot reach the files."""

    def inline(match: re.Match[str]) -> str:
        png = (directory / match["src"]).read_bytes()
        return f"![{match['title']}](data:image/png;base64,{base64.b64encode(png).decode()})"

    return _FIGURE.sub(inline, markdown)


def read_seeds(path: Path = paths.SEEDS) -> pd.DataFrame | None:
    """metrics/seeds.csv (`fashionnet seeds`): None when it is missing or has no rows yet;
    refused (DataError) when it has rows the report cannot use."""
    if not path.exists():
        return None
    frame = read_table(path, SEED_COLUMNS, allow_empty=True)
    return None if frame.empty else frame


def read_sweep(path: Path = paths.SWEEP) -> pd.DataFrame | None:
    """metrics/sweep.csv (`fashionnet sweep`): None when it is missing or has no rows yet;
    refused (DataError) when it has rows the report cannot use."""
    if not path.exists():
        return None
    frame = read_table(path, SWEEP_COLUMNS, text=["experiment", "device"], allow_empty=True)
    return None if frame.empty else frame


def read_demo(path: Path = paths.RETRAINING_DEMO) -> pd.DataFrame | None:
    """The retraining demonstration's versions: None when it has not run (no file, or its
    header only); refused (DataError) when its rows are not what it writes."""
    if not path.exists():
        return None
    frame = read_table(path, DEMO_COLUMNS, text=["version", "outcome", "experiment"],
                       allow_empty=True, optional=["incoming_accuracy", "drift_accuracy"])
    return None if frame.empty else frame


@flow(name="report")
def report_flow(params: Params) -> Path:
    """The accuracy and per-class tables beside the reference result, the spread over training
    seeds, the last sweep, learning curves and the confusion matrix."""
    history = read_table(paths.HISTORY, list(HISTORY_COLUMNS))
    accuracy = read_table(paths.ACCURACY, ["split", "accuracy", "loss"], text=["split"])
    if sorted(accuracy["split"]) not in (sorted(SPLITS), sorted([*SPLITS, "incoming"])):
        raise DataError(paths.ACCURACY, f"rows must be {', '.join(SPLITS)} (and incoming), got "
                                        f"{', '.join(map(str, accuracy['split']))}")
    per_class = read_table(paths.CLASS_REPORT,
                           ["class", "precision", "recall", "f1-score", "support"], text=["class"])
    predictions = read_table(paths.PREDICTIONS, ["index", "actual", "predicted"])
    classes = predictions[["actual", "predicted"]].to_numpy()
    if not (np.equal(np.mod(classes, 1), 0) & (classes >= 0) & (classes < len(CLASSES))).all():
        raise DataError(paths.PREDICTIONS, "actual and predicted must be class indices 0..9")
    try:
        info = json.loads(paths.TRAIN_INFO.read_text(encoding="utf-8"))
        run = run_description(info, len(predictions))
    except FileNotFoundError:
        raise DataError(paths.TRAIN_INFO, "file not found (run `fashionnet train`)") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(paths.TRAIN_INFO, f"not valid JSON ({type(e).__name__})") from None
    except (KeyError, TypeError) as e:
        raise DataError(paths.TRAIN_INFO, f"lacks what the report states ({e!r})") from None
    plot_learning_curves(history, paths.LEARNING_CURVES)
    plot_confusion_matrix(predictions["actual"].to_numpy(), predictions["predicted"].to_numpy(),
                          paths.CONFUSION_MATRIX)
    figures = {"Learning curves": paths.LEARNING_CURVES.name,
               "Test confusion matrix": paths.CONFUSION_MATRIX.name}
    recipe = {"epochs": info["params"]["train"]["epochs"],
              "limit": info["params"]["split"]["limit"]}
    markdown = render_markdown(accuracy, per_class, figures, run, read_seeds(), recipe,
                               read_sweep(), read_demo(), val_images=info["val_images"])
    write_text(paths.REPORT, markdown)
    create_markdown_artifact(embed_figures(markdown, paths.REPORTS_DIR), key="fashionnet-report",
                             description="FashionNet accuracy and per-class report")
    create_table_artifact(per_class.round(4).to_dict("records"), key="fashionnet-per-class",
                          description="Per-class test metrics")
    get_run_logger().info("report written to %s", paths.REPORT)
    return paths.REPORT
