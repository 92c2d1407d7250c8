"""One DVC experiment on whichever Prefect worker takes it, shared through the remotes.

The deployment (prefect.yaml, `fashionnet-experiment`) clones the git remote at an exact
commit in its pull step (Prefect's `git_clone`, the commit from the run's job variables), then
this flow, in that clone:

1. `dvc exp run --pull -n NAME -S KEY=VALUE ...`: the pipeline with the overrides, the data it
   needs pulled from the DVC remote instead of being made again;
2. `dvc exp push origin NAME`: the experiment's git ref to the git remote, its outputs to the
   default DVC remote;
3. a check that the experiment is on the git remote and its outputs on the DVC remote, since
   `dvc exp push` prints "No experiments to push" and still exits 0.

A run killed before step 2 leaves nothing on either remote: DVC writes an experiment's ref
and uploads its outputs only when it is pushed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import paths
from pipeline.dvc import (
    GIT_REMOTE,
    head_commit,
    remote_experiments,
    run_dvc,
    unshared_outputs,
)
from pipeline.params import load_params

FLOW_NAME = "fashionnet-experiment"
# The job variables' environment the deployment's pull step reads (prefect.yaml).
COMMIT_ENV, GIT_REMOTE_ENV = "FASHIONNET_COMMIT", "FASHIONNET_GIT_REMOTE"


class NotPushed(RuntimeError):
    """`dvc exp push` ended without the experiment on the remotes."""


def set_param_args(overrides: Mapping[str, Any]) -> list[str]:
    """``-S KEY=VALUE`` arguments for dvc, each value in JSON (which DVC reads as YAML)."""
    return [arg for key, value in overrides.items()
            for arg in ("-S", f"{key}={json.dumps(value)}")]


@task(cache_policy=NO_CACHE, task_run_name="dvc-exp-run-{name}")
def run_experiment(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`dvc exp run --pull` in the working directory; the experiment's metrics/metrics.json."""
    load_params(overrides=overrides)  # a bad key or value fails here, before any work
    run_dvc("exp", "run", "--pull", "-n", name, *set_param_args(overrides))
    return json.loads(paths.METRICS_JSON.read_text(encoding="utf-8"))


@task(cache_policy=NO_CACHE, task_run_name="dvc-exp-push-{name}")
def push_experiment(name: str, commit: str, remote: str = GIT_REMOTE) -> None:
    """`dvc exp push`, then a check that git remote ``remote`` lists the experiment and the
    default DVC remote holds its outputs."""
    run_dvc("exp", "push", remote, name)
    if name not in remote_experiments(commit, remote):
        raise NotPushed(f"`dvc exp push` ended but git remote {remote} has no experiment "
                        f"{name} on {commit[:7]}")
    missing = unshared_outputs()
    if missing:
        raise NotPushed(f"`dvc exp push` ended but the DVC remote lacks {', '.join(missing)}")
    get_run_logger().info("experiment %s is on git remote %s and its outputs on the DVC remote",
                          name, remote)


@flow(name=FLOW_NAME, flow_run_name="{name}")
def experiment_flow(name: str, overrides: dict[str, Any], commit: str) -> dict[str, Any]:
    """Run one DVC experiment in this clone and push it to the git and DVC remotes.

    Args:
        name: the experiment's name (`dvc exp run -n`).
        overrides: params.yaml keys for it, as `dvc exp run -S` sets them: {"train.lr": 0.001}.
        commit: the commit the pull step checked out; the run refuses any other.
    """
    if head_commit() != commit:
        raise RuntimeError(f"the working directory is at {head_commit()[:7]}, not {commit[:7]}:"
                           " the deployment's pull step must clone the commit")
    metrics = run_experiment(name, overrides)
    push_experiment(name, commit)
    get_run_logger().info("%s: test accuracy %.4f", name, metrics["accuracy"]["test"])
    return metrics
