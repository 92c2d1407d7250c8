"""Experiments on the workers of a Prefect work pool, shared through the git and DVC remotes.

The commit must be on the git remote and its outputs on the DVC remote (else NotShared, exit 2,
saying what to run). prefect.yaml's ``experiment`` deployment is registered per pool as
``fashionnet-experiment/POOL``; each experiment becomes one flow run of it (`run_deployment`),
and whichever worker takes it clones the commit (the deployment's pull step) and runs
:func:`experiment_flow` there: the experiment, then `dvc exp push`. The caller waits for every
run (Prefect's own ``wait_for_flow_run``), then `dvc exp pull`s them back. A run that ends
Failed or Crashed fails the call, naming it; an interrupt cancels the runs not yet final.
A run killed before its push leaves nothing on either remote.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import yaml
from prefect import flow, get_run_logger

from fashionnet.errors import InputError
from pipeline import experiments, paths
from pipeline.experiments import Experiment
from pipeline.workspace import (
    GIT_REMOTE,
    commit_on_remote,
    default_dvc_remote,
    dvc,
    git,
    head_commit,
    remote_url,
    show,
    uncommitted_changes,
    unshallow,
    unshared_outputs,
)

FLOW_NAME = "fashionnet-experiment"
PREFECT_FILE = Path("prefect.yaml")
DEPLOYMENT_ENTRY = "experiment"  # the prefect.yaml deployment each pool gets a copy of
# The job variables' environment the deployment's pull step reads (prefect.yaml).
COMMIT_ENV, GIT_REMOTE_ENV = "FASHIONNET_COMMIT", "FASHIONNET_GIT_REMOTE"
WAIT_TIMEOUT = 7 * 24 * 3600  # seconds: runs may wait long for a free worker


class NotShared(InputError):
    """The commit or its data is not where the workers fetch them from."""


@flow(name=FLOW_NAME, flow_run_name="{name}")
def experiment_flow(name: str, overrides: dict[str, Any], commit: str) -> dict[str, Any]:
    """On a worker, in the clone the pull step made: run one DVC experiment and push it to the
    git and DVC remotes; its metrics/metrics.json.

    Args:
        name: the experiment's name (`dvc exp run -n`).
        overrides: params.yaml keys for it, as `dvc exp run -S` sets them: {"train.lr": 0.001}.
        commit: the commit the pull step checked out; the run refuses any other.
    """
    if head_commit() != commit:
        raise RuntimeError(f"the working directory is at {head_commit()[:7]}, not {commit[:7]}:"
                           " the deployment's pull step must clone the commit")
    unshallow(GIT_REMOTE)
    experiments.run([Experiment(name, overrides)], commit, pull=True)
    pushed = experiments.push(name, commit, GIT_REMOTE)
    metrics = json.loads(show(pushed, paths.METRICS_JSON) or "{}")
    get_run_logger().info("%s is on git remote %s and its outputs on the DVC remote; test "
                          "accuracy %.4f", name, GIT_REMOTE, metrics["accuracy"]["test"])
    return metrics


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
    if changed := uncommitted_changes():
        raise NotShared(f"uncommitted changes to {changed[0]}: the workers run commit "
                        f"{commit[:7]}; commit and `git push` them first")
    if not commit_on_remote(commit, remote):
        branch = git("branch", "--show-current").strip() or "HEAD"
        raise NotShared(f"commit {commit[:7]} is not on git remote {remote}: run "
                        f"`git push {remote} {branch}`")
    if default_dvc_remote() is None:
        raise NotShared("no default DVC remote: run `dvc remote add -d NAME URL` "
                        "(docs/distributed.md)")
    if missing := unshared_outputs():
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
    fashionnet-experiment/POOL; its name. (`prefect deploy` keeps one pool per deployment
    name, and concurrent sweeps to other pools must not move each other's deployment.)"""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    entry = deployment_entry()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise NotShared(f"no work pool {pool!r} on the Prefect server: run `prefect "
                            f"work-pool create {pool} --type process` and start a worker"
                            ) from None
        client.create_deployment(
            flow_id=client.create_flow_from_name(FLOW_NAME), name=pool, work_pool_name=pool,
            entrypoint=entry["entrypoint"], pull_steps=entry["pull"],
            description=entry.get("description"), job_variables=entry.get("job_variables"),
            parameter_openapi_schema=parameter_schema(experiment_flow).model_dump_for_openapi(),
            enforce_parameter_schema=True)
    return f"{FLOW_NAME}/{pool}"


def submit(deployment: str, todo: Sequence[Experiment], commit: str, url: str,
           runs: dict[str, UUID]) -> None:
    """One flow run of ``deployment`` per experiment, without waiting, each added to ``runs``
    ({name: flow run id}) as soon as it exists, so that an interrupt can cancel it."""
    from prefect.deployments import run_deployment

    env = {**(deployment_entry().get("job_variables") or {}).get("env", {}),
           GIT_REMOTE_ENV: url, COMMIT_ENV: commit}
    for experiment in todo:
        run = run_deployment(deployment, parameters={"name": experiment.name, "commit": commit,
                                                     "overrides": dict(experiment.overrides)},
                             flow_run_name=experiment.name, timeout=0,
                             job_variables={"env": env}, tags=["fashionnet-experiment"])
        runs[experiment.name] = run.id


def wait(runs: Mapping[str, UUID]) -> dict[str, str]:
    """Every run's final state name, {name: "Completed" | "Failed" | ...}, logged as each ends."""
    from prefect.flow_runs import wait_for_flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = get_run_logger()

    async def one(name: str, run_id: UUID) -> tuple[str, str]:
        run = await wait_for_flow_run(run_id, timeout=WAIT_TIMEOUT)
        logger.info("%s: %s", name, run.state.name)
        return name, run.state.name

    async def every() -> list[tuple[str, str]]:
        return await asyncio.gather(*(one(name, run_id) for name, run_id in runs.items()))

    return dict(run_coro_as_sync(every()))


def cancel(runs: Mapping[str, UUID]) -> list[str]:
    """Cancel the runs not yet final, as `prefect flow-run cancel` does; their names. A run no
    worker has taken is Cancelled at once; a started one is set Cancelling, and its worker
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


def run_on_pool(wanted: Sequence[Experiment], pool: str, baseline: str) -> None:
    """Each experiment finished neither here nor on the git remote run by a worker of
    ``pool``, then those not here pulled back (`dvc exp pull`). A run that does not complete
    fails the call, naming it; one finished here with other params, before anything runs."""
    logger = get_run_logger()
    url = check_shared(baseline)
    todo = experiments.to_run(wanted, baseline)  # the same rule as on this machine
    if not todo:
        return
    done = experiments.remote_names(baseline, GIT_REMOTE)
    if shared := [e.name for e in todo if e.name in done]:
        logger.info("already on git remote %s: %s", GIT_REMOTE, ", ".join(shared))
    if left := [e for e in todo if e.name not in done]:
        deployment = deploy(pool)
        runs: dict[str, UUID] = {}
        try:
            submit(deployment, left, baseline, url, runs)
            logger.info("submitted %d runs of %s to pool %s at commit %s", len(runs),
                        deployment, pool, baseline[:7])
            states = wait(runs)
        except BaseException:  # Ctrl-C or a failure of the caller itself: stop what it started
            if stopped := cancel(runs):
                logger.warning("cancelled %s", ", ".join(stopped))
            raise
        if unfinished := [f"{name} ({state})" for name, state in states.items()
                          if state != "Completed"]:
            raise RuntimeError(f"{len(unfinished)} of {len(runs)} runs did not finish: "
                               f"{', '.join(unfinished)}; the finished ones are on the "
                               "remotes, running the same command again runs only these")
    dvc("exp", "pull", GIT_REMOTE, *(e.name for e in todo))
