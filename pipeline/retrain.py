"""The retraining flow: rebuild what is stale with DVC, compare with the committed metrics, gate.

Each DVC stage runs as its own task (`dvc repro --single-item <stage>`, its output in the task's
logs) in the order `dvc repro` plans from dvc.yaml. The new metrics are compared with
metrics/metrics.json at git HEAD, as `dvc metrics diff` does. A retrain whose test accuracy falls
more than ``retrain.max_accuracy_drop`` below it is refused: the run ends Failed and the
workspace is put back as it was, the model from the DVC cache.

Overrides (``seed``, ``set_params``) are written into params.yaml for the run, as
`dvc exp run -S` does, so that dvc.lock records what made the model; a refused or failed run
takes them back out, a promoted one keeps them, beside the dvc.lock and outputs they produced.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from dvc.repo import Repo
from dvc.repo.reproduce import plan_repro
from dvc.utils.serialize import modify_yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.schedules import Cron

from fashionnet.files import write_bytes
from pipeline import paths
from pipeline.dvc import git, run_dvc, workspace_lock
from pipeline.params import PARAMS_FILE, Params, load_params

FLOW_NAME, DEPLOYMENT = "fashionnet-retrain", "scheduled"
RETRAIN_FROM = "train"  # `force` reruns this stage and everything downstream of it
DVC_LOCK = Path("dvc.lock")
GATED_METRIC = "accuracy.test"


class RetrainRejected(RuntimeError):
    """The promotion gate refused the retrained model; the previous one stays."""


def plan() -> tuple[list[str], set[str]]:
    """Every stage in the order `dvc repro` runs them, and the stages `force` reruns."""
    with Repo() as repo:
        graph = repo.index.graph
        order = [stage.addressing for stage in plan_repro(graph)]
        start = repo.stage.collect(RETRAIN_FROM)
        forced = {stage.addressing for stage in plan_repro(graph, start, downstream=True)}
    return order, forced


@dataclass(frozen=True)
class Snapshot:
    """The workspace a refused or failed retrain puts back: the small files as bytes, git's
    index entries for them, and which DVC-cached outputs existed (those come from the cache)."""

    files: dict[Path, bytes | None]
    index: str  # `git ls-files -s` lines: mode, blob, stage, path
    cached: dict[Path, bool]


def snapshot() -> Snapshot:
    """What the workspace holds now, before the retrain changes it."""
    small, cached = [PARAMS_FILE, DVC_LOCK], []
    with Repo() as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.def_path)
                if out.use_cache:  # DVC writes a .gitignore beside it (and autostages it)
                    cached.append(path)
                    small.append(path.parent / ".gitignore")
                else:
                    small.append(path)
    small = list(dict.fromkeys(small))
    return Snapshot(files={p: p.read_bytes() if p.is_file() else None for p in small},
                    index=git("ls-files", "-s", "--", *map(str, small)),
                    cached={p: p.exists() for p in cached})


@task(cache_policy=NO_CACHE, task_run_name="dvc-repro-{stage}")
def repro_stage(stage: str, force: bool) -> bool:
    """`dvc repro --single-item <stage>` if it is stale (or forced); whether it ran."""
    with Repo() as repo:
        stale = bool(repo.status(targets=[stage]))
    if not (stale or force):
        get_run_logger().info("stage %r is up to date", stage)
        return False
    run_dvc("repro", "--single-item", *(["--force"] if force else []), stage)
    return True


@task(cache_policy=NO_CACHE)
def metrics_diff() -> dict[str, dict[str, Any]]:
    """{"metrics/metrics.json": {"accuracy.test": {"old", "new", "diff"}, ...}}: the workspace
    against git HEAD, unchanged metrics included, as `dvc metrics diff --all` shows them."""
    with Repo() as repo:
        result = repo.metrics.diff(a_rev="HEAD", all=True)
    return result.get("diff", {})


def judge(old: float | None, new: float, max_drop: float) -> str | None:
    """Why the gate refuses a test accuracy of ``new`` after ``old``; None to promote it."""
    if old is None:
        return None
    drop = round(old - new, 9)  # accuracies are k/10000: no float noise at the threshold
    if drop > max_drop:
        return (f"test accuracy fell by {drop:.4f} ({old:.4f} -> {new:.4f}), more than "
                f"retrain.max_accuracy_drop = {max_drop}")
    return None


def summary_markdown(ran: dict[str, bool], diff: dict[str, dict[str, Any]],
                     overrides: dict[str, object], verdict: str) -> str:
    """The run's summary: verdict, stages, overrides and the metrics diff table."""
    lines = [f"# FashionNet retrain: {verdict}", "", "| stage | |", "|---|---|"]
    lines += [f"| {stage} | {'rebuilt' if did else 'up to date'} |" for stage, did in ran.items()]
    if overrides:
        lines += ["", "Overrides: " + ", ".join(f"`{k}={v}`" for k, v in overrides.items())]
    lines += ["", "## Metrics against git HEAD (`dvc metrics diff --all`)", "",
              "| Path | Metric | HEAD | workspace | Change |", "|---|---|---|---|---|"]

    def cell(value: object) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    for path, metrics in diff.items():
        for name, change in metrics.items():
            lines.append(f"| {path} | {name} | {cell(change.get('old'))} | "
                         f"{cell(change.get('new'))} | {cell(change.get('diff'))} |")
    return "\n".join(lines) + "\n"


def publish(summary: str) -> None:
    """The summary, the per-class table and the report, as this run's artifacts."""
    create_markdown_artifact(summary, key="fashionnet-retrain-summary",
                             description="Retrain verdict and `dvc metrics diff` against HEAD")
    if paths.CLASS_REPORT.exists():
        per_class = pd.read_csv(paths.CLASS_REPORT).round(4).to_dict("records")
        create_table_artifact(per_class, key="fashionnet-retrain-per-class",
                              description="Per-class test metrics of the retrained model")
    if paths.REPORT.exists():
        create_markdown_artifact(paths.REPORT.read_text(encoding="utf-8"),
                                 key="fashionnet-retrain-report",
                                 description="reports/report.md of the retrained model")


@task(cache_policy=NO_CACHE)
def restore(before: Snapshot) -> None:
    """Put the workspace back as it was: params.yaml, dvc.lock, metrics and reports, git's
    index, and the model and data from the DVC cache (`dvc checkout`)."""
    for path, data in before.files.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            write_bytes(path, data)  # atomic: a crash mid-restore leaves no half-written file
    if before.files[DVC_LOCK] is not None:
        run_dvc("checkout", "--force")
    for path, existed in before.cached.items():
        if not existed and path.is_dir():  # a failed first run: nothing previous to keep
            shutil.rmtree(path)
        elif not existed:
            path.unlink(missing_ok=True)
    tracked = [str(p) for p in before.files]
    git("update-index", "--force-remove", "--", *tracked)
    git("update-index", "--index-info", stdin=before.index)
    get_run_logger().info("workspace restored to its state before the retrain")


def write_overrides(params: Params, overrides: dict[str, object]) -> None:
    """Set ``overrides`` in params.yaml with their validated values, comments kept."""
    with modify_yaml(PARAMS_FILE) as data:
        for dotted in overrides:
            section, key = dotted.split(".")
            data.setdefault(section, {})[key] = params.model_dump(mode="json")[section][key]


@flow(name=FLOW_NAME)
def retrain_flow(force: bool = False, seed: int | None = None,
                 set_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild what is stale with DVC, compare with the committed metrics, promote or refuse.

    Args:
        force: Retrain (the train stage and every stage after it) even if nothing changed.
        seed: train.seed for this run.
        set_params: params.yaml keys for this run, as `dvc exp run -S` sets them, e.g.
            {"train.epochs": 5}; kept in params.yaml only if the model is promoted.
    """
    logger = get_run_logger()
    overrides = {**(set_params or {}), **({"train.seed": seed} if seed is not None else {})}
    params = load_params(overrides=overrides)  # bad overrides fail here, before any change
    with workspace_lock():
        order, forced = plan()
        before = snapshot()
        try:
            if overrides:
                write_overrides(params, overrides)
            ran = {stage: repro_stage(stage, force and stage in forced) for stage in order}
            diff = metrics_diff()
            new = json.loads(paths.METRICS_JSON.read_text(encoding="utf-8"))["accuracy"]["test"]
            old = diff.get(str(paths.METRICS_JSON), {}).get(GATED_METRIC, {}).get("old")
            refused = judge(old, new, params.retrain.max_accuracy_drop)
            verdict = (f"refused, previous model kept: {refused}" if refused
                       else "nothing was stale, the model in place stands" if not any(ran.values())
                       else "promoted" if old is not None
                       else "promoted (no committed metrics to compare with)")
            publish(summary_markdown(ran, diff, overrides, verdict))
        except BaseException:
            restore(before)
            raise
        if refused:
            restore(before)
            raise RetrainRejected(f"{refused}; the previous model and metrics are kept")
    logger.info("retrain %s: test accuracy %.4f", verdict, new)
    return {"rebuilt": [stage for stage, did in ran.items() if did],
            "test_accuracy": new, "committed_test_accuracy": old}


def serve(cron: str) -> None:
    """Serve fashionnet-retrain/scheduled on ``cron`` (UTC), one run at a time, until SIGINT
    or SIGTERM."""
    retrain_flow.serve(name=DEPLOYMENT, schedules=[Cron(cron, timezone="UTC")], limit=1)
