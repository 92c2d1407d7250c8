"""The spread over training seeds: the recipe once per ``train.seed``, as DVC experiments.

`fashionnet seeds` runs one experiment per seed, ``seed-N`` (pipeline/experiments.py: one after
another, ``jobs`` at a time through DVC's queue, or on a work pool), and writes their accuracies
and training times to metrics/seeds.csv, one row per seed, which the report stage turns into a
mean ± standard deviation table. Seeds already run on this commit are not run again.

The experiment with params.yaml's own ``train.seed`` is then applied to the workspace (`dvc exp
apply`), so dvc.lock and the metrics files record that run, and `dvc repro` brings the report up
to date: what is left is to commit. Without the own seed among ``seeds`` nothing is applied.
(DVC rewrites params.yaml in its own layout for `-S`; when the values are the same, the file's
own layout and comments are put back.) A failed run fails the flow and leaves the workspace and
metrics/seeds.csv as they were. Since `dvc exp apply` overwrites tracked files, the flow refuses
to start, and to apply, while tracked files have uncommitted changes.

With ``--recipe recipes/NAME.yaml`` (:func:`pipeline.params.load_recipe`) every experiment
also gets the recipe's overrides and is named ``NAME-seed-N``; the results go to
metrics/seeds-NAME.csv (the columns of metrics/seeds.csv) and metrics/seeds-NAME-recall.csv
(test recall per class), and nothing is applied: the workspace keeps params.yaml's recipe.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from fashionnet.data import CLASSES
from fashionnet.errors import ConfigError
from fashionnet.files import write_bytes, write_text
from pipeline import experiments, paths
from pipeline.experiments import Experiment, Result, seed_name
from pipeline.params import PARAMS_FILE, load_params, load_recipe, recipe_name
from pipeline.workspace import (
    describe_changes,
    dvc,
    head_commit,
    uncommitted_changes,
    workspace_lock,
)

FLOW_NAME = "fashionnet-seeds"
COLUMNS = ["seed", "experiment", "train_accuracy", "val_accuracy", "test_accuracy",
           "train_seconds", "epochs", "limit", "device", "precision", "threads"]
EXTRA_SEEDS = (1, 2, 3)  # after params.yaml's train.seed, when no seeds are given


class UncommittedChanges(RuntimeError):
    """Tracked files differ from git HEAD; `dvc exp apply` would overwrite them."""


def seed_row(seed: int, result: Result) -> dict[str, Any]:
    """A metrics/seeds.csv row."""
    made = result.info["params"]  # the params that made the model, as train_info records them
    return {"seed": seed, "experiment": result.name,
            "train_accuracy": result.row["accuracy.train"],
            "val_accuracy": result.row["accuracy.val"],
            "test_accuracy": result.row["accuracy.test"],
            "train_seconds": result.info["seconds"], "epochs": made["train"]["epochs"],
            "limit": made["split"]["limit"], "device": result.info["device"],
            "precision": result.info["precision"], "threads": result.info["cpu_threads"]}


def recall_row(seed: int, result: Result) -> dict[str, Any]:
    """The run's test recall per class, from its metrics/classification_report.csv."""
    report = pd.read_csv(StringIO(result.read(str(paths.CLASS_REPORT))))
    recall = dict(zip(report["class"], report["recall"], strict=True))
    return {"seed": seed, "experiment": result.name, **{name: recall[name] for name in CLASSES}}


def plan(seeds: list[int] | None = None, recipe: str | None = None
         ) -> tuple[list[int], list[Experiment], str | None, bool]:
    """The seeds (default params.yaml's train.seed, then 1, 2, 3), their experiments, the named
    recipe's name, and whether the own seed's run will be applied to the workspace. A bad seed
    or recipe raises ConfigError naming it, and uncommitted changes that the apply would
    overwrite raise UncommittedChanges: before anything runs, not after hours of training."""
    own = load_params().train.seed
    seeds = list(dict.fromkeys(seeds or [own, *EXTRA_SEEDS]))
    overrides, label = {}, None
    if recipe is not None:
        label, overrides = recipe_name(recipe), load_recipe(recipe)
        if "train.seed" in overrides:
            raise ConfigError(f"{recipe}: train.seed", "is set per run by `fashionnet seeds`; "
                                                       "remove it from the recipe")
    runs = [Experiment(seed_name(s, label), {**overrides, "train.seed": s}) for s in seeds]
    for run in runs:  # each validated as params.yaml would be
        load_params(overrides=run.overrides)
    apply = recipe is None and own in seeds
    if apply:
        _refuse_changes(": commit or stash them first (`dvc exp apply` at the end would "
                        "overwrite them)")
    return seeds, runs, label, apply


def _refuse_changes(when: str) -> None:
    if changed := uncommitted_changes():  # `dvc exp apply` would overwrite them silently
        raise UncommittedChanges(f"uncommitted changes to {describe_changes(changed)}{when}")


@flow(name=FLOW_NAME)
def seeds_flow(seeds: list[int] | None = None, jobs: int = 1, threads: int | None = None,
               pool: str | None = None, recipe: str | None = None) -> pd.DataFrame:
    """Train the recipe once per seed as DVC experiments; metrics/seeds.csv and the report.

    Args:
        seeds: train.seed values, default params.yaml's train.seed then 1, 2, 3.
        jobs: experiments run at a time.
        threads: torch CPU threads per experiment (OMP_NUM_THREADS); default torch's own.
        pool: a Prefect work pool whose workers run the experiments instead of this machine.
        recipe: a named recipe file (recipes/NAME.yaml) of overrides: its runs go to
            metrics/seeds-NAME.csv and metrics/seeds-NAME-recall.csv, nothing is applied.
    """
    own = load_params().train.seed
    seeds, runs, label, apply = plan(seeds, recipe)
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs and threads must be at least 1, got {jobs} and {threads}")
    with workspace_lock("seeds"):
        baseline = head_commit()  # the runs are filed under it, wherever HEAD is when they end
        if pool:
            from pipeline.pool import run_on_pool

            run_on_pool(runs, pool, baseline)
        else:
            experiments.run(runs, baseline, jobs=jobs, threads=threads)
        results = experiments.collect(runs, baseline)
        frame = pd.DataFrame([seed_row(s, r) for s, r in zip(seeds, results, strict=True)],
                             columns=COLUMNS)
        if apply:
            _apply(seed_name(own), baseline)
        table = paths.SEEDS if label is None else paths.recipe_seeds(label)
        write_text(table, frame.to_csv(index=False))
        if label is not None:
            recall = pd.DataFrame([recall_row(s, r) for s, r in zip(seeds, results, strict=True)],
                                  columns=["seed", "experiment", *CLASSES])
            write_text(paths.recipe_recall(label), recall.to_csv(index=False))
        if apply:
            dvc("repro")  # only the report is stale: it reads metrics/seeds.csv
        else:  # the workspace may never have run: `dvc repro` could mean hours of training
            get_run_logger().info("%s written; `dvc repro` rebuilds the report with it", table)
    create_table_artifact(frame.round(4).to_dict("records"),
                          key="fashionnet-seeds" + (f"-{label}" if label else ""),
                          description="Accuracy per training seed" + (
                              f", recipe {recipe}" if recipe else ""))
    summary = frame[["train_accuracy", "val_accuracy", "test_accuracy"]].agg(["mean", "std"])
    get_run_logger().info("accuracy over %d seeds (mean, std):\n%s", len(seeds),
                          summary.round(4))
    return frame


def _apply(name: str, baseline: str) -> None:
    """`dvc exp apply name` onto the workspace, which must still be at ``baseline``, clean;
    params.yaml keeps its own layout and comments where its values are the same."""
    if head_commit() != baseline:
        raise RuntimeError(f"HEAD moved from {baseline[:7]} to {head_commit()[:7]} while the "
                           f"runs ran: not applying {name} onto another commit; "
                           f"`dvc exp show --rev {baseline[:7]}` lists the runs")
    _refuse_changes(f" made while the runs ran: not applying {name} over them; commit or "
                    f"stash, then `dvc exp apply {name}` and `dvc repro`")
    before = PARAMS_FILE.read_bytes()
    dvc("exp", "apply", name)
    if yaml.safe_load(PARAMS_FILE.read_bytes()) == yaml.safe_load(before):
        write_bytes(PARAMS_FILE, before)
