"""The retraining flow's parts: the validation gate, the experiment's name and `-S` arguments,
the summary, the workspace lock, bad overrides, and prefect.yaml's scheduled deployment as
`prefect deploy` records it. The end-to-end runs are in tests/test_retrain_e2e.py."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from fashionnet.errors import ConfigError
from pipeline import experiments
from pipeline.gate import judge
from pipeline.params import load_params
from pipeline.promotion import Candidate
from pipeline.retrain import DEPLOYMENT
from pipeline.summary import FLOW_NAME, summary_markdown
from pipeline.workspace import WorkspaceBusy, workspace_lock
from tests.helpers import REPO, git, ok, prefect_client


@pytest.mark.parametrize(("old", "new", "min_improvement", "refused"), [
    (None, 0.10, 0.0, None),       # first run: nothing committed to compare with
    (0.9000, 0.9100, 0.0, None),
    (0.9000, 0.8950, 0.0, None),   # exactly the allowed drop
    (0.9000, 0.8949, 0.0, "retrain.max_accuracy_drop"),
    (0.9000, 0.5000, 0.0, "retrain.max_accuracy_drop"),
    (0.9000, 0.9050, 0.01, "retrain.min_improvement"),
    (0.9000, 0.9100, 0.01, None),  # exactly the required gain
])
def test_gate_reads_validation_accuracy(old, new, min_improvement, refused):
    reason = judge(old, new, 0.005, min_improvement)
    assert (reason is None) == (refused is None)
    if refused:
        assert refused in reason and f"({old:.4f} -> {new:.4f})" in reason
        assert reason.startswith("validation accuracy")


def test_experiment_names_say_when_and_why_and_stay_unique():
    when = datetime(2026, 11, 30, 3, 0, 12, tzinfo=timezone.utc)
    assert experiments.dated_name("retrain", when, "scheduled", set()) \
        == "retrain-2026-11-30-0300-scheduled"
    assert experiments.dated_name("retrain", when, "manual", {
        "retrain-2026-11-30-0300-manual", "retrain-2026-11-30-0300-manual-2"}) \
        == "retrain-2026-11-30-0300-manual-3"


def test_overrides_go_to_dvc_as_validated_values(monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = {"train.lr": "1e-4", "train.device": "cpu", "retrain.min_improvement": 0.01}
    assert experiments.set_args(overrides) == [
        "-S", "++train.lr=0.0001", "-S", '++train.device="cpu"',
        "-S", "++retrain.min_improvement=0.01"]


def test_overrides_are_validated_like_params_yaml():
    assert load_params(REPO / "params.yaml", {"train.seed": 7}).train.seed == 7
    for overrides, message in [({"train.seed": "x"}, "override train.seed: Input should be"),
                               ({"train.epochs": 0}, "override train.epochs: Input should be"),
                               ({"retrain.min_improvement": -1},
                                "override retrain.min_improvement: Input should be"),
                               ({"trian.seed": 1}, "override trian: unknown key"),
                               ({"seed": 1}, "override seed: not a section.key")]:
        with pytest.raises(ConfigError, match=message):
            load_params(REPO / "params.yaml", overrides)


def test_summary_names_the_deciding_metric_in_unbroken_paragraphs():
    run = Candidate("retrain-x", "b" * 40, "a" * 40)
    text = summary_markdown(run, "refused, HEAD's model stays: validation accuracy fell",
                            {"train.seed": 7}, {"val": 0.9, "test": 0.8},
                            {"val": 0.85, "test": 0.82}, "a drop of at most 0.005",
                            {"train": True, "report": False},
                            {"metrics/metrics.json": {"accuracy.val": {
                                "old": 0.9, "new": 0.85, "diff": -0.05}}},
                            "To promote it by hand: `dvc exp apply retrain-x`.")
    assert "| accuracy.val | 0.9000 | 0.8500 | -0.0500 | decided the gate |" in text
    assert "| accuracy.test | 0.8000 | 0.8200 | +0.0200 | reported only |" in text
    assert "| train | new result |" in text and "| report | same as HEAD |" in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            assert all(cell.strip() for cell in line.strip("|").split("|")), line  # headers
        elif line and not line.startswith(("|", "#")):  # a paragraph is one source line
            assert not (i + 1 < len(lines) and lines[i + 1]
                        and not lines[i + 1].startswith(("|", "#"))), line


def test_a_second_command_in_the_workspace_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with workspace_lock("retrain"), pytest.raises(
            WorkspaceBusy, match=rf"`fashionnet retrain` \(pid {os.getpid()}\)"), \
            workspace_lock("seeds"):
        pass
    with workspace_lock("seeds"):  # released: the next one goes ahead
        pass


def test_prefect_yaml_is_the_scheduled_deployment_on_a_worker():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == DEPLOYMENT]
    assert deployment["concurrency_limit"] == 1
    (schedule,) = deployment["schedules"]
    assert schedule == {"cron": load_params(REPO / "params.yaml").schedule.cron,
                        "timezone": "UTC"}
    (clone,) = spec["pull"]
    assert set(clone) == {"prefect.deployments.steps.git_clone"}
    for entry in spec["deployments"]:  # what a worker loads
        flow = load_flow_from_entrypoint(entry["entrypoint"], use_placeholder_flow=False)
        assert flow.name == {DEPLOYMENT: FLOW_NAME, "experiment": "fashionnet-experiment"}[
            entry["name"]]


def test_bad_override_exits_2_and_changes_nothing(repo_copy, cli):
    before = git(repo_copy, "status", "--porcelain", "--ignored")
    code, out, err = cli(repo_copy, "retrain", "-S", "train.epochs=0")
    assert code == 2, out + err
    assert err.splitlines() == ["fashionnet retrain: error: override train.epochs: Input "
                                "should be greater than or equal to 1 (got 0)"]
    assert git(repo_copy, "status", "--porcelain", "--ignored") == before


def deploy(repo: Path, env: dict[str, str], prefect_api: str):
    """`prefect deploy --all` in ``repo`` on a process work pool; the scheduled deployment."""
    ok(repo, env, "prefect", "work-pool", "create", "fashionnet", "--type", "process",
       "--overwrite")
    ok(repo, env, "prefect", "--no-prompt", "deploy", "--all", timeout=120)
    with prefect_client(prefect_api) as client:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}")


@pytest.mark.slow
def test_prefect_deploy_records_the_git_remote_branch_and_limit(repo_copy, cli_env,
                                                                prefect_api):
    git(repo_copy, "branch", "-M", "weekly")
    git(repo_copy, "remote", "add", "origin", "https://git.example/fashionnet.git")
    deployment = deploy(repo_copy, cli_env, prefect_api)
    try:
        assert deployment.work_pool_name == "fashionnet"
        assert deployment.entrypoint == "pipeline.retrain:retrain_flow"
        assert deployment.global_concurrency_limit.limit == 1  # runs never overlap
        (step,) = deployment.pull_steps
        clone = step["prefect.deployments.steps.git_clone"]
        assert (clone["repository"], clone["branch"]) == ("https://git.example/fashionnet.git",
                                                          "weekly")
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == load_params(REPO / "params.yaml").schedule.cron
        assert schedule.schedule.timezone == "UTC"
    finally:
        with prefect_client(prefect_api) as client:
            client.delete_deployment(deployment.id)


def test_retrain_from_a_detached_head_is_refused_before_any_work(repo_copy, cli, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    git(repo_copy, "checkout", "-q", "--detach")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        code, out, err = cli(repo_copy, "retrain")
    assert code == 1, out + err
    assert err.splitlines() == ["fashionnet retrain: failed: RuntimeError: HEAD is detached: "
                                "check out the branch to commit to"]
    assert "dvc exp run" not in out and not (repo_copy / ".dvc" / "tmp" / "exps").exists()


def test_serve_listens_for_this_repositorys_ingest_events(repo_copy, monkeypatch):
    """`fashionnet serve` gets prefect.yaml's trigger, on the events of its own repository: the
    resource id `fashionnet ingest --push` emits for the remote it pushes to."""
    from pipeline.retrain import served_triggers
    from pipeline.sharing import EVENT, resource_id

    monkeypatch.chdir(repo_copy)
    assert served_triggers() == []  # no git remote: no push, no event
    git(repo_copy, "remote", "add", "origin", "https://git.example/team/fashionnet.git")
    (trigger,) = served_triggers()
    assert trigger.match["prefect.resource.id"] == [resource_id(
        "https://git.example/team/fashionnet.git")]
    assert trigger.expect == {EVENT}
    assert trigger.parameters == {"ingested": "{{ event.payload.commit }}"}
    assert (trigger.within.total_seconds(), trigger.schedule_after.total_seconds()) == (300, 300)


def test_a_promotion_the_remote_refuses_leaves_no_tags_and_the_branch_where_it_was(
        repo_copy, tmp_path, prefect_harness, monkeypatch):
    from prefect import flow

    from pipeline.promotion import promote

    monkeypatch.chdir(repo_copy)
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    branch = git(repo_copy, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(repo_copy, "push", "-q", str(origin), branch)
    git(repo_copy, "remote", "add", "origin", str(origin))
    baseline = git(repo_copy, "rev-parse", "HEAD").strip()
    (repo_copy / "README.md").write_text("retrained\n")
    git(repo_copy, "commit", "-qam", "the experiment's commit")
    rev = git(repo_copy, "rev-parse", "HEAD").strip()
    git(repo_copy, "reset", "-q", "--hard", baseline)
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)

    @flow
    def promotion() -> tuple[str, str]:
        return promote(Candidate("retrain-x", rev, baseline), branch, "Retrain x", "origin")

    with pytest.raises(RuntimeError, match="origin refused the promotion commit"):
        promotion()
    assert git(repo_copy, "tag") == ""  # registered, then unregistered: nothing was shared
    assert git(repo_copy, "rev-parse", "HEAD").strip() == baseline
    assert git(origin, "rev-parse", branch).strip() == baseline

    # A failure between the two registry tags: the first one goes too.
    hook.unlink()

    def assign_fails(*_, **__):
        raise RuntimeError("gto assign failed")

    monkeypatch.setattr("gto.api.assign", assign_fails)
    with pytest.raises(RuntimeError, match="gto assign failed"):
        promotion()
    assert git(repo_copy, "tag") == "" and git(origin, "tag") == ""
    assert git(origin, "rev-parse", branch).strip() == baseline


def test_served_workspace_behind_the_ingest_fast_forwards_to_it_or_refuses(
        repo_copy, tmp_path, prefect_harness, monkeypatch):
    from prefect import flow

    from pipeline.retrain import _check_ingested

    origin, other = tmp_path / "origin.git", tmp_path / "other"
    git(tmp_path, "clone", "-q", "--bare", str(repo_copy), str(origin))
    git(repo_copy, "remote", "add", "origin", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(other))
    (other / "data" / "incoming" / "manifest.csv").write_text("as if a batch came\n")
    git(other, "commit", "-qam", "Ingest batch x")
    git(other, "push", "-q")
    ingested = git(other, "rev-parse", "HEAD").strip()

    @flow
    def check() -> None:
        _check_ingested(ingested, "origin")

    monkeypatch.chdir(repo_copy)
    (repo_copy / "README.md").write_text("a local change\n")
    with pytest.raises(RuntimeError, match=f"the ingested commit {ingested[:8]} is not in this "
                                           "workspace's history .* pull, then retrain"):
        check()
    git(repo_copy, "checkout", "-q", "README.md")
    check()  # the serve workspace, clean and behind: fast-forwarded
    assert git(repo_copy, "rev-parse", "HEAD").strip() == ingested
