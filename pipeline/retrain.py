"""The retraining flow: a DVC experiment, gated on validation accuracy, promoted by a commit.

A retrain is one DVC experiment run in a temporary copy (pipeline/experiments.py), so the
workspace is untouched while it trains and `dvc exp show` lists every retrain. The gate
(pipeline/gate.py) compares its validation accuracy with the one committed at the HEAD it
started from; a refused run ends Failed, and HEAD's model stays. A promoted run becomes one
commit on the current branch whose tree is the experiment's (pipeline/promotion.py), pushed
first where a git remote and a DVC remote are configured, so the next retrain, on any machine,
starts from it (docs/retraining.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.schedules import Cron

from pipeline import experiments, paths
from pipeline.drift import Drift, measure
from pipeline.experiments import Experiment
from pipeline.gate import DECIDES, Outcome, judge, rule
from pipeline.params import Params, load_params
from pipeline.promotion import Candidate, blockers, promote
from pipeline.summary import (
    FLOW_NAME,
    REPORTED,
    changed_stages,
    commit_message,
    metrics_diff,
    publish,
    summary_markdown,
)
from pipeline.workspace import (
    CommandFailed,
    current_branch,
    default_dvc_remote,
    dvc,
    git,
    git_remote,
    head_commit,
    remote_url,
    show,
    uncommitted_changes,
    unshallow,
    workspace_lock,
)

DEPLOYMENT = "scheduled"


class RetrainRejected(RuntimeError):
    """The promotion gate refused the retrained model; the previous one stays."""


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain did: its experiment, outcome (and in words), the promotion commit, and
    the accuracies of the candidate and of the model committed at HEAD before it."""

    experiment: str
    outcome: Outcome
    verdict: str
    commit: str | None
    accuracy: dict[str, float]
    committed_accuracy: dict[str, float] | None
    drift: Drift  # HEAD's model, before the retrain, on the incoming batches new to it


def overrides_for(seed: int | None = None, set_params: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """A retrain's params.yaml overrides: ``set_params`` and ``seed`` as train.seed; a bad key
    or value raises ConfigError naming it, before any work."""
    overrides = {**(set_params or {}), **({"train.seed": seed} if seed is not None else {})}
    load_params(overrides=overrides)
    return overrides


def accuracies(rev: str) -> dict[str, float] | None:
    """metrics/metrics.json's accuracies as committed at ``rev``; None before any run."""
    text = show(rev, paths.METRICS_JSON)
    return None if text is None else json.loads(text)["accuracy"]


@task(cache_policy=NO_CACHE)
def measure_drift(baseline: str) -> Drift:
    """The model at ``baseline`` on the incoming batches it has not trained on."""
    found = measure(baseline)
    if found.accuracy is not None:
        get_run_logger().info("drift: HEAD's model on %d new incoming images: accuracy %.4f",
                              found.images, found.accuracy)
    return found


@task(cache_policy=NO_CACHE)
def fetch_data() -> None:
    """The data and model HEAD's dvc.lock names, from the DVC remote into DVC's cache (not the
    workspace), where the experiment's temporary copy checks them out."""
    dvc("fetch")


def _started(ingested: str | None) -> tuple[datetime, str]:
    """When this flow run was due (a scheduled run: its slot), and what started it: its
    schedule, new data (the ingest event's trigger) or a person."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    why = "ingested" if ingested else "manual"
    if run is None or run.expected_start_time is None:
        return datetime.now(timezone.utc), why
    return run.expected_start_time, "scheduled" if run.auto_scheduled else why


def _check_ingested(commit: str, remote: str | None) -> None:
    """The commit an ingest event names must be in the history retrained. Where it is not
    (`fashionnet serve`'s workspace, behind the remote the ingest pushed to), the branch is
    fast-forwarded to it from ``remote``, if that needs no merge and no local change is in
    the way; else RuntimeError."""
    def contains(ancestor: str, descendant: str) -> bool:
        try:
            git("merge-base", "--is-ancestor", ancestor, descendant)
            return True
        except CommandFailed:
            return False

    if contains(commit, "HEAD"):
        return
    head = head_commit()
    if remote:
        git("fetch", "--quiet", remote)
        if contains(head, commit) and not uncommitted_changes():
            git("merge", "--quiet", "--ff-only", commit)
            get_run_logger().info("fast-forwarded from %s to the ingested commit %s", head[:8],
                                  commit[:8])
            return
    raise RuntimeError(f"the ingested commit {commit[:8]} is not in this workspace's history at "
                       f"{head[:8]}, and it cannot be fast-forwarded to it (local commits or "
                       "changes, or no remote has it): pull, then retrain")


def _settle(run: Candidate, params: Params, overrides: dict[str, Any], branch: str,
            remote: str | None) -> tuple[Outcome, str, str | None, str]:
    """The gate's decision, and the promotion where it passes: (outcome, verdict in words,
    the promotion commit, advice for the summary). A failed promotion publishes its summary
    and raises."""
    old, new = accuracies(run.baseline), accuracies(run.rev)
    gate = params.retrain
    refused = judge(None if old is None else old[DECIDES], new[DECIDES],
                    gate.max_accuracy_drop, gate.min_improvement)
    by_hand = (f"To promote it by hand: `dvc exp apply {run.name}`, then commit what it changed"
               + (f", `dvc push` and `git push` ({remote} holds the experiment: "
                  f"`dvc exp pull {remote} {run.name}` first on another machine)."
                  if remote else "."))
    if refused:
        return Outcome.REFUSED, f"refused, HEAD's model stays: {refused}", None, ""
    if run.same_tree():
        return (Outcome.UNCHANGED, "passed the gate, nothing changed: HEAD's model stands",
                None, "")
    if reasons := blockers(run, branch):
        return (Outcome.NOT_APPLIED, "passed the gate, not applied: " + "; ".join(reasons),
                None, by_hand)
    try:
        commit, version = promote(run, branch, commit_message(run, overrides, old, new), remote)
    except Exception as e:
        verdict = f"passed the gate, promotion failed, {branch} unchanged: {e}"
        publish(summary_markdown(run, verdict, overrides, old, new, rule(gate),
                                 changed_stages(run), metrics_diff(run), by_hand), run)
        raise
    pushed = f", pushed to {remote}" if remote else ""
    return (Outcome.PROMOTED, f"promoted as commit {commit[:8]} on {branch}, registered as "
                              f"{version} at stage prod{pushed}", commit,
            f"To undo it: `git revert {commit[:8]}`, then `dvc checkout`"
            + (", `git push`." if remote else "."))


@flow(name=FLOW_NAME)
def retrain_flow(force: bool = False, seed: int | None = None,
                 set_params: dict[str, Any] | None = None, name: str | None = None,
                 ingested: str | None = None) -> RetrainResult:
    """Retrain as a DVC experiment, gate it on validation accuracy, commit it if it passes.

    Args:
        force: Rerun the train stage and every stage after it even if nothing changed.
        seed: train.seed for this run.
        set_params: params.yaml keys for this run, as `dvc exp run -S` sets them, e.g.
            {"train.epochs": 5}; committed with the model if it is promoted.
        name: the experiment's name; default
            retrain-<UTC date>-<HHMM>-<scheduled|ingested|manual>.
        ingested: the commit of the `fashionnet ingest --push` whose event started this run
            (the deployment's trigger); it must be in the history retrained.
    """
    overrides = overrides_for(seed, set_params)
    params = load_params(overrides=overrides)
    with workspace_lock("retrain"):
        branch = current_branch()
        remote, storage = git_remote(), default_dvc_remote()
        unshallow(remote)
        if ingested:
            _check_ingested(ingested, remote)
        if storage:
            fetch_data()
        baseline = head_commit()
        name = name or experiments.dated_name("retrain", *_started(ingested),
                                              set(experiments.finished(baseline)))
        drift = measure_drift(baseline)  # HEAD's model on the data it has not seen yet
        experiments.run([Experiment(name, overrides)], baseline, force=force)
        run = Candidate(name, experiments.commit_of(baseline, name) or "", baseline)
        shared = remote if remote and storage else None  # pushed only where both remotes are
        if shared:
            experiments.push(name, baseline, shared)
        else:
            get_run_logger().info("not pushed: %s", "no DVC remote (core.remote)" if remote
                                  else "no git remote")
        outcome, verdict, commit, advice = _settle(run, params, overrides, branch, shared)
        old, new = accuracies(baseline), accuracies(run.rev)
        publish(summary_markdown(run, verdict, overrides, old, new, rule(params.retrain),
                                 changed_stages(run), metrics_diff(run), advice, drift), run)
    if outcome is Outcome.REFUSED:
        raise RetrainRejected(f"{name}: {verdict}; HEAD's model and metrics are kept")
    get_run_logger().info("%s %s: validation accuracy %.4f, test %.4f", name, verdict,
                          new[DECIDES], new[REPORTED])
    return RetrainResult(name, outcome, verdict, commit, new, old, drift)


def served_triggers(prefect_file: Path = Path("prefect.yaml")) -> list[Any]:
    """prefect.yaml's triggers of the scheduled deployment, for this workspace's repository
    (its git remote origin, as `prefect deploy` fills in ``{{ git-remote.stdout }}``); none
    without a git remote: then no ingest here can push, nor emit the event."""
    import yaml
    from prefect.events import DeploymentEventTrigger

    url = remote_url()
    (entry,) = [d for d in yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
                ["deployments"] if d["name"] == DEPLOYMENT]
    if url is None:
        return []
    return [DeploymentEventTrigger(**{
        **spec, "match": {key: value.replace("{{ git-remote.stdout }}", url)
                          for key, value in spec["match"].items()}})
        for spec in entry.get("triggers", [])]


def serve(cron: str) -> None:
    """Serve fashionnet-retrain/scheduled in this workspace on ``cron`` (UTC) and on the ingest
    event (prefect.yaml's trigger), one run at a time, until SIGINT or SIGTERM."""
    retrain_flow.serve(name=DEPLOYMENT, schedules=[Cron(cron, timezone="UTC")],
                       triggers=served_triggers(), limit=1)
