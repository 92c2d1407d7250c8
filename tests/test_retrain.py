"""The retraining flow: DVC's stage order, the gate, the workspace lock, the CLI and, against a
real Prefect server, the served deployment, its schedule, a triggered run and its artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fashionnet.errors import ConfigError
from pipeline import paths
from pipeline.dvc import LOCK_FILE, WorkspaceBusy, workspace_lock
from pipeline.params import load_params
from pipeline.retrain import DEPLOYMENT, FLOW_NAME, judge, plan, write_overrides
from tests.conftest import REPO, copy_repo, git, repo_env, set_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
ARTIFACTS = {"fashionnet-retrain-summary", "fashionnet-retrain-per-class",
             "fashionnet-retrain-report"}


def test_stage_order_and_force_come_from_dvc_yaml(monkeypatch):
    monkeypatch.chdir(REPO)
    order, forced = plan()
    stages = DVC["stages"]
    assert sorted(order) == sorted(stages)

    def outs(name: str) -> list[str]:
        return [o if isinstance(o, str) else next(iter(o))
                for o in stages[name].get("outs", []) + stages[name].get("metrics", [])]

    def upstream(name: str) -> set[str]:  # stages whose outs this one reads
        return {other for other in stages for dep in stages[name]["deps"] for out in outs(other)
                if dep == out or dep.startswith(out + "/")}

    for name in stages:
        assert all(order.index(up) < order.index(name) for up in upstream(name)), name
    downstream, grew = {"train"}, True
    while grew:
        more = {name for name in stages if upstream(name) & downstream} - downstream
        downstream, grew = downstream | more, bool(more)
    assert forced == downstream


@pytest.mark.parametrize(("old", "new", "refused"), [
    (None, 0.10, False),    # first run: nothing committed to compare with
    (0.9000, 0.9100, False),
    (0.9000, 0.8950, False),  # exactly the allowed drop
    (0.9000, 0.8949, True),
    (0.9000, 0.5000, True),
])
def test_gate(old, new, refused):
    reason = judge(old, new, 0.005)
    assert (reason is not None) == refused
    if refused:
        assert "retrain.max_accuracy_drop" in reason and f"{old:.4f} -> {new:.4f}" in reason


def test_overrides_are_validated_like_params_yaml():
    assert load_params(REPO / "params.yaml", {"train.seed": 7}).train.seed == 7
    for overrides, message in [({"train.seed": "x"}, "override train.seed: Input should be"),
                               ({"train.epochs": 0}, "override train.epochs: Input should be"),
                               ({"trian.seed": 1}, "override trian: unknown key"),
                               ({"seed": 1}, "override seed: not a section.key")]:
        with pytest.raises(ConfigError, match=message):
            load_params(REPO / "params.yaml", overrides)


def test_overrides_keep_params_yaml_comments(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    overrides = {"train.lr": "1e-4", "split.limit": 300}  # "1e-4": what YAML 1.1 reads as text
    write_overrides(load_params(overrides=overrides), overrides)
    text = (tmp_path / "params.yaml").read_text()
    assert "# retraining schedule, UTC" in text and "lr: 0.0001" in text
    params = load_params()
    assert (params.train.lr, params.split.limit, params.train.epochs) == (1e-4, 300, 60)


def test_a_second_retrain_in_the_workspace_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with workspace_lock(), pytest.raises(WorkspaceBusy, match=f"pid {os.getpid()}"), \
            workspace_lock():
        pass
    with workspace_lock():  # released: the next one goes ahead
        pass


def test_prefect_yaml_is_the_served_deployment():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert deployment["name"] == DEPLOYMENT
    assert deployment["entrypoint"] == "pipeline/retrain.py:retrain_flow"
    (schedule,) = deployment["schedules"]
    assert schedule == {"cron": load_params(REPO / "params.yaml").schedule.cron,
                        "timezone": "UTC"}


# --- against the session's Prefect server -------------------------------------------------

def fashionnet(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fashionnet", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


def workspace(repo: Path) -> dict[str, str]:
    """Every file's digest outside .git and DVC's cache, with git's index and status."""
    skip = {(".git",), (".dvc", "cache"), (".dvc", "tmp")}
    state = {}
    for path in sorted(repo.rglob("*")):
        parts = path.relative_to(repo).parts
        if path.is_file() and parts[:1] not in skip and parts[:2] not in skip:
            state[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {**state, "git index": git(repo, "ls-files", "-s"),
            "git status": git(repo, "status", "--porcelain")}


def dvc_status(repo: Path, env: dict[str, str]) -> str:
    return subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, prefect_api: str, raw_dir: Path) -> tuple[Path, dict[str, str]]:
    """A repository on small params whose first `fashionnet retrain` is committed."""
    repo = copy_repo(tmp_path_factory.mktemp("retrain") / "repo")
    env = repo_env(repo, prefect_api, raw_dir)
    set_params(repo, **{"split.limit": 600, "split.val_size": 1000, "train.epochs": 1})
    git(repo, "commit", "-qam", "small params")
    result = fashionnet(repo, env, "retrain")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "promoted (no committed metrics to compare with)" in result.stdout
    for stage in DVC["stages"]:
        assert f"Running stage '{stage}'" in result.stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline model")
    return repo, env


def api(prefect_api: str, method: str, path: str, body: object = None) -> object:
    response = httpx.request(method, f"{prefect_api}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def latest_artifacts(prefect_api: str, flow_run_id: str) -> dict[str, dict]:
    found = api(prefect_api, "POST", "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}  # keyless ones: Prefect's stored results


@pytest.mark.slow
def test_a_worse_retrain_fails_and_keeps_the_previous_model(baseline, prefect_api):
    repo, env = baseline
    before = workspace(repo)
    committed = json.loads((repo / paths.METRICS_JSON).read_text())
    result = fashionnet(repo, env, "retrain", "-S", "train.lr=1e-7")  # barely moves: ~10%
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RetrainRejected" in result.stderr and "retrain.max_accuracy_drop" in result.stderr
    assert workspace(repo) == before  # model, metrics, report, params.yaml, dvc.lock, index
    assert "up to date" in dvc_status(repo, env)
    # The failed run's summary holds the diff that refused it.
    (run,) = api(prefect_api, "POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": [FLOW_NAME]}},
        "flow_runs": {"state": {"type": {"any_": ["FAILED"]}}},
        "sort": "START_TIME_DESC", "limit": 1})
    assert "RetrainRejected" in run["state"]["message"]
    artifacts = latest_artifacts(prefect_api, run["id"])
    assert set(artifacts) == ARTIFACTS
    summary = artifacts["fashionnet-retrain-summary"]["data"]
    assert "refused" in summary and "`train.lr=1e-7`" in summary
    assert f"| metrics/metrics.json | accuracy.test | {committed['accuracy']['test']:.4f} |" \
        in summary


def test_bad_override_exits_2_and_changes_nothing(repo_copy, cli_env):
    before = (repo_copy / "params.yaml").read_bytes()
    result = fashionnet(repo_copy, cli_env, "retrain", "-S", "train.epochs=0")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "train.epochs" in line and "Traceback" not in result.stdout + result.stderr
    assert (repo_copy / "params.yaml").read_bytes() == before
    assert not (repo_copy / "dvc.lock").exists()


def test_prefect_deploy_creates_the_scheduled_deployment(repo_copy, cli_env, prefect_api):
    pool = "fashionnet"
    subprocess.run(["prefect", "work-pool", "create", pool, "--type", "process",
                    "--overwrite"], cwd=repo_copy, env=cli_env, check=True, capture_output=True)
    result = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=repo_copy,
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    deployment = api(prefect_api, "GET", f"/deployments/name/{FLOW_NAME}/{DEPLOYMENT}")
    assert deployment["work_pool_name"] == pool
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == load_params(REPO / "params.yaml").schedule.cron
    assert schedule["schedule"]["timezone"] == "UTC"
    api(prefect_api, "DELETE", f"/deployments/{deployment['id']}")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return result


@pytest.mark.slow
def test_serve_runs_the_scheduled_deployment(baseline, prefect_api, tmp_path):
    repo, env = baseline
    cron = load_params(repo / "params.yaml").schedule.cron
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["fashionnet", "serve"], cwd=repo, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        def deployment() -> dict | None:
            found = api(prefect_api, "POST", "/deployments/filter", {
                "flows": {"name": {"any_": [FLOW_NAME]}},
                "deployments": {"name": {"any_": [DEPLOYMENT]}}})
            return found[0] if found and found[0]["work_pool_name"] is None else None

        served = wait_for(deployment, 120, f"the deployment:\n{log.read_text()}")
        (schedule,) = served["schedules"]
        assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == (cron, "UTC")
        assert schedule["active"] and not served["paused"]
        wait_for(lambda: api(prefect_api, "POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [served["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}), 120, "scheduled runs")

        started = time.time()
        run = api(prefect_api, "POST", f"/deployments/{served['id']}/create_flow_run",
                  {"parameters": {"force": True}})

        def state() -> str:
            return api(prefect_api, "GET", f"/flow_runs/{run['id']}")["state"]["type"]

        # While it runs, a second retrain in the same workspace ends at once, changing nothing.
        lock = repo / LOCK_FILE
        wait_for(lambda: state() == "RUNNING" and lock.is_file() and lock.read_text(), 120,
                 "the served run to hold the workspace")
        second = fashionnet(repo, env, "retrain")
        assert second.returncode == 1, second.stdout + second.stderr
        assert "`fashionnet retrain` (pid" in second.stderr
        assert state() == "RUNNING", "the run ended before the second retrain could overlap it"

        final = wait_for(lambda: (s := state()) in {"COMPLETED", "FAILED", "CRASHED"} and s,
                         300, f"the run:\n{log.read_text()}")
        assert final == "COMPLETED", log.read_text()
        assert set(latest_artifacts(prefect_api, run["id"])) == ARTIFACTS
        assert (repo / paths.METRICS_JSON).stat().st_mtime > started
        metrics = json.loads((repo / paths.METRICS_JSON).read_text())
        assert metrics["accuracy"]["test"] > 0.5  # 600 images, one epoch
        assert "up to date" in dvc_status(repo, env)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
