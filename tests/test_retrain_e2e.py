"""The retraining flow end to end, against a real Prefect server, a bare git repository as the
git remote and a local-directory DVC remote: a refused retrain, a promoted one, and `fashionnet
serve`. The scheduled deployment on a process worker, started by its trigger: tests/
test_ingest_e2e.py."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.params import load_params
from pipeline.retrain import DEPLOYMENT
from pipeline.summary import FLOW_NAME
from tests.helpers import git, ok, prefect_client, run, wait_for
from tests.servers import (
    artifacts,
    clone,
    craft_head,
    started,
    state_of,
)

ARTIFACTS = {"fashionnet-retrain-summary", "fashionnet-retrain-per-class",
             "fashionnet-retrain-report"}


def workspace(repo: Path) -> dict[str, str]:
    """Every file's digest outside .git and DVC's cache, with git's HEAD, index and status."""
    skip = {(".git",), (".dvc", "cache"), (".dvc", "tmp")}
    state = {}
    for path in sorted(repo.rglob("*")):
        parts = path.relative_to(repo).parts
        if path.is_file() and parts[:1] not in skip and parts[:2] not in skip:
            state[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {**state, "HEAD": git(repo, "rev-parse", "HEAD"),
            "branch": git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
            "git index": git(repo, "ls-files", "-s"),
            "git status": git(repo, "status", "--porcelain")}


def last_failed_run(prefect_api: str):
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(prefect_api) as client:
        (found,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=["FAILED"]))),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
    return found


def retrains(repo: Path, env: dict[str, str], baseline: str = "HEAD") -> dict[str, dict]:
    """`dvc exp show`'s rows of the retrain experiments run on ``baseline``, by name."""
    import dvc.api

    return {row["Experiment"]: row for row in dvc.api.exp_show(repo=str(repo), revs=baseline)
            if (row.get("Experiment") or "").startswith("retrain-")}


@pytest.mark.slow
def test_a_retrain_whose_validation_drops_is_refused_while_test_rises(remotes, tmp_path,
                                                                      prefect_api, raw_dir):
    repo, env = clone(remotes.url, tmp_path / "ws", prefect_api, raw_dir)
    git(repo, "remote", "remove", "origin")  # this one stays local
    craft_head(repo, env, val=0.99, test=0.10)
    before, status = workspace(repo), ok(repo, env, "dvc", "status")
    result = run(repo, env, "fashionnet", "retrain", "-S", "train.seed=7")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RetrainRejected" in result.stderr and "validation accuracy fell" in result.stderr
    assert workspace(repo) == before  # branch, model, metrics, report, params.yaml, index
    assert ok(repo, env, "dvc", "status") == status
    (row,) = retrains(repo, env).values()  # `dvc exp show` lists the refused run
    max_drop = load_params(repo / "params.yaml").retrain.max_accuracy_drop
    assert row["train.seed"] == 7
    assert row["accuracy.val"] < 0.99 - max_drop and row["accuracy.test"] > 0.10
    failed = last_failed_run(prefect_api)
    assert "RetrainRejected" in failed.state.message
    found = artifacts(prefect_api, failed.id)
    assert set(found) == ARTIFACTS
    summary = found["fashionnet-retrain-summary"]
    assert f"`{row['Experiment']}`: refused" in summary and "`train.seed=7`" in summary
    assert f"| accuracy.val | 0.9900 | {row['accuracy.val']:.4f} |" in summary
    assert f"| accuracy.test | 0.1000 | {row['accuracy.test']:.4f} |" in summary
    assert "decided the gate" in summary and "reported only" in summary


@pytest.mark.slow
def test_a_promoted_retrain_is_one_commit_on_the_branch_and_both_remotes(remotes, tmp_path,
                                                                         prefect_api, raw_dir):
    own = remotes.copy(tmp_path)
    repo, env = clone(own.url, tmp_path / "ws", prefect_api, raw_dir, own.storage)
    craft_head(repo, env, val=0.10, test=0.99)  # the test accuracy will fall: it never decides
    git(repo, "push", "-q", "origin", "main")
    base = git(repo, "rev-parse", "HEAD").strip()

    result = run(repo, env, "fashionnet", "retrain", "-S", "train.seed=5")
    assert result.returncode == 0, result.stdout + result.stderr
    head = git(repo, "rev-parse", "HEAD").strip()
    assert git(repo, "rev-list", f"{base}..{head}").split() == [head]  # one new commit
    (row,) = retrains(repo, env, base).values()
    name, exp = row["Experiment"], row["rev"]
    # Its dvc.lock, metrics, report and params are the experiment's, byte for byte.
    assert git(repo, "rev-parse", f"{head}^{{tree}}") == git(repo, "rev-parse", f"{exp}^{{tree}}")
    for path in ("dvc.lock", "metrics/metrics.json", "reports/report.md", "params.yaml"):
        assert (repo / path).read_text() == git(repo, "show", f"{exp}:{path}"), path
    assert load_params(repo / "params.yaml").train.seed == 5
    message = git(repo, "log", "-1", "--format=%B")
    val, test = row["accuracy.val"], row["accuracy.test"]
    assert message.startswith(f"Retrain {name}: validation accuracy 0.1000 -> {val:.4f}")
    assert "Overrides: train.seed=5" in message
    assert f"Test accuracy: 0.9900 -> {test:.4f}" in message and test < 0.99
    assert "Data and pipelines are up to date." in ok(repo, env, "dvc", "status")
    assert git(repo, "status", "--porcelain") == ""

    # Both remotes: the commit on the git remote's main, its data in the DVC remote.
    assert git(repo, "ls-remote", own.url, "refs/heads/main").split()[0] == head
    assert name in ok(repo, env, "dvc", "exp", "list", "origin", "--rev", base, "--name-only")
    fresh, fresh_env = clone(own.url, tmp_path / "fresh", prefect_api, raw_dir, own.storage)
    lock = yaml.safe_load((fresh / "dvc.lock").read_text())
    (model,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == str(paths.MODEL)]
    assert hashlib.md5((fresh / paths.MODEL).read_bytes()).hexdigest() == model["md5"]
    diff = json.loads(ok(fresh, fresh_env, "dvc", "metrics", "diff", "HEAD~1", "--json"))
    change = diff["metrics/metrics.json"]["accuracy.val"]
    assert (change["old"], change["new"]) == (0.10, val)


@pytest.mark.slow
def test_serve_runs_the_deployment_in_this_workspace(remotes, tmp_path, prefect_api, raw_dir):
    repo, env = clone(remotes.url, tmp_path / "ws", prefect_api, raw_dir)
    git(repo, "remote", "remove", "origin")
    before = workspace(repo)
    log = tmp_path / "serve.log"
    with started(["fashionnet", "serve"], log, env, cwd=repo) as server:
        def served():
            from prefect.exceptions import ObjectNotFound

            with prefect_client(prefect_api) as client:
                try:
                    found = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}")
                except ObjectNotFound:
                    return None
            return found if found.work_pool_name is None else None

        deployment = wait_for(served, "the served deployment", proc=server, log=log)
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == load_params(repo / "params.yaml").schedule.cron
        with prefect_client(prefect_api) as client:
            flow_run = client.create_flow_run_from_deployment(deployment.id)
        final = wait_for(lambda: state_of(prefect_api, flow_run.id), "the run's end", 300,
                         proc=server, log=log)
        assert final == "COMPLETED", log.read_text()
        # Nothing was stale: the experiment equals HEAD, and the workspace stays as it was.
        summary = artifacts(prefect_api, flow_run.id)["fashionnet-retrain-summary"]
        assert "nothing changed: HEAD's model stands" in summary
        assert workspace(repo) == before
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    with prefect_client(prefect_api) as client:
        client.delete_deployment(deployment.id)  # after serve paused it

