"""The retraining flow: the validation gate, the experiment's name and overrides, the summary,
the workspace lock, the CLI and, against a real Prefect server, git remote and DVC remote: a
refused retrain, a promoted one, the served deployment and the scheduled one on a worker."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dvc.api
import httpx
import pytest
import yaml

from fashionnet.errors import ConfigError
from pipeline import paths
from pipeline.dvc import WorkspaceBusy, workspace_lock
from pipeline.params import load_params
from pipeline.retrain import (
    DEPLOYMENT,
    FLOW_NAME,
    Experiment,
    experiment_name,
    judge,
    override_args,
    summary_markdown,
)
from tests.helpers import BIN, REPO, copy_repo, git, repo_env, set_params, wait_for

ARTIFACTS = {"fashionnet-retrain-summary", "fashionnet-retrain-per-class",
             "fashionnet-retrain-report"}
MAX_DROP = load_params(REPO / "params.yaml").retrain.max_accuracy_drop


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
    assert experiment_name(when, True, set()) == "retrain-2026-11-30-0300-scheduled"
    assert experiment_name(when, False, {"retrain-2026-11-30-0300-manual"}) \
        == "retrain-2026-11-30-0300-manual-2"


def test_overrides_go_to_dvc_as_validated_values():
    overrides = {"train.lr": "1e-4", "train.device": "cpu", "retrain.min_improvement": 0.01}
    params = load_params(REPO / "params.yaml", overrides)
    assert override_args(params, overrides) == [
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
    run = Experiment("retrain-x", "b" * 40, "a" * 40)
    text = summary_markdown(run, "refused, HEAD's model stays: validation accuracy fell",
                            {"train.seed": 7}, {"val": 0.9, "test": 0.8},
                            {"val": 0.85, "test": 0.82}, "a drop of at most 0.005",
                            {"train": True, "report": False},
                            {"metrics/metrics.json": {"accuracy.val": {
                                "old": 0.9, "new": 0.85, "diff": -0.05}}},
                            "To promote it by hand: `dvc exp apply retrain-x`.")
    assert "| accuracy.val | 0.9000 | 0.8500 | -0.0500 | decided the gate |" in text
    assert "| accuracy.test | 0.8000 | 0.8200 | +0.0200 | reported only |" in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            assert all(cell.strip() for cell in line.strip("|").split("|")), line  # headers
        elif line and not line.startswith(("|", "#")):  # a paragraph is one source line
            assert not (i + 1 < len(lines) and lines[i + 1]
                        and not lines[i + 1].startswith(("|", "#"))), line


def test_a_second_retrain_in_the_workspace_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with workspace_lock(), pytest.raises(WorkspaceBusy, match=f"pid {os.getpid()}"), \
            workspace_lock():
        pass
    with workspace_lock():  # released: the next one goes ahead
        pass


def test_prefect_yaml_is_the_scheduled_deployment_on_a_worker():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == DEPLOYMENT]
    assert deployment["concurrency_limit"] == 1
    (schedule,) = deployment["schedules"]
    assert schedule == {"cron": load_params(REPO / "params.yaml").schedule.cron,
                        "timezone": "UTC"}
    (clone,) = spec["pull"]
    assert set(clone) == {"prefect.deployments.steps.git_clone"}
    # What a worker does with the entrypoint, in a fresh interpreter at the repository root.
    code = ("from prefect.flows import load_flow_from_entrypoint as load; "
            f"print(load({deployment['entrypoint']!r}, use_placeholder_flow=False).name)")
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=REPO, capture_output=True,
                         text=True)
    assert out.stdout.strip() == FLOW_NAME, out.stderr


# --- against the session's Prefect server, a git remote and a DVC remote -------------------

def fashionnet(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fashionnet", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)


def dvc_cli(repo: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {args}: {result.stdout}{result.stderr}"
    return result.stdout


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


def api(prefect_api: str, method: str, path: str, body: object = None) -> object:
    for attempt in range(5):  # 503: a retryable server error (SQLite busy), as Prefect's client
        response = httpx.request(method, f"{prefect_api}{path}", json=body, timeout=30)
        if response.status_code != 503:
            break
        time.sleep(2 ** attempt)
    response.raise_for_status()
    return response.json() if response.content else None


def artifacts(prefect_api: str, flow_run_id: str) -> dict[str, dict]:
    found = api(prefect_api, "POST", "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}  # keyless ones: Prefect's stored results


def last_run(prefect_api: str, state: str) -> dict:
    (run,) = api(prefect_api, "POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": [FLOW_NAME]}},
        "flow_runs": {"state": {"type": {"any_": [state]}}},
        "sort": "START_TIME_DESC", "limit": 1})
    return run


def retrains(repo: Path, baseline: str = "HEAD") -> dict[str, dict]:
    """`dvc exp show`'s rows of the retrain experiments run on ``baseline``, by name."""
    return {row["Experiment"]: row for row in dvc.api.exp_show(repo=str(repo), revs=baseline)
            if (row.get("Experiment") or "").startswith("retrain-")}


@dataclass(frozen=True)
class Remotes:
    """A bare git repository and a local-directory DVC remote holding a trained baseline."""

    git_dir: Path
    storage: Path

    @property
    def url(self) -> str:
        return self.git_dir.as_uri()  # file://: git_clone's --depth 1 clone, as from a server


@pytest.fixture(scope="module")
def remotes(tmp_path_factory, prefect_api: str, raw_dir: Path) -> Remotes:
    """The repository on tiny params, trained once with `dvc repro`, committed and pushed to
    a bare git remote (branch main) and a DVC remote it names in .dvc/config."""
    root = tmp_path_factory.mktemp("remotes")
    found = Remotes(root / "origin.git", root / "storage")
    git(root, "init", "-q", "--bare", str(found.git_dir))
    git(found.git_dir, "symbolic-ref", "HEAD", "refs/heads/main")  # what a clone checks out
    repo = copy_repo(root / "seed")
    env = repo_env(repo, prefect_api, raw_dir)
    git(repo, "branch", "-M", "main")
    set_params(repo, **{"split.limit": 300, "split.val_size": 1000, "train.epochs": 1})
    dvc_cli(repo, env, "remote", "add", "-d", "storage", str(found.storage))
    git(repo, "commit", "-qam", "tiny params, a DVC remote")
    dvc_cli(repo, env, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline model")
    dvc_cli(repo, env, "push")
    git(repo, "remote", "add", "origin", found.url)
    git(repo, "push", "-q", "-u", "origin", "main")
    return found


def clone(url: str, dest: Path, prefect_api: str, raw_dir: Path,
          storage: Path | None = None) -> tuple[Path, dict[str, str]]:
    """A user's clone of ``url`` with its data pulled (from ``storage`` if given)."""
    git(dest.parent, "clone", "-q", url, str(dest))
    env = repo_env(dest, prefect_api, raw_dir)
    if storage:
        dvc_cli(dest, env, "remote", "modify", "--local", "storage", "url", str(storage))
    dvc_cli(dest, env, "pull")
    return dest, env


def craft_head(repo: Path, env: dict[str, str], val: float, test: float) -> None:
    """Commit metrics/metrics.json at HEAD with these accuracies, recorded in dvc.lock (`dvc
    commit`) so that `dvc status` stays clean: the gate compares with HEAD's figures."""
    path = repo / paths.METRICS_JSON
    metrics = json.loads(path.read_text())
    metrics["accuracy"].update(val=val, test=test)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    dvc_cli(repo, env, "commit", "--force", "evaluate")
    git(repo, "commit", "-qam", f"crafted: val {val}, test {test}")


@pytest.mark.slow
def test_a_retrain_whose_validation_drops_is_refused_while_test_rises(remotes, tmp_path,
                                                                      prefect_api, raw_dir):
    repo, env = clone(remotes.url, tmp_path / "ws", prefect_api, raw_dir)
    git(repo, "remote", "remove", "origin")  # this one stays local
    craft_head(repo, env, val=0.99, test=0.10)
    before, status = workspace(repo), dvc_cli(repo, env, "status")
    result = fashionnet(repo, env, "retrain", "-S", "train.seed=7")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RetrainRejected" in result.stderr and "validation accuracy fell" in result.stderr
    assert workspace(repo) == before  # branch, model, metrics, report, params.yaml, index
    assert dvc_cli(repo, env, "status") == status
    (row,) = retrains(repo).values()  # `dvc exp show` lists the refused run
    assert row["train.seed"] == 7
    assert row["accuracy.val"] < 0.99 - MAX_DROP and row["accuracy.test"] > 0.10
    run = last_run(prefect_api, "FAILED")
    assert "RetrainRejected" in run["state"]["message"]
    found = artifacts(prefect_api, run["id"])
    assert set(found) == ARTIFACTS
    summary = found["fashionnet-retrain-summary"]["data"]
    assert f"`{row['Experiment']}`: refused" in summary and "`train.seed=7`" in summary
    assert f"| accuracy.val | 0.9900 | {row['accuracy.val']:.4f} |" in summary
    assert f"| accuracy.test | 0.1000 | {row['accuracy.test']:.4f} |" in summary
    assert "decided the gate" in summary and "reported only" in summary


@pytest.mark.slow
def test_a_promoted_retrain_is_one_commit_on_the_branch_and_both_remotes(remotes, tmp_path,
                                                                         prefect_api, raw_dir):
    own = Remotes(tmp_path / "origin.git", tmp_path / "storage")  # this test's copy
    shutil.copytree(remotes.git_dir, own.git_dir)
    shutil.copytree(remotes.storage, own.storage)
    repo, env = clone(own.url, tmp_path / "ws", prefect_api, raw_dir, own.storage)
    craft_head(repo, env, val=0.10, test=0.99)  # the test accuracy will fall: it never decides
    git(repo, "push", "-q", "origin", "main")
    base = git(repo, "rev-parse", "HEAD").strip()

    result = fashionnet(repo, env, "retrain", "-S", "train.seed=5")
    assert result.returncode == 0, result.stdout + result.stderr
    head = git(repo, "rev-parse", "HEAD").strip()
    assert git(repo, "rev-list", f"{base}..{head}").split() == [head]  # one new commit
    (row,) = retrains(repo, base).values()
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
    assert "Data and pipelines are up to date." in dvc_cli(repo, env, "status")
    assert git(repo, "status", "--porcelain") == ""

    # Both remotes: the commit on the git remote's main, its data in the DVC remote.
    assert git(repo, "ls-remote", own.url, "refs/heads/main").split()[0] == head
    assert name in dvc_cli(repo, env, "exp", "list", "origin", "--rev", base, "--name-only")
    fresh, fresh_env = clone(own.url, tmp_path / "fresh", prefect_api, raw_dir, own.storage)
    lock = yaml.safe_load((fresh / "dvc.lock").read_text())
    (model,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == str(paths.MODEL)]
    assert hashlib.md5((fresh / paths.MODEL).read_bytes()).hexdigest() == model["md5"]
    diff = json.loads(dvc_cli(fresh, fresh_env, "metrics", "diff", "HEAD~1", "--json"))
    change = diff["metrics/metrics.json"]["accuracy.val"]
    assert (change["old"], change["new"]) == (0.10, val)


def test_bad_override_exits_2_and_changes_nothing(repo_copy, cli_env):
    before = workspace(repo_copy)
    result = fashionnet(repo_copy, cli_env, "retrain", "-S", "train.epochs=0")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "train.epochs" in line and "Traceback" not in result.stdout + result.stderr
    assert workspace(repo_copy) == before


def deploy(repo: Path, env: dict[str, str], prefect_api: str) -> dict:
    """`prefect deploy --all` in ``repo`` on a process work pool; the deployment."""
    subprocess.run(["prefect", "work-pool", "create", "fashionnet", "--type", "process",
                    "--overwrite"], cwd=repo, env=env, check=True, capture_output=True)
    result = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return api(prefect_api, "GET", f"/deployments/name/{FLOW_NAME}/{DEPLOYMENT}")


def test_prefect_deploy_records_the_git_remote_branch_and_limit(repo_copy, cli_env,
                                                                prefect_api):
    git(repo_copy, "branch", "-M", "weekly")
    git(repo_copy, "remote", "add", "origin", "https://git.example/fashionnet.git")
    deployment = deploy(repo_copy, cli_env, prefect_api)
    try:
        assert deployment["work_pool_name"] == "fashionnet"
        assert deployment["entrypoint"] == "pipeline.retrain:retrain_flow"
        assert deployment["global_concurrency_limit"]["limit"] == 1  # runs never overlap
        (step,) = deployment["pull_steps"]
        assert step["prefect.deployments.steps.git_clone"]["repository"] \
            == "https://git.example/fashionnet.git"
        assert step["prefect.deployments.steps.git_clone"]["branch"] == "weekly"
        (schedule,) = deployment["schedules"]
        assert schedule["schedule"]["cron"] == load_params(REPO / "params.yaml").schedule.cron
        assert schedule["schedule"]["timezone"] == "UTC"
    finally:
        api(prefect_api, "DELETE", f"/deployments/{deployment['id']}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT ``proc`` (and its process group), SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_the_scheduled_deployment_runs_on_a_process_worker(remotes, tmp_path, prefect_api,
                                                           raw_dir):
    repo, env = clone(remotes.url, tmp_path / "deployer", prefect_api, raw_dir)
    deployment = deploy(repo, env, prefect_api)
    before = git(repo, "ls-remote", remotes.url, "refs/heads/main").split()[0]
    committed = json.loads(git(repo, "show", f"{before}:{paths.METRICS_JSON}"))["accuracy"]
    log = tmp_path / "worker.log"
    worker_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the clone's own code
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", "fashionnet", "--type", "process",
             "--name", "retrain-worker"], cwd=tmp_path, env=worker_env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "Worker 'retrain-worker' started" in log.read_text(), "the worker",
                 proc=worker, log=log)
        started = subprocess.run(["prefect", "deployment", "run", f"{FLOW_NAME}/{DEPLOYMENT}",
                                  "--param", "force=true"], cwd=repo, env=env,
                                 capture_output=True, text=True, check=True)
        (run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", started.stdout)
        run = api(prefect_api, "GET", f"/flow_runs/{run_id}")
        assert run["deployment_id"] == deployment["id"]

        def state() -> str:
            return api(prefect_api, "GET", f"/flow_runs/{run['id']}")["state"]["type"]

        final = wait_for(lambda: (s := state()) in {"COMPLETED", "FAILED", "CRASHED"} and s,
                         "the run's end", 900, proc=worker, log=log)
    finally:
        stop(worker)
        api(prefect_api, "DELETE", f"/deployments/{deployment['id']}")
    # The experiment is on the git remote (pushed from the worker's clone, now gone).
    refs = git(repo, "ls-remote", remotes.url, "refs/exps/*").split()
    (exp,) = [sha for sha, ref in zip(refs[::2], refs[1::2], strict=True)
              if ref.startswith(f"refs/exps/{before[:2]}/{before[2:]}/retrain-")]
    git(repo, "fetch", "-q", remotes.url, exp)
    new = json.loads(git(repo, "show", f"{exp}:{paths.METRICS_JSON}"))["accuracy"]
    after = git(repo, "ls-remote", remotes.url, "refs/heads/main").split()[0]
    summary = artifacts(prefect_api, run["id"])
    assert set(summary) == ARTIFACTS, log.read_text()
    if judge(committed["val"], new["val"], MAX_DROP) is None:  # as the gate says
        assert final == "COMPLETED", log.read_text()
        git(repo, "fetch", "-q", "origin")
        assert git(repo, "rev-parse", f"{after}^") == before + "\n"
        assert git(repo, "rev-parse", f"{after}^{{tree}}") == \
            git(repo, "rev-parse", f"{exp}^{{tree}}")
        assert "promoted as commit" in summary["fashionnet-retrain-summary"]["data"]
    else:
        assert final == "FAILED" and after == before, log.read_text()
        assert "refused" in summary["fashionnet-retrain-summary"]["data"]
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_serve_runs_the_deployment_in_this_workspace(remotes, tmp_path, prefect_api, raw_dir):
    repo, env = clone(remotes.url, tmp_path / "ws", prefect_api, raw_dir)
    git(repo, "remote", "remove", "origin")
    before = workspace(repo)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["fashionnet", "serve"], cwd=repo, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def deployment() -> dict | None:
            found = api(prefect_api, "POST", "/deployments/filter", {
                "flows": {"name": {"any_": [FLOW_NAME]}},
                "deployments": {"name": {"any_": [DEPLOYMENT]}}})
            return found[0] if found and found[0]["work_pool_name"] is None else None

        served = wait_for(deployment, "the deployment", proc=server, log=log)
        (schedule,) = served["schedules"]
        assert schedule["schedule"]["cron"] == load_params(repo / "params.yaml").schedule.cron
        run = api(prefect_api, "POST", f"/deployments/{served['id']}/create_flow_run", {})
        final = wait_for(lambda: (s := api(prefect_api, "GET", f"/flow_runs/{run['id']}")
                                  ["state"]["type"]) in {"COMPLETED", "FAILED", "CRASHED"} and s,
                         "the run's end", 300, proc=server, log=log)
        assert final == "COMPLETED", log.read_text()
        # Nothing was stale: the experiment equals HEAD, and the workspace stays as it was.
        summary = artifacts(prefect_api, run["id"])["fashionnet-retrain-summary"]["data"]
        assert "nothing changed: HEAD's model stands" in summary
        assert workspace(repo) == before
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(server)
            raise
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    api(prefect_api, "DELETE", f"/deployments/{served['id']}")  # after serve paused it
