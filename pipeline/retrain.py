"""The retraining flow: a DVC experiment, gated on validation accuracy, promoted by a commit.

A retrain is `dvc exp run --temp` (the run's overrides as ``-S``, a name saying when and why),
so the workspace is untouched while it trains and `dvc exp show` lists every retrain. Its
validation accuracy is compared with the one committed at the HEAD it started from: a drop of
more than ``retrain.max_accuracy_drop`` (or a gain under ``retrain.min_improvement``) refuses
it and the run ends Failed; the test accuracy is reported beside it and never decides. A
promoted run becomes one commit on the current branch whose tree is the experiment's, pushed
first where a git remote and a DVC remote are configured, so the next retrain, on any machine,
starts from it (docs/retraining.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import yaml
from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.schedules import Cron

from pipeline import paths
from pipeline.dvc import (
    committer_env,
    default_dvc_remote,
    describe_changes,
    experiment_ref,
    git,
    git_remote,
    local_experiments,
    remote_ref,
    run_dvc,
    show,
    uncommitted_changes,
    unshallow,
    workspace_lock,
)
from pipeline.params import Params, load_params

FLOW_NAME, DEPLOYMENT = "fashionnet-retrain", "scheduled"
RETRAIN_FROM = "train"  # `force` reruns this stage and every stage downstream of it
DECIDES, REPORTED = "val", "test"  # metrics.json's accuracy keys: the gate's, the informative


class RetrainRejected(RuntimeError):
    """The promotion gate refused the retrained model; the previous one stays."""


@dataclass(frozen=True)
class Experiment:
    """One retrain: its DVC experiment name and commit, and the commit it started from."""

    name: str
    rev: str
    baseline: str


def experiment_name(when: datetime, scheduled: bool, taken: set[str]) -> str:
    """retrain-<UTC date>-<HHMM>-<scheduled|manual>, made unique among ``taken``."""
    name = f"retrain-{when.astimezone(timezone.utc):%Y-%m-%d-%H%M}-"
    name += "scheduled" if scheduled else "manual"
    unique, n = name, 1
    while unique in taken:  # DVC refuses a second experiment of one name on one commit
        n += 1
        unique = f"{name}-{n}"
    return unique


def judge(old: float | None, new: float, max_drop: float, min_improvement: float = 0.0
          ) -> str | None:
    """Why the gate refuses a validation accuracy of ``new`` after ``old``; None to promote."""
    if old is None:
        return None
    change = round(new - old, 9)  # accuracies are k/N: no float noise at the threshold
    if -change > max_drop:
        return (f"validation accuracy fell by {-change:.4f} ({old:.4f} -> {new:.4f}), more "
                f"than retrain.max_accuracy_drop = {max_drop}")
    if min_improvement > 0 and change < min_improvement:
        return (f"validation accuracy changed by {change:+.4f} ({old:.4f} -> {new:.4f}), less "
                f"than retrain.min_improvement = {min_improvement}")
    return None


def accuracies(rev: str) -> dict[str, float] | None:
    """metrics/metrics.json's accuracies as committed at ``rev``; None before any run."""
    text = show(rev, paths.METRICS_JSON)
    return None if text is None else json.loads(text)["accuracy"]


def override_args(params: Params, overrides: dict[str, object]) -> list[str]:
    """``-S ++key=value`` for each override, its value as validated (JSON is a YAML subset);
    ``++`` adds a key params.yaml lacks and sets one it has."""
    values = params.model_dump(mode="json")
    args = []
    for dotted in overrides:
        section, key = dotted.split(".")
        args += ["-S", f"++{dotted}={json.dumps(values[section][key])}"]
    return args


@task(cache_policy=NO_CACHE)
def fetch_data() -> None:
    """The data and model HEAD's dvc.lock names, from the DVC remote into DVC's cache (not the
    workspace), where the experiment's temporary copy checks them out."""
    run_dvc("fetch")


@task(cache_policy=NO_CACHE, task_run_name="dvc-exp-run-{name}")
def run_experiment(name: str, args: list[str], force: bool) -> Experiment:
    """`dvc exp run --temp`: the pipeline in a temporary copy, the workspace untouched."""
    baseline = git("rev-parse", "HEAD").strip()
    forced = ["--force", "--downstream", RETRAIN_FROM] if force else []
    run_dvc("exp", "run", "--temp", "--name", name, *forced, *args)
    ref = experiment_ref(baseline, name)
    if not git("for-each-ref", "--format=%(objectname)", ref).strip():
        raise RuntimeError(f"`dvc exp run` ended without making experiment {name} ({ref})")
    return Experiment(name, git("rev-parse", ref).strip(), baseline)


@task(cache_policy=NO_CACHE)
def push_experiment(run: Experiment, remote: str) -> None:
    """`dvc exp push`: the experiment's commit to the git remote (refs/exps/...), its data to
    the default DVC remote; a refused or deferred run is then still there to review."""
    run_dvc("exp", "push", remote, run.name)
    ref = experiment_ref(run.baseline, run.name)
    if remote_ref(remote, ref) != run.rev:  # `dvc exp push` can end 0 having pushed nothing
        raise RuntimeError(f"`dvc exp push` ended but git remote {remote} has no {ref}")


def changed_stages(run: Experiment) -> dict[str, bool]:
    """Each stage of dvc.yaml: whether its dvc.lock entry (deps, params, outs) differs from
    the baseline's, i.e. whether the experiment produced a new result for it."""
    stages = yaml.safe_load(show(run.rev, "dvc.yaml") or "{}").get("stages", {})
    old, new = ((yaml.safe_load(show(rev, "dvc.lock") or "{}") or {}).get("stages", {})
                for rev in (run.baseline, run.rev))
    return {stage: old.get(stage) != new.get(stage) for stage in stages}


def metrics_diff(run: Experiment) -> dict[str, dict[str, Any]]:
    """`dvc metrics diff --all <baseline> <experiment>`: {path: {metric: {old, new, diff}}}."""
    with Repo() as repo:
        return repo.metrics.diff(a_rev=run.baseline, b_rev=run.rev, all=True).get("diff", {})


def blockers(run: Experiment, branch: str) -> list[str]:
    """Why the experiment cannot become a commit on ``branch`` without overwriting anything."""
    found = []
    head = git("rev-parse", "HEAD").strip()
    current = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    if (head, current) != (run.baseline, branch):
        found.append(f"HEAD moved from {branch} at {run.baseline[:8]} to {current} at "
                     f"{head[:8]} while it ran")
    if changed := uncommitted_changes():
        found.append(f"uncommitted changes to {describe_changes(changed)}")
    added = git("diff", "--name-only", "--diff-filter=A", run.baseline, run.rev).split()
    if in_the_way := [p for p in added if os.path.lexists(p)]:
        found.append(f"untracked files where the run adds its own: {describe_changes(in_the_way)}")
    with Repo() as repo:
        modified = sorted({path for entries in repo.status().values() for entry in entries
                           if isinstance(entry, dict)
                           for path, state in entry.get("changed outs", {}).items()
                           if state == "modified"})
    if modified:
        found.append(f"DVC-tracked outputs changed in the workspace: {describe_changes(modified)}")
    return found


def upstream_ref(branch: str) -> str:
    """The branch on the git remote that ``branch`` pushes to (branch.<name>.merge)."""
    merge = git("config", "--default", "", f"branch.{branch}.merge").strip()
    return merge or f"refs/heads/{branch}"


@task(cache_policy=NO_CACHE)
def promote(run: Experiment, branch: str, message: str, remote: str | None) -> str:
    """One commit on ``branch`` whose tree is the experiment's, pushed to ``remote`` first
    (its data already is, by push_experiment); then the branch, index and workspace here."""
    tree = git("rev-parse", f"{run.rev}^{{tree}}").strip()
    # commit-tree: the commit exists before any branch points at it, so a rejected push
    # changes nothing here, and its files are exactly what the experiment committed.
    commit = git("commit-tree", tree, "-p", run.baseline, "-m", message,
                 env=committer_env()).strip()
    logger = get_run_logger()
    if remote:
        target = upstream_ref(branch)
        git("push", remote, f"{commit}:{target}")  # refused unless a fast-forward
        if remote_ref(remote, target) != commit:
            raise RuntimeError(f"{remote} {target} is not at {commit[:8]} after the push")
        logger.info("pushed %s to %s %s", commit[:8], remote, target)
    git("reset", "--quiet", "--keep", commit)  # refuses to overwrite a local change
    run_dvc("checkout")  # the model and data the new dvc.lock names, from DVC's cache
    logger.info("%s is now %s: %s", branch, commit[:8], message.splitlines()[0])
    return commit


def _cell(value: object, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}" if isinstance(value, float) else str(value)


def commit_message(run: Experiment, overrides: dict[str, object], old: dict | None,
                   new: dict[str, float]) -> str:
    """Subject: the run and the validation change; body: overrides, validation and test."""
    def change(key: str) -> str:
        if old is None:
            return f"{new[key]:.4f} (nothing committed before)"
        return f"{old[key]:.4f} -> {new[key]:.4f} ({new[key] - old[key]:+.4f})"

    shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    return (f"Retrain {run.name}: validation accuracy {change(DECIDES)}\n\n"
            f"Promoted by the {FLOW_NAME} flow from DVC experiment {run.name} ({run.rev[:8]}).\n"
            f"Overrides: {shown}\n"
            f"Validation accuracy: {change(DECIDES)}, decided the gate\n"
            f"Test accuracy: {change(REPORTED)}, reported only\n")


def summary_markdown(run: Experiment, verdict: str, overrides: dict[str, object],
                     old: dict | None, new: dict[str, float], rule: str,
                     stages: dict[str, bool], diff: dict[str, dict[str, Any]],
                     advice: str = "") -> str:
    """The run's summary: verdict, the deciding metric and the test one, stages, full diff.
    Paragraphs are single lines: the Prefect UI renders a source newline as a line break."""
    lines = [f"# FashionNet retrain `{run.name}`: {verdict}", "",
             f"Decided by **validation accuracy** ({rule}); the test accuracy is reported "
             "beside it and never decides.", "",
             f"| Metric | HEAD ({run.baseline[:8]}) | This run ({run.rev[:8]}) | Change | Role |",
             "|---|---|---|---|---|"]
    for key, role in ((DECIDES, "decided the gate"), (REPORTED, "reported only")):
        before = None if old is None else old[key]
        lines.append(f"| accuracy.{key} | {_cell(before)} | {_cell(new[key])} | "
                     f"{_cell(None if before is None else new[key] - before, signed=True)} | "
                     f"{role} |")
    shown = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none"
    lines += ["", f"Overrides: {shown}"]
    if advice:
        lines += ["", advice]
    lines += ["", "| Stage | Against HEAD |", "|---|---|"]
    lines += [f"| {stage} | {'new result' if did else 'same as HEAD'} |"
              for stage, did in stages.items()]
    lines += ["", "## Every metric (`dvc metrics diff --all`)", "",
              "| Path | Metric | HEAD | This run | Change |", "|---|---|---|---|---|"]
    for path, metrics in diff.items():
        for name, change in metrics.items():
            lines.append(f"| {path} | {name} | {_cell(change.get('old'))} | "
                         f"{_cell(change.get('new'))} | {_cell(change.get('diff'))} |")
    return "\n".join(lines) + "\n"


def publish(summary: str, run: Experiment) -> None:
    """The summary, the run's per-class table and report, as this flow run's artifacts."""
    create_markdown_artifact(summary, key="fashionnet-retrain-summary",
                             description="Retrain verdict: validation decides, test reported")
    if (table := show(run.rev, paths.CLASS_REPORT)) is not None:
        from io import StringIO

        per_class = pd.read_csv(StringIO(table)).round(4).to_dict("records")
        create_table_artifact(per_class, key="fashionnet-retrain-per-class",
                              description="Per-class test metrics of the retrained model")
    if (report := show(run.rev, paths.REPORT)) is not None:
        create_markdown_artifact(report, key="fashionnet-retrain-report",
                                 description="reports/report.md of the retrained model")


def _started() -> tuple[datetime, bool]:
    """When this flow run was due (a scheduled run: its slot), and whether a schedule made it."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.expected_start_time is None:
        return datetime.now(timezone.utc), False
    return run.expected_start_time, bool(run.auto_scheduled)


@flow(name=FLOW_NAME)
def retrain_flow(force: bool = False, seed: int | None = None,
                 set_params: dict[str, Any] | None = None, name: str | None = None
                 ) -> dict[str, Any]:
    """Retrain as a DVC experiment, gate it on validation accuracy, commit it if it passes.

    Args:
        force: Rerun the train stage and every stage after it even if nothing changed.
        seed: train.seed for this run.
        set_params: params.yaml keys for this run, as `dvc exp run -S` sets them, e.g.
            {"train.epochs": 5}; committed with the model if it is promoted.
        name: the experiment's name; default retrain-<UTC date>-<HHMM>-<scheduled|manual>.
    """
    logger = get_run_logger()
    overrides = {**(set_params or {}), **({"train.seed": seed} if seed is not None else {})}
    params = load_params(overrides=overrides)  # bad overrides fail here, before any work
    with workspace_lock():
        branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
        if branch == "HEAD":
            raise RuntimeError("HEAD is detached: check out the branch a promotion commits to")
        remote, storage = git_remote(), default_dvc_remote()
        unshallow(remote)
        if storage:
            fetch_data()
        name = name or experiment_name(*_started(), local_experiments())
        run = run_experiment(name, override_args(params, overrides), force)
        if remote and storage:
            push_experiment(run, remote)
        else:
            logger.info("not pushed: %s", "no DVC remote (core.remote)" if remote
                        else "no git remote")
        old, new = accuracies(run.baseline), accuracies(run.rev)
        if new is None:
            raise RuntimeError(f"experiment {name} has no {paths.METRICS_JSON}")
        gate = params.retrain
        rule = (f"a drop of at most retrain.max_accuracy_drop = {gate.max_accuracy_drop}"
                + (f" and a gain of at least retrain.min_improvement = {gate.min_improvement}"
                   if gate.min_improvement > 0 else "")
                + " against HEAD's")
        refused = judge(None if old is None else old[DECIDES], new[DECIDES],
                        gate.max_accuracy_drop, gate.min_improvement)
        apply = (f"To promote it by hand: `dvc exp apply {name}`, then commit what it changed"
                 + (f", `dvc push` and `git push` ({remote} holds the experiment: "
                    f"`dvc exp pull {remote} {name}` first on another machine)."
                    if remote and storage else "."))
        commit, advice = None, ""
        if refused:
            verdict = f"refused, HEAD's model stays: {refused}"
        elif git("rev-parse", f"{run.rev}^{{tree}}") == git("rev-parse",
                                                             f"{run.baseline}^{{tree}}"):
            verdict = "passed the gate, nothing changed: HEAD's model stands"
        elif reasons := blockers(run, branch):
            verdict = "passed the gate, not applied: " + "; ".join(reasons)
            advice = apply
        else:
            message = commit_message(run, overrides, old, new)
            try:
                commit = promote(run, branch, message, remote if storage else None)
            except Exception as e:
                verdict = f"passed the gate, promotion failed, {branch} unchanged: {e}"
                publish(summary_markdown(run, verdict, overrides, old, new, rule,
                                         changed_stages(run), metrics_diff(run), apply), run)
                raise
            pushed = f", pushed to {remote}" if remote and storage else ""
            verdict = f"promoted as commit {commit[:8]} on {branch}{pushed}"
            advice = (f"To undo it: `git revert {commit[:8]}`, then `dvc checkout`"
                      + (", `git push`." if pushed else "."))
        publish(summary_markdown(run, verdict, overrides, old, new, rule, changed_stages(run),
                                 metrics_diff(run), advice), run)
    if refused:
        raise RetrainRejected(f"{name}: {refused}; HEAD's model and metrics are kept")
    logger.info("%s %s: validation accuracy %.4f, test %.4f", name, verdict, new[DECIDES],
                new[REPORTED])
    return {"experiment": name, "verdict": verdict, "commit": commit,
            "val_accuracy": new[DECIDES], "test_accuracy": new[REPORTED],
            "committed_val_accuracy": None if old is None else old[DECIDES],
            "committed_test_accuracy": None if old is None else old[REPORTED]}


def serve(cron: str) -> None:
    """Serve fashionnet-retrain/scheduled in this workspace on ``cron`` (UTC), one run at a
    time, until SIGINT or SIGTERM."""
    retrain_flow.serve(name=DEPLOYMENT, schedules=[Cron(cron, timezone="UTC")], limit=1)
