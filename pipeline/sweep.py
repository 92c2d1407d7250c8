"""A grid of params as DVC experiments, on this machine or fanned out to a Prefect work pool.

`fashionnet sweep -S KEY=V1,V2,... [-S ...]` runs every combination of the values, as
`dvc exp run --queue -S` does for lists, one named experiment per grid point
(``lr-0.001_epochs-1``). Points whose experiment already exists on the commit are not run
again, so a sweep that stopped halfway is finished by running it again.

- Without ``pool``: DVC's local queue (`dvc exp run --queue`, then `--run-all -j JOBS`).
- With ``pool``: HEAD must be on the git remote and its outputs on the DVC remote (else exit 2
  and what to run). The deployment in prefect.yaml (`experiment`) is registered as
  `fashionnet-experiment/POOL`; one flow run per point goes to the pool (`run_deployment`),
  whichever worker takes it clones the commit, runs and pushes the experiment
  (pipeline/experiment.py). The sweep waits for all, `dvc exp pull`s them back. Runs that end
  Failed or Crashed are named and the sweep fails; Ctrl-C cancels the runs it submitted.

With ``--recipe recipes/NAME.yaml`` every point starts from that named recipe's overrides
(the grid's own keys win) and its experiment is named ``NAME_<point>``.

Either way, metrics/sweep.csv gets one row per point (name, the swept params, accuracies,
training time); the report stage shows it; commit it with the experiments you keep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import dvc.api
import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from fashionnet.errors import ConfigError, InputError
from fashionnet.files import write_text
from pipeline import paths
from pipeline.dvc import (
    GIT_REMOTE,
    commit_on_remote,
    default_dvc_remote,
    git,
    head_commit,
    local_experiments,
    remote_experiments,
    remote_url,
    run_dvc,
    unshared_outputs,
    workspace_lock,
)
from pipeline.experiment import COMMIT_ENV, GIT_REMOTE_ENV
from pipeline.experiment import FLOW_NAME as EXPERIMENT_FLOW
from pipeline.params import load_params, load_recipe, recipe_name

FLOW_NAME = "fashionnet-sweep"
PREFECT_FILE = Path("prefect.yaml")
DEPLOYMENT_ENTRY = "experiment"  # the prefect.yaml deployment each pool gets a copy of
METRIC_COLUMNS = ["train_accuracy", "val_accuracy", "test_accuracy", "test_loss",
                  "train_seconds", "device"]  # after the experiment's name and its params
POLL_SECONDS = 2.0  # how often the states of the submitted runs are read
MAX_NAME = 60  # longer experiment names are cut and made unique by a hash


class NotShared(InputError):
    """The commit or its data is not where the workers fetch them from."""


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


def sweep_points(grid: Mapping[str, Sequence[Any]], recipe: Mapping[str, Any] | None = None,
                 recipe_label: str | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The grid's points by experiment name, and each one's overrides: the named recipe's
    (``recipe``, its experiments' names prefixed ``recipe_label_``) with the point's on top."""
    points = {}
    for point in grid_points(grid):
        name = experiment_name(point)
        points[f"{recipe_label}_{name}" if recipe_label else name] = point
    return points, {name: {**(recipe or {}), **point} for name, point in points.items()}


def experiment_name(point: Mapping[str, Any]) -> str:
    """A readable, git-ref-safe name for the point: ``lr-0.001_epochs-1``."""
    short = [key.rsplit(".", 1)[-1] for key in point]
    labels = short if len(set(short)) == len(short) else [k.replace(".", "-") for k in point]
    name = "_".join(f"{label}-{value if isinstance(value, str) else json.dumps(value)}"
                    for label, value in zip(labels, point.values(), strict=True))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).replace("..", ".").strip(".-")
    if len(name) > MAX_NAME:  # git refs have no length limit, but people read these
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def check_shared(commit: str, remote: str = GIT_REMOTE) -> str:
    """Refuse (NotShared) unless ``commit`` is on git remote ``remote`` and the outputs its
    dvc.lock names are on the default DVC remote; the git remote's URL."""
    url = remote_url(remote)
    if url is None:
        raise NotShared(f"no git remote {remote!r}: run `git remote add {remote} URL` and "
                        "`git push`")
    if urlsplit(url).password:
        raise NotShared(f"git remote {remote}'s URL holds a password, which each run would "
                        "carry in its job variables: use SSH or a git credential helper "
                        "(docs/distributed.md)")
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    if changed:
        raise NotShared(f"uncommitted changes to {changed[0][3:]}: the workers run commit "
                        f"{commit[:7]}; commit and `git push` them first")
    if not commit_on_remote(commit, remote):
        branch = git("branch", "--show-current").strip() or "HEAD"
        raise NotShared(f"commit {commit[:7]} is not on git remote {remote}: run "
                        f"`git push {remote} {branch}`")
    if default_dvc_remote() is None:
        raise NotShared("no default DVC remote: run `dvc remote add -d NAME URL` "
                        "(docs/distributed.md)")
    missing = unshared_outputs()
    if missing:
        raise NotShared(f"the DVC remote lacks {', '.join(sorted(missing))} of commit "
                        f"{commit[:7]}: run `dvc push`")
    return url


def deployment_entry(path: Path = PREFECT_FILE) -> dict[str, Any]:
    """The ``experiment`` deployment of prefect.yaml."""
    for entry in yaml.safe_load(path.read_text(encoding="utf-8"))["deployments"]:
        if entry["name"] == DEPLOYMENT_ENTRY:
            return entry
    raise RuntimeError(f"{path} has no deployment named {DEPLOYMENT_ENTRY!r}")


def deploy(pool: str) -> str:
    """prefect.yaml's ``experiment`` deployment on work pool ``pool``, created or updated as
    fashionnet-experiment/POOL; its name. `prefect deploy` keeps one pool per deployment
    name, and concurrent sweeps to other pools must not move each other's deployment."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from pipeline.experiment import experiment_flow

    entry = deployment_entry()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise NotShared(f"no work pool {pool!r} on the Prefect server: run `prefect "
                            f"work-pool create {pool} --type process` and start a worker"
                            ) from None
        flow_id = client.create_flow_from_name(EXPERIMENT_FLOW)
        client.create_deployment(
            flow_id=flow_id, name=pool, work_pool_name=pool,
            entrypoint=entry["entrypoint"], pull_steps=entry["pull"],
            description=entry.get("description"), job_variables=entry.get("job_variables"),
            parameter_openapi_schema=parameter_schema(experiment_flow).model_dump_for_openapi(),
            enforce_parameter_schema=True)
    return f"{EXPERIMENT_FLOW}/{pool}"


def submit(deployment: str, points: Mapping[str, Mapping[str, Any]], commit: str, url: str,
           runs: dict[str, UUID]) -> dict[str, UUID]:
    """One flow run of ``deployment`` per point, without waiting, each added to ``runs``
    ({name: flow run id}) as soon as it exists, so that an interrupt can cancel it."""
    from prefect.deployments import run_deployment

    env = {**(deployment_entry().get("job_variables") or {}).get("env", {}),
           GIT_REMOTE_ENV: url, COMMIT_ENV: commit}
    for name, overrides in points.items():
        run = run_deployment(deployment, parameters={"name": name, "overrides": dict(overrides),
                                                     "commit": commit},
                             flow_run_name=name, timeout=0, job_variables={"env": env},
                             tags=["fashionnet-sweep"])
        runs[name] = run.id
    return runs


def wait(runs: Mapping[str, UUID]) -> dict[str, str]:
    """Wait until every run is in a final state; {name: state name}. (`run_deployment` waits
    for one run; a sweep waits for all at once and reports each change.)"""
    from prefect.client.orchestration import get_client

    logger = get_run_logger()
    seen: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            states = {name: client.read_flow_run(run_id).state for name, run_id in runs.items()}
            for name, state in states.items():
                if state is not None and seen.get(name) != state.name:
                    logger.info("%s: %s", name, state.name)
                    seen[name] = state.name
            if all(state is not None and state.is_final() for state in states.values()):
                return seen
            time.sleep(POLL_SECONDS)


def cancel(runs: Mapping[str, UUID]) -> list[str]:
    """Cancel the runs not yet final; their names. A run no worker has taken is Cancelled at
    once; a started one is set Cancelling, as `prefect flow-run cancel` does, and its worker
    stops it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    cancelled = []
    with get_client(sync_client=True) as client:
        for name, run_id in runs.items():
            state = client.read_flow_run(run_id).state
            if state is None or not state.is_final():
                new = Cancelled() if state is None or state.is_scheduled() else Cancelling()
                client.set_flow_run_state(run_id, new, force=True)
                cancelled.append(name)
    return cancelled


def run_on_pool(points: Mapping[str, Mapping[str, Any]], pool: str) -> None:
    """Each point as an experiment on a worker of ``pool``, those already on the git remote
    skipped; then every point's experiment pulled back (`dvc exp pull`). A run that does not
    complete fails the call, naming it."""
    logger = get_run_logger()
    commit = head_commit()
    url = check_shared(commit)
    done = remote_experiments(commit)
    todo = {name: point for name, point in points.items() if name not in done}
    if len(todo) < len(points):
        logger.info("already on git remote %s: %s", GIT_REMOTE,
                    ", ".join(name for name in points if name in done))
    if todo:
        deployment = deploy(pool)
        runs: dict[str, UUID] = {}
        try:
            submit(deployment, todo, commit, url, runs)
            logger.info("submitted %d runs of %s to pool %s at commit %s", len(runs),
                        deployment, pool, commit[:7])
            states = wait(runs)
        except BaseException:  # Ctrl-C or a failure of the sweep itself: stop what it started
            stopped = cancel(runs)
            if stopped:
                logger.warning("cancelled %s", ", ".join(stopped))
            raise
        unfinished = [f"{name} ({state})" for name, state in states.items()
                      if state != "Completed"]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} of {len(runs)} runs did not finish: "
                               f"{', '.join(unfinished)}; the finished ones are on the "
                               "remotes, running the same command again runs only these")
    run_dvc("exp", "pull", GIT_REMOTE, *points)


def run_locally(points: Mapping[str, Mapping[str, Any]], jobs: int, baseline: str) -> None:
    """Each point not yet an experiment on commit ``baseline`` (HEAD when the sweep began)
    queued in DVC's local queue, then the queue run ``jobs`` at a time."""
    from pipeline.experiment import set_param_args

    done = local_experiments(baseline)
    todo = {name: point for name, point in points.items() if name not in done}
    for name, overrides in todo.items():
        run_dvc("exp", "run", "--queue", "-n", name, *set_param_args(overrides))
    if todo:
        run_dvc("exp", "run", "--run-all", "--jobs", str(jobs))
    missing = set(points) - local_experiments(baseline)
    if missing:
        raise RuntimeError(f"no finished experiment {', '.join(sorted(missing))}; "
                           "see `dvc queue logs <name>`")


def sweep_row(name: str, point: Mapping[str, Any], experiment: Mapping[str, Any]
              ) -> dict[str, Any]:
    """A metrics/sweep.csv row from a `dvc exp show` row and the run's train_info.json."""
    info = json.loads(dvc.api.read(str(paths.TRAIN_INFO), rev=experiment["rev"]))
    recipe = info["params"]

    def param(key: str) -> Any:  # the value that made the model, as train_info records it
        section, _, field = key.partition(".")
        return recipe.get(section, {}).get(field, experiment.get(key, point[key]))

    return {"experiment": name, **{key: param(key) for key in point},
            "train_accuracy": experiment["accuracy.train"],
            "val_accuracy": experiment["accuracy.val"],
            "test_accuracy": experiment["accuracy.test"], "test_loss": experiment["loss.test"],
            "train_seconds": info["seconds"], "device": info["device"]}


@task(cache_policy=NO_CACHE)
def collect(points: Mapping[str, Mapping[str, Any]], baseline: str = "HEAD") -> pd.DataFrame:
    """One row per point, from its experiment on commit ``baseline`` (`dvc exp show`)."""
    rows = {row.get("Experiment"): row for row in dvc.api.exp_show(revs=baseline)}
    keys = list(next(iter(points.values())))
    return pd.DataFrame([sweep_row(name, point, rows[name]) for name, point in points.items()],
                        columns=["experiment", *keys, *METRIC_COLUMNS])


@flow(name=FLOW_NAME)
def sweep_flow(grid: dict[str, list[Any]], pool: str | None = None,
               jobs: int = 1, recipe: str | None = None) -> pd.DataFrame:
    """Every combination of ``grid``'s values as a DVC experiment; metrics/sweep.csv.

    Args:
        grid: {"train.lr": [0.001, 0.003], "train.epochs": [1, 2]}.
        pool: a Prefect work pool whose workers run the experiments; None for DVC's local
            queue on this machine.
        jobs: experiments run at a time by the local queue (without ``pool``).
        recipe: a named recipe file (recipes/NAME.yaml) whose overrides every point starts
            from (the grid's keys win); its experiments are named ``NAME_<point>``.
    """
    logger = get_run_logger()
    base = load_recipe(recipe) if recipe is not None else None
    points, overrides = sweep_points(grid, base, recipe_name(recipe) if recipe else None)
    with workspace_lock("sweep"):
        # The experiments are filed under this commit, wherever HEAD is when they end.
        baseline = head_commit()
        if pool:
            run_on_pool(overrides, pool)
        else:
            run_locally(overrides, jobs, baseline)
        frame = collect(points, baseline)
        write_text(paths.SWEEP, frame.to_csv(index=False))
    create_table_artifact(frame.round(4).to_dict("records"), key="fashionnet-sweep",
                          description="One row per grid point of the sweep")
    logger.info("%s written (%d runs); `dvc repro report` shows it in the report",
                paths.SWEEP, len(frame))
    return frame
