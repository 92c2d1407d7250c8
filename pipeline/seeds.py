"""The spread over training seeds: the recipe once per ``train.seed``, as DVC experiments.

`fashionnet seeds` queues one DVC experiment per seed (`dvc exp run --queue -S train.seed=N
-n seed-N`) and runs the queue, ``jobs`` experiments at a time, each in its own temporary copy
of the workspace (`dvc exp run --run-all -j`); `dvc exp show` compares them afterwards. Their
accuracies and training times go to metrics/seeds.csv, one row per seed, which the report
stage turns into a mean ± standard deviation table beside the seed's single run.

The experiment with params.yaml's own ``train.seed`` is then applied to the workspace (`dvc
exp apply`), so dvc.lock and the metrics files record that run, and `dvc repro` brings the
report up to date: what is left is to commit. Without the own seed among ``seeds`` nothing is
applied and `dvc repro` is left to the user. (DVC rewrites params.yaml in its own layout
for `-S`; when the values are the same, the file's own layout and comments are put back.)
If a run fails, the flow fails and the workspace and metrics/seeds.csv are left as they were.
Since `dvc exp apply` overwrites tracked files, the flow refuses to start when tracked files
have uncommitted changes.

With ``--recipe recipes/NAME.yaml`` (a file of ``section.key: value`` overrides, see
:func:`pipeline.params.load_recipe`) every experiment also gets the recipe's ``-S`` overrides
and is named ``NAME-seed-N``; the results go to metrics/seeds-NAME.csv (the columns of
metrics/seeds.csv) and metrics/seeds-NAME-recall.csv (test recall per class), and nothing is
applied to the workspace: the committed reproduction stays params.yaml's recipe.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import dvc.api
import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from fashionnet.data import CLASSES
from fashionnet.errors import ConfigError
from fashionnet.files import write_bytes, write_text
from pipeline import paths
from pipeline.dvc import (
    describe_changes,
    head_commit,
    local_experiments,
    run_dvc,
    uncommitted_changes,
    workspace_lock,
)
from pipeline.experiment import set_param_args
from pipeline.params import PARAMS_FILE, load_params, load_recipe, recipe_name

FLOW_NAME = "fashionnet-seeds"
COLUMNS = ["seed", "experiment", "train_accuracy", "val_accuracy", "test_accuracy",
           "train_seconds", "epochs", "limit", "device", "precision", "threads"]
EXTRA_SEEDS = (1, 2, 3)  # after params.yaml's train.seed, when no seeds are given


class UncommittedChanges(RuntimeError):
    """Tracked files differ from git HEAD; `dvc exp apply` would overwrite them."""


def experiment_name(seed: int, recipe: str | None = None) -> str:
    return f"{recipe}-seed-{seed}" if recipe else f"seed-{seed}"


@task(cache_policy=NO_CACHE, task_run_name="queue-seed-{seed}")
def queue_experiment(seed: int, recipe: dict[str, object] | None = None,
                     recipe_label: str | None = None) -> str:
    """Queue the recipe (params.yaml with ``recipe``'s overrides) with ``train.seed`` =
    ``seed``; a finished experiment of the same name on this commit is replaced."""
    name = experiment_name(seed, recipe_label)
    if name in local_experiments():
        run_dvc("exp", "remove", name)
    run_dvc("exp", "run", "--queue", *set_param_args(recipe or {}), "-S", f"train.seed={seed}",
            "-n", name)
    return name


@task(cache_policy=NO_CACHE)
def run_queue(jobs: int, threads: int | None) -> None:
    """Run every queued experiment, ``jobs`` at a time, until the queue is empty."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    run_dvc("exp", "run", "--run-all", "--jobs", str(jobs), env=env)


def seed_row(seed: int, experiment: dict[str, Any]) -> dict[str, Any]:
    """A metrics/seeds.csv row from a `dvc exp show` row and the run's train_info.json."""
    info = json.loads(dvc.api.read(str(paths.TRAIN_INFO), rev=experiment["rev"]))
    recipe = info["params"]
    return {
        "seed": seed,
        "experiment": experiment["Experiment"],
        "train_accuracy": experiment["accuracy.train"],
        "val_accuracy": experiment["accuracy.val"],
        "test_accuracy": experiment["accuracy.test"],
        "train_seconds": info["seconds"],
        "epochs": recipe["train"]["epochs"],
        "limit": recipe["split"]["limit"],
        "device": info["device"],
        "precision": info["precision"],
        "threads": info["cpu_threads"],
    }


def recall_row(seed: int, experiment: dict[str, Any]) -> dict[str, Any]:
    """The run's test recall per class, from its metrics/classification_report.csv."""
    report = pd.read_csv(StringIO(dvc.api.read(str(paths.CLASS_REPORT), rev=experiment["rev"])))
    recall = dict(zip(report["class"], report["recall"], strict=True))
    return {"seed": seed, "experiment": experiment["Experiment"],
            **{name: recall[name] for name in CLASSES}}


@task(cache_policy=NO_CACHE)
def collect(seeds: list[int], recipe_label: str | None = None,
            baseline: str = "HEAD") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per seed from the finished experiments on commit ``baseline`` (`dvc exp
    show`): the metrics/seeds.csv columns, and test recall per class."""
    rows = {row.get("Experiment"): row for row in dvc.api.exp_show(revs=baseline)}
    names = {s: experiment_name(s, recipe_label) for s in seeds}
    missing = [name for name in names.values() if name not in rows]
    if missing:
        raise RuntimeError(f"no finished experiment {', '.join(missing)}; "
                           "see `dvc queue logs <name>`")
    frame = pd.DataFrame([seed_row(s, rows[names[s]]) for s in seeds], columns=COLUMNS)
    recall = pd.DataFrame([recall_row(s, rows[names[s]]) for s in seeds],
                          columns=["seed", "experiment", *CLASSES])
    return frame, recall


@flow(name=FLOW_NAME)
def seeds_flow(seeds: list[int] | None = None, jobs: int = 1,
               threads: int | None = None, pool: str | None = None,
               recipe: str | None = None) -> pd.DataFrame:
    """Train the recipe once per seed as DVC experiments; metrics/seeds.csv and the report.

    Args:
        seeds: train.seed values, default params.yaml's train.seed then 1, 2, 3.
        jobs: experiments run at a time.
        threads: torch CPU threads per experiment (OMP_NUM_THREADS); default torch's own.
        pool: a Prefect work pool whose workers run the experiments instead of DVC's local
            queue (pipeline/sweep.py); seeds whose experiment is already on the git remote
            are not run again.
        recipe: a named recipe file (recipes/NAME.yaml) of overrides: its runs go to
            metrics/seeds-NAME.csv and metrics/seeds-NAME-recall.csv, nothing is applied.
    """
    logger = get_run_logger()
    params = load_params()
    own = params.train.seed
    seeds = list(dict.fromkeys(seeds or [own, *EXTRA_SEEDS]))
    overrides, label = {}, None
    if recipe is not None:
        label = recipe_name(recipe)
        overrides = load_recipe(recipe)
        if "train.seed" in overrides:
            raise ConfigError(f"{recipe}: train.seed", "is set per run by `fashionnet seeds`; "
                                                       "remove it from the recipe")
    for seed in seeds:  # validated as params.yaml would be, before anything is queued
        load_params(overrides={**overrides, "train.seed": seed})
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs and threads must be at least 1, got {jobs} and {threads}")
    apply = recipe is None and own in seeds
    changed = uncommitted_changes() if apply else []
    if changed:  # refused now, not after hours of training
        raise UncommittedChanges(f"uncommitted changes to {describe_changes(changed)}: commit "
                                 "or stash them first "
                                 "(`dvc exp apply` at the end would overwrite them)")
    with workspace_lock("seeds"):
        # The experiments are filed under this commit, wherever HEAD is when they end.
        baseline = head_commit()
        if pool:
            from pipeline.sweep import run_on_pool

            run_on_pool({experiment_name(s, label): {**overrides, "train.seed": s}
                         for s in seeds}, pool)
        else:
            for seed in seeds:
                queue_experiment(seed, overrides, label)
            run_queue(jobs, threads)
        frame, recall = collect(seeds, label, baseline)
        if apply:
            if head_commit() != baseline:
                raise RuntimeError(
                    f"HEAD moved from {baseline[:7]} to {head_commit()[:7]} while the runs ran: "
                    f"not applying {experiment_name(own)} onto another commit; "
                    f"`dvc exp show --rev {baseline[:7]}` lists the runs")
            changed = uncommitted_changes()
            if changed:  # `dvc exp apply` would overwrite them without a word
                raise UncommittedChanges(
                    f"{describe_changes(changed)} changed while the runs ran: not applying "
                    f"{experiment_name(own)} over them; commit or stash, then "
                    f"`dvc exp apply {experiment_name(own)}` and `dvc repro`")
            before = PARAMS_FILE.read_bytes()
            run_dvc("exp", "apply", experiment_name(own))
            if yaml.safe_load(PARAMS_FILE.read_bytes()) == yaml.safe_load(before):
                write_bytes(PARAMS_FILE, before)  # the same values: keep its comments, layout
        table = paths.SEEDS if label is None else paths.recipe_seeds(label)
        write_text(table, frame.to_csv(index=False))
        if label is not None:
            write_text(paths.recipe_recall(label), recall.to_csv(index=False))
        if apply:
            run_dvc("repro")  # only the report is stale: it reads metrics/seeds.csv
        else:  # the workspace may never have run: `dvc repro` could mean hours of training
            logger.info("%s written; `dvc repro` rebuilds the report with it", table)
    create_table_artifact(frame.round(4).to_dict("records"),
                          key="fashionnet-seeds" + (f"-{label}" if label else ""),
                          description="Accuracy per training seed" + (
                              f", recipe {recipe}" if recipe else ""))
    summary = frame[["train_accuracy", "val_accuracy", "test_accuracy"]].agg(["mean", "std"])
    logger.info("accuracy over %d seeds (mean, std):\n%s", len(seeds), summary.round(4))
    return frame
