"""DVC experiments, for every command that runs them (retrain, seeds, sweep, and the workers of
a pool): their names, their params as `-S` arguments, running them, pushing them, and reading
back what they made.

One rule for an experiment that exists already. An experiment is named for what sets it apart
(``seed-7``, ``lr-0.001_epochs-1``, ``retrain-2026-12-03-0300-manual``) and filed under the
commit it ran from, its baseline. On that baseline, an experiment of that name with the same
params is the same experiment, so it is not run again: a command stopped half-way is finished
by running it again. One with other params under that name is refused, naming it, because the
name would then mean two things (`dvc exp remove NAME` clears the way).

Where they run: ``dvc exp run --temp`` in a temporary copy of the workspace, one after another,
their output in the run's logs; several at a time through DVC's local queue (`--queue`, then
`--run-all --jobs N`); or on the workers of a Prefect work pool (pipeline/pool.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import paths
from pipeline.params import load_params
from pipeline.workspace import dvc, exp_show, git, read, remote_ref

MAX_NAME = 60  # longer names are cut and made unique by a hash: people read them
RERUN_FROM = "train"  # ``force`` reruns this stage and every stage downstream of it


class ExperimentConflict(RuntimeError):
    """An experiment of this name exists on the baseline with other params."""


class NotPushed(RuntimeError):
    """`dvc exp push` ended without the experiment on the git remote."""


@dataclass(frozen=True)
class Experiment:
    """One experiment to run: its name, and the params.yaml keys it sets on top of the
    baseline's, as `dvc exp run -S` sets them: {"train.seed": 7}."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """A finished experiment: its commit, its `dvc exp show` row (metrics and params, flat:
    "accuracy.val", "train.seed") and its models/train_info.json."""

    name: str
    rev: str
    row: Mapping[str, Any]
    info: Mapping[str, Any]

    def read(self, path: str) -> str:
        """The text of a file the experiment made, e.g. metrics/classification_report.csv."""
        return read(path, self.rev)


# --- names ----------------------------------------------------------------------------------


def seed_name(seed: int, recipe: str | None = None) -> str:
    """``seed-7``, or ``plus-seed-7`` for named recipe ``plus``."""
    return f"{recipe}-seed-{seed}" if recipe else f"seed-{seed}"


def point_name(point: Mapping[str, Any], recipe: str | None = None) -> str:
    """A readable, git-ref-safe name for a grid point: ``lr-0.001_epochs-1`` (the last part of
    each key where that is unambiguous), ``plus_lr-0.001`` on top of named recipe ``plus``."""
    short = [key.rsplit(".", 1)[-1] for key in point]
    labels = short if len(set(short)) == len(short) else [k.replace(".", "-") for k in point]
    name = "_".join(f"{label}-{value if isinstance(value, str) else json.dumps(value)}"
                    for label, value in zip(labels, point.values(), strict=True))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).replace("..", ".").strip(".-")
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return f"{recipe}_{name}" if recipe else name


def dated_name(prefix: str, when: datetime, why: str, taken: set[str]) -> str:
    """``<prefix>-<UTC date>-<HHMM>-<why>`` (retrain-2026-12-03-0300-scheduled), with ``-2``,
    ``-3``... until it is none of ``taken``: a retrain is always a new experiment."""
    name = f"{prefix}-{when.astimezone(timezone.utc):%Y-%m-%d-%H%M}-{why}"
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    return unique


# --- params ---------------------------------------------------------------------------------


def validated(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` as params.yaml would hold them once validated ("1e-4" -> 0.0001); a bad
    key or value raises ConfigError naming it, before anything runs."""
    values = load_params(overrides=overrides).model_dump(mode="json")
    return {key: values[key.split(".")[0]][key.split(".")[1]] for key in overrides}


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """``-S ++key=value`` for `dvc exp run`, each value validated and written as JSON (which DVC
    reads as YAML); ``++`` sets a key params.yaml has and adds one it lacks."""
    return [arg for key, value in validated(overrides).items()
            for arg in ("-S", f"++{key}={json.dumps(value)}")]


# --- what exists ----------------------------------------------------------------------------


def ref(baseline: str, name: str) -> str:
    """The git ref DVC files experiment ``name`` of ``baseline`` under (refs/exps/...)."""
    from dvc.repo.experiments.refs import ExpRefInfo

    return str(ExpRefInfo(baseline_sha=baseline, name=name))


def commit_of(baseline: str, name: str) -> str | None:
    """The commit of experiment ``name`` on ``baseline``; None where there is none."""
    return git("for-each-ref", "--format=%(objectname)", ref(baseline, name)).strip() or None


def finished(baseline: str) -> dict[str, dict[str, Any]]:
    """The finished experiments on commit ``baseline``: {name: `dvc exp show` row}."""
    return {row["Experiment"]: row for row in exp_show(baseline)
            if row.get("Experiment") and commit_of(baseline, row["Experiment"])}


def _differences(experiment: Experiment, row: Mapping[str, Any]) -> list[str]:
    """The params ``row`` (a `dvc exp show` row) holds otherwise than params.yaml with the
    experiment's overrides, validated, would: every key, so that an experiment run with an
    override not asked for now differs too (keys the row lacks are not compared)."""
    def same(held: Any, value: Any) -> bool:  # dvc.api.exp_show gives some values as text
        if held == value or not isinstance(held, str):
            return held == value
        if held == str(value):  # DVC's str(): 'None', 'True', "['http://...']"
            return True
        try:
            return yaml.safe_load(held) == value  # '3e-3'
        except yaml.YAMLError:
            return False

    values = load_params(overrides=experiment.overrides).model_dump(mode="json")
    expected = {f"{section}.{key}": value for section, keys in values.items()
                for key, value in keys.items()}
    return [f"{key}={row[key]!r}, not {value!r}" for key, value in expected.items()
            if key in row and not same(row[key], value)]


def to_run(experiments: Sequence[Experiment], baseline: str,
           done: Mapping[str, Mapping[str, Any]] | None = None) -> list[Experiment]:
    """Those of ``experiments`` not finished on ``baseline`` (``done``: its finished ones, by
    default read now); ExperimentConflict for one finished with other params."""
    done = finished(baseline) if done is None else done
    for experiment in experiments:
        if experiment.name in done and (diff := _differences(experiment,
                                                              done[experiment.name])):
            raise ExperimentConflict(
                f"experiment {experiment.name} exists on {baseline[:7]} with other params "
                f"({'; '.join(diff)}): `dvc exp remove {experiment.name}` to run it again")
    return [e for e in experiments if e.name not in done]


# --- running --------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="dvc-exp-run")
def run(experiments: Sequence[Experiment], baseline: str, jobs: int = 1,
        threads: int | None = None, force: bool = False, pull: bool = False) -> None:
    """Run those of ``experiments`` not finished on ``baseline`` (HEAD, which must not move
    while they run): one after another in temporary copies (``jobs`` 1), or ``jobs`` at a time
    through DVC's local queue. ``threads``: torch's CPU threads per run (OMP_NUM_THREADS);
    ``force``: rerun the train stage and what follows even where nothing changed; ``pull``:
    fetch missing data from the DVC remote instead of making it again."""
    todo = to_run(experiments, baseline)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    options = [*(["--force", "--downstream", RERUN_FROM] if force else []),
               *(["--pull"] if pull else [])]
    if jobs == 1 or len(todo) == 1:
        for experiment in todo:
            dvc("exp", "run", "--temp", "--name", experiment.name, *options,
                *set_args(experiment.overrides), env=env)
    elif todo:
        for experiment in todo:
            dvc("exp", "run", "--queue", "--name", experiment.name, *options,
                *set_args(experiment.overrides))
        try:
            dvc("exp", "run", "--run-all", "--jobs", str(jobs), env=env)
        except BaseException:  # the queue's workers are DVC's daemons: stop what it runs
            dvc("queue", "kill", *(e.name for e in todo), log=False)
            dvc("queue", "remove", "--queued", log=False)
            raise
    missing = [e.name for e in experiments if commit_of(baseline, e.name) is None]
    if missing:
        raise RuntimeError(f"no finished experiment {', '.join(missing)} on {baseline[:7]}; "
                           "`dvc queue logs NAME` tells why")


@task(cache_policy=NO_CACHE, task_run_name="dvc-exp-push-{name}")
def push(name: str, baseline: str, remote: str) -> str:
    """`dvc exp push`: the experiment's commit to git remote ``remote`` (refs/exps/...), its
    outputs to the default DVC remote (an upload that fails fails the command); then a check
    that the remote holds this very commit, since `dvc exp push` can end 0 having pushed
    nothing. The experiment's commit."""
    commit = commit_of(baseline, name)
    if commit is None:
        raise NotPushed(f"no experiment {name} on {baseline[:7]} to push")
    dvc("exp", "push", remote, name)
    if remote_ref(remote, ref(baseline, name)) != commit:
        raise NotPushed(f"`dvc exp push` ended but git remote {remote} has no {name} "
                        f"({ref(baseline, name)}) at {commit[:8]}")
    return commit


def remote_names(baseline: str, remote: str) -> set[str]:
    """Names of the experiments on git remote ``remote`` whose baseline is ``baseline``."""
    return set(dvc("exp", "list", remote, "--rev", baseline, "--name-only", log=False).split())


@task(cache_policy=NO_CACHE)
def collect(experiments: Sequence[Experiment], baseline: str) -> list[Result]:
    """Each experiment's result, in order, from `dvc exp show` on ``baseline``; RuntimeError
    naming those not finished, ExperimentConflict for one whose params are not its own."""
    done = finished(baseline)
    missing = [e.name for e in experiments if e.name not in done]
    if missing:
        raise RuntimeError(f"no finished experiment {', '.join(missing)} on {baseline[:7]}; "
                           "`dvc queue logs NAME` tells why")
    to_run(experiments, baseline, done)  # the params check
    return [Result(e.name, done[e.name]["rev"], done[e.name],
                   json.loads(read(paths.TRAIN_INFO, done[e.name]["rev"])))
            for e in experiments]
