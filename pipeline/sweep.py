"""A grid of params as DVC experiments, on this machine or on the workers of a Prefect work pool.

`fashionnet sweep -S KEY=V1,V2,... [-S ...]` runs every combination of the values, as
`dvc exp run --queue -S` does for lists, one named experiment per grid point
(``lr-0.001_epochs-1``; pipeline/experiments.py runs them, ``--pool`` on a work pool through
pipeline/pool.py). Points already run on this commit are not run again, so a sweep that stopped
half-way is finished by running it again. With ``--recipe recipes/NAME.yaml`` every point starts
from that named recipe's overrides (the grid's own keys win) and is named ``NAME_<point>``.

metrics/sweep.csv gets one row per point (name, the swept params, accuracies, training time);
the report stage shows it; commit it with the experiments you keep.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from fashionnet.errors import ConfigError
from fashionnet.files import write_text
from pipeline import experiments, paths
from pipeline.experiments import Experiment, Result, point_name
from pipeline.params import load_params, load_recipe, recipe_name
from pipeline.workspace import head_commit, workspace_lock

FLOW_NAME = "fashionnet-sweep"
METRIC_COLUMNS = ["train_accuracy", "val_accuracy", "test_accuracy", "test_loss",
                  "train_seconds", "device"]  # after the experiment's name and its params


def parse_grid(specs: Sequence[str],
               base: Mapping[str, Any] | None = None) -> dict[str, list[Any]]:
    """{"train.lr": [0.001, 0.003], ...} from ``KEY=V1,V2,...`` strings, each value read as
    YAML; every point, on top of the ``base`` overrides (a named recipe), is validated as
    params.yaml would be."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(spec, "not KEY=V1,V2,... (e.g. train.lr=0.001,0.003)")
        if key in grid:
            raise ConfigError(key, "given twice; list its values in one -S")
        try:
            grid[key] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError:
            raise ConfigError(key, f"{values!r} is not a list of YAML values") from None
    if not grid:
        raise ConfigError("-S", "no params to sweep: give -S KEY=V1,V2,...")
    for point in grid_points(grid):
        load_params(overrides={**(base or {}), **point})
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values, the first key's slowest, as DVC's queue orders them."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def sweep_runs(grid: Mapping[str, Sequence[Any]], recipe: Mapping[str, Any] | None = None,
               label: str | None = None) -> list[tuple[dict[str, Any], Experiment]]:
    """Each grid point with its experiment: named for the point (prefixed ``label_`` on a named
    recipe), its overrides the recipe's (``recipe``) with the point's on top."""
    return [(point, Experiment(point_name(point, label), {**(recipe or {}), **point}))
            for point in grid_points(grid)]


def sweep_row(point: Mapping[str, Any], result: Result) -> dict[str, Any]:
    """A metrics/sweep.csv row: the point's params as they made the model (train_info.json)."""
    made = result.info["params"]

    def param(key: str) -> Any:
        section, _, name = key.partition(".")
        return made.get(section, {}).get(name, result.row.get(key, point[key]))

    return {"experiment": result.name, **{key: param(key) for key in point},
            "train_accuracy": result.row["accuracy.train"],
            "val_accuracy": result.row["accuracy.val"],
            "test_accuracy": result.row["accuracy.test"], "test_loss": result.row["loss.test"],
            "train_seconds": result.info["seconds"], "device": result.info["device"]}


@flow(name=FLOW_NAME)
def sweep_flow(grid: dict[str, list[Any]], pool: str | None = None,
               jobs: int = 1, recipe: str | None = None) -> pd.DataFrame:
    """Every combination of ``grid``'s values as a DVC experiment; metrics/sweep.csv.

    Args:
        grid: {"train.lr": [0.001, 0.003], "train.epochs": [1, 2]}.
        pool: a Prefect work pool whose workers run the experiments; None for this machine.
        jobs: experiments run at a time on this machine (without ``pool``).
        recipe: a named recipe file (recipes/NAME.yaml) whose overrides every point starts
            from (the grid's keys win); its experiments are named ``NAME_<point>``.
    """
    base = load_recipe(recipe) if recipe is not None else None
    pairs = sweep_runs(grid, base, recipe_name(recipe) if recipe else None)
    runs = [run for _, run in pairs]
    with workspace_lock("sweep"):
        baseline = head_commit()  # the runs are filed under it, wherever HEAD is when they end
        if pool:
            from pipeline.pool import run_on_pool

            run_on_pool(runs, pool, baseline)
        else:
            experiments.run(runs, baseline, jobs=jobs)
        results = experiments.collect(runs, baseline)
        frame = pd.DataFrame([sweep_row(point, result) for (point, _), result
                              in zip(pairs, results, strict=True)],
                             columns=["experiment", *grid, *METRIC_COLUMNS])
        write_text(paths.SWEEP, frame.to_csv(index=False))
    create_table_artifact(frame.round(4).to_dict("records"), key="fashionnet-sweep",
                          description="One row per grid point of the sweep")
    get_run_logger().info("%s written (%d runs); `dvc repro report` shows it in the report",
                          paths.SWEEP, len(frame))
    return frame
