"""The report's words: what was run, each section's prose around the library's tables, and
the commands that fill the sections still empty. Each paragraph and list item is one line:
the Prefect UI renders each newline inside a paragraph as a line break."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from fashionnet.data import CLASSES
from fashionnet.reference import REFERENCE_ACCURACY, REFERENCE_PER_CLASS
from fashionnet.report import (
    accuracy_table,
    demo_table,
    markdown_table,
    per_class_table,
    seed_spread_table,
    sweep_table,
)


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


def _schedule(cfg: dict) -> str:
    schedule = cfg.get("schedule", "step")  # train_info.json files older than the option
    if schedule == "step":
        return f"StepLR step {cfg['step_size']} gamma {cfg['gamma']}"
    return {"cosine": "cosine decay per step", "onecycle": "one-cycle per step"}[schedule]


def _options(cfg: dict) -> str:
    """The recipe options that are on (docs/recipe.md), or nothing for the reference recipe."""
    on = {"flip": cfg.get("flip", "none") != "none", "translate": cfg.get("translate", 0) > 0,
          "label_smoothing": cfg.get("label_smoothing", 0) > 0, "ema": cfg.get("ema", 0) > 0,
          "bn_recalibrate": cfg.get("bn_recalibrate", False)}
    shown = [f"{key} {cfg[key]}" for key, value in on.items() if value]
    return "; " + ", ".join(shown) if shown else ""


def seed_spread_markdown(seeds: pd.DataFrame | None,
                         recipe: Mapping[str, int] | None = None) -> str:
    """The section on the spread over training seeds (metrics/seeds.csv); ``recipe`` holds the
    epochs and limit of the run this report is about, to flag seeds run with another recipe."""
    if seeds is None or seeds.empty:
        return ("No spread over training seeds is recorded (metrics/seeds.csv has no rows): "
                "`fashionnet seeds` runs the recipe once per seed and records it.")
    text = ("The recipe above, run once per `train.seed` as DVC experiments `seed-N` "
            "(`fashionnet seeds`, see `dvc exp show`); the split and everything else are the "
            "same. Standard deviation over runs, n - 1.\n\n"
            + markdown_table(seed_spread_table(seeds)))
    if recipe is None:
        return text
    other = seeds[(seeds["epochs"] != recipe["epochs"]) | (seeds["limit"] != recipe["limit"])]
    if not other.empty:
        text += (f"\n\n**Note**: {len(other)} of these runs used another recipe than this "
                 f"report's run (epochs {recipe['epochs']}, limit {recipe['limit']}): "
                 + ", ".join(f"seed {int(r.seed)}: epochs {int(r.epochs)}, limit {int(r.limit)}"
                             for r in other.itertuples()) + ".")
    return text


def sweep_markdown(sweep: pd.DataFrame | None) -> str:
    """The section on the last sweep (metrics/sweep.csv)."""
    if sweep is None or sweep.empty:
        return ("No sweep is recorded (metrics/sweep.csv has no rows): `fashionnet sweep -S "
                "KEY=V1,V2` runs a grid of params as DVC experiments and records it.")
    return ("The last `fashionnet sweep`, one DVC experiment per grid point (`dvc exp show`, "
            "`dvc exp apply NAME`); the best validation accuracy in bold. The test column only "
            "reports.\n\n" + markdown_table(sweep_table(sweep)))


def differences_markdown(accuracy: Mapping[str, float], test_images: int,
                         val_images: int) -> str:
    """Why this project's figures and the reference result cannot match exactly."""
    reference_images = int(REFERENCE_PER_CLASS["support"].sum())
    test = accuracy["test"]

    def stderr(n: int) -> float:  # binomial standard error of an accuracy on n images, points
        return (test * (1 - test) / n) ** 0.5 * 100

    per_class = round(reference_images / len(CLASSES), -2)
    items = [
        f"**Test set.** The reference's per-class support sums to {reference_images:,} images, "
        f"about {per_class:,.0f} a class: its test set was a {reference_images:,}-image subset "
        f"(or a split) of unknown selection. This project tests on the official "
        f"{test_images:,}-image test set, {test_images // len(CLASSES):,} a class. At this "
        f"accuracy, the sampling error alone is ±{stderr(reference_images):.2f} points on "
        f"{reference_images:,} images and ±{stderr(test_images):.2f} on {test_images:,} (one "
        f"standard error), so per-class figures, from about {per_class:,.0f} images each in "
        "the reference, can differ by a few hundredths from sampling alone.",
        "**Train and validation accuracy.** Here both are measured after training, in eval "
        "mode (BatchNorm running statistics, no dropout), over the whole split: "
        f"{accuracy['train']:.2%} train and {accuracy['val']:.2%} validation here, "
        f"{REFERENCE_ACCURACY['train']:.2%} and {REFERENCE_ACCURACY['val']:.2%} in the "
        "reference. The reference does not say how it measured them, nor how large its "
        "validation split was or how it was drawn. A train accuracy averaged over an epoch "
        "while training, with dropout active, comes out lower than an eval-mode one; this "
        f"project's validation split is {val_images:,} images, stratified, from the official "
        "training set.",
        "**Run to run.** Training is seeded and repeatable on one machine, but the spread over "
        "training seeds (above) is the yardstick for comparing one run with another: "
        "differences within about two standard deviations are noise, not an effect of the "
        "code.",
        "**Precision.** On CPUs with native bfloat16 (and on CUDA) the convolutions compute in "
        "bfloat16 (`train.precision: auto`, see *What was run*); `train.precision: float32` "
        "reproduces the reference's float32 arithmetic, more slowly.",
    ]
    return "\n".join(f"- {item}" for item in items)


def demo_markdown(demo: pd.DataFrame | None) -> str:
    """The section on the retraining demonstration (docs/retraining-demo.md)."""
    if demo is None:
        return ("The retraining demonstration has not run here: `python -m "
                "pipeline.prefect_server python docs/retraining-demo/demo.py` runs it "
                "(docs/retraining-demo.md).")
    first = int(demo["train_images"].iloc[0])
    return (f"A model trained on {first:,} official training images, then retrained after "
            f"each of {int(demo['batches'].max())} batches of new images, ingested as PNG files "
            "with `fashionnet ingest --push`; a copy of the third with shuffled labels was "
            "refused at ingest. The validation accuracy alone decides; validation and test "
            "are the same images for every row. Its recipe and run: docs/retraining-demo.md."
            "\n\n"
            + markdown_table(demo_table(demo)))


def render_markdown(accuracy: pd.DataFrame, report: pd.DataFrame,
                    figures: Mapping[str, str], run: Mapping[str, str],
                    seeds: pd.DataFrame | None = None,
                    recipe: Mapping[str, int] | None = None,
                    sweep: pd.DataFrame | None = None, demo: pd.DataFrame | None = None, *,
                    val_images: int) -> str:
    """reports/report.md: what was run (``run``), the accuracy and per-class tables beside the
    reference result, the spread over training seeds (``seeds``, metrics/seeds.csv;
    ``recipe``: this run's epochs and limit), the last sweep (``sweep``, metrics/sweep.csv),
    the retraining demonstration's versions (``demo``),
    why the figures differ from the reference's (``val_images``: the validation split's size),
    the figures (``figures``: title -> image URL, a relative path or a data: URI)."""
    run_lines = "\n".join(f"- **{key}**: {value}" for key, value in run.items())
    figure_lines = "\n\n".join(f"![{title}]({src})" for title, src in figures.items())
    by_split = accuracy.set_index("split")["accuracy"].to_dict()
    test_images = int(report[report["class"].isin(CLASSES)]["support"].sum())
    reference_images = int(REFERENCE_PER_CLASS["support"].sum())
    return f"""# FashionNet report

## What was run
{run_lines}

## Accuracy
Measured after training, in eval mode, over each whole split; beside it the reference result, \
the single run published by the specification this project reproduces.

{markdown_table(accuracy_table(accuracy))}

## Per-class test metrics
Each cell: this run (the reference's figure). The reference's support sums to \
{reference_images:,} test images; this project tests on the official {test_images:,}-image \
test set, {test_images // len(CLASSES):,} per class.

{markdown_table(per_class_table(report))}

## Spread over training seeds
{seed_spread_markdown(seeds, recipe)}

## Sweep
{sweep_markdown(sweep)}

## New data, version by version
{demo_markdown(demo)}

## Why these figures differ from the reference's
{differences_markdown(by_split, test_images, val_images)}

## Figures
{figure_lines}
"""
