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

from fashionnet import report
from fashionnet.data import CLASSES, HISTORY_COLUMNS, SPLITS
from fashionnet.errors import DataError
from fashionnet.files import write_text
from pipeline import paths
from pipeline.params import Params, load_recipe


def run_description(info: dict, test_images: int) -> dict[str, str]:
    """What was run and on what, from models/train_info.json."""
    split, cfg = info["params"]["split"], info["params"]["train"]
    threads = f"{info['cpu_threads']} thread{'' if info['cpu_threads'] == 1 else 's'}"
    return {
        "data": f"Fashion-MNIST, {info['train_images']:,} training / {info['val_images']:,} "
                f"validation images (split seed {split['seed']}, limit {split['limit']}), "
                f"official {test_images:,}-image test set",
        "recipe": f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} "
                  f"weight decay {cfg['weight_decay']} amsgrad {cfg['amsgrad']}, "
                  + _schedule(cfg) + f", seed {cfg['seed']}" + _options(cfg),
        "machine": f"{info['device']} ({info['cpu']}, {threads}), "
                   f"{info['precision']} compute, torch {info['torch']}",
        "training time": f"{info['seconds']:.0f} s, started {info['started']}",
    }


_FIGURE = re.compile(r"!\[(?P<title>[^\]]*)\]\((?P<src>[^)\s:]+\.png)\)")


def embed_figures(markdown: str, directory: Path) -> str:
    """``markdown`` with each relative PNG figure, read from ``directory``, inlined as a data:
    URI: the Prefect UI shows an artifact in a browser that cannot reach the files."""

    def inline(match: re.Match[str]) -> str:
        png = (directory / match["src"]).read_bytes()
        return f"![{match['title']}](data:image/png;base64,{base64.b64encode(png).decode()})"

    return _FIGURE.sub(inline, markdown)


def _schedule(cfg: dict) -> str:
    schedule = cfg.get("schedule", "step")  # train_info.json files older than the option
    if schedule == "step":
        return f"StepLR step {cfg['step_size']} gamma {cfg['gamma']}"
    return {"cosine": "cosine decay per step", "onecycle": "one-cycle per step"}[schedule]


def _options(cfg: dict) -> str:
    """The recipe options that are on (docs/recipe.md), or nothing for the seed's recipe."""
    on = {"flip": cfg.get("flip", "none") != "none", "translate": cfg.get("translate", 0) > 0,
          "label_smoothing": cfg.get("label_smoothing", 0) > 0, "ema": cfg.get("ema", 0) > 0,
          "bn_recalibrate": cfg.get("bn_recalibrate", False)}
    shown = [f"{key} {cfg[key]}" for key, value in on.items() if value]
    return "; " + ", ".join(shown) if shown else ""


def read_recipe_runs(name: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """metrics/seeds-NAME.csv and metrics/seeds-NAME-recall.csv, None where missing or empty."""
    runs = read_seeds(paths.recipe_seeds(name))
    path = paths.recipe_recall(name)
    recall = (report.read_table(path, ["seed", *CLASSES], allow_empty=True)
              if path.exists() else None)
    return runs, None if recall is None or recall.empty else recall


def read_seeds(path: Path = paths.SEEDS) -> pd.DataFrame | None:
    """metrics/seeds.csv (`fashionnet seeds`): None when it is missing or has no rows yet;
    refused (DataError) when it has rows the report cannot use."""
    if not path.exists():
        return None
    frame = report.read_table(path, report.SEED_COLUMNS, allow_empty=True)
    return None if frame.empty else frame


def read_sweep(path: Path = paths.SWEEP) -> pd.DataFrame | None:
    """metrics/sweep.csv (`fashionnet sweep`): None when it is missing or has no rows yet;
    refused (DataError) when it has rows the report cannot use."""
    if not path.exists():
        return None
    frame = report.read_table(path, report.SWEEP_COLUMNS, text=["experiment", "device"],
                              allow_empty=True)
    return None if frame.empty else frame


@flow(name="report")
def report_flow(params: Params) -> Path:
    """The accuracy and per-class tables beside the seed's, learning curves, confusion matrix."""
    history = report.read_table(paths.HISTORY, list(HISTORY_COLUMNS))
    accuracy = report.read_table(paths.ACCURACY, ["split", "accuracy", "loss"], text=["split"])
    if sorted(accuracy["split"]) != sorted(SPLITS):
        raise DataError(paths.ACCURACY, f"rows must be {', '.join(SPLITS)}, got "
                                        f"{', '.join(map(str, accuracy['split']))}")
    per_class = report.read_table(paths.CLASS_REPORT,
                                  ["class", "precision", "recall", "f1-score", "support"],
                                  text=["class"])
    predictions = report.read_table(paths.PREDICTIONS, ["index", "actual", "predicted"])
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
    report.plot_learning_curves(history, paths.LEARNING_CURVES)
    report.plot_confusion_matrix(predictions["actual"].to_numpy(),
                                 predictions["predicted"].to_numpy(), paths.CONFUSION_MATRIX)
    figures = {"Learning curves": paths.LEARNING_CURVES.name,
               "Test confusion matrix": paths.CONFUSION_MATRIX.name}
    recipe = {"epochs": info["params"]["train"]["epochs"],
              "limit": info["params"]["split"]["limit"]}
    name = paths.RECIPE_NAME
    recipe_file = paths.RECIPES_DIR / f"{name}.yaml"
    overrides = load_recipe(recipe_file) if recipe_file.exists() else None
    comparison = report.recipe_comparison_markdown(name, overrides, read_seeds(),
                                                   *read_recipe_runs(name), per_class)
    markdown = report.render_markdown(accuracy, per_class, figures, run, read_seeds(), recipe,
                                      read_sweep(), comparison, val_images=info["val_images"])
    write_text(paths.REPORT, markdown)
    create_markdown_artifact(embed_figures(markdown, paths.REPORTS_DIR), key="fashionnet-report",
                             description="FashionNet accuracy and per-class report")
    create_table_artifact(per_class.round(4).to_dict("records"), key="fashionnet-per-class",
                          description="Per-class test metrics")
    get_run_logger().info("report written to %s", paths.REPORT)
    return paths.REPORT
