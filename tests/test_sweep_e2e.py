"""`fashionnet sweep --pool` end to end on real servers: a Prefect server with authentication,
two process workers, a bare git repository as the git remote and an S3 server (SeaweedFS) as
the DVC remote; and a sweep interrupted with Ctrl-C, with a local-directory DVC remote.

The two-worker sweep runs once (module fixture ``swept``), a run killed mid-way included;
each test asserts one behaviour of it."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from pipeline import paths
from tests.helpers import (
    BIN,
    copy_repo,
    git,
    ok,
    prefect_client,
    repo_env,
    run,
    set_params,
    wait_for,
)
from tests.servers import PrefectServer, S3Server, bare_git_remote, process_worker, s3_server

POOL = "fashionnet-test"
SWEEP = ["fashionnet", "sweep", "-S", "train.epochs=1,2", "--recipe", "recipes/tiny.yaml",
         "--pool", POOL]


def flow_runs(server: PrefectServer, name: str) -> list:
    """The flow runs named ``name``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with prefect_client(server.api_url, server.auth_string) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def kill_run_after_first_epoch(workers: list[subprocess.Popen], epochs: int,
                               sweep: subprocess.Popen) -> None:
    """kill -9 the flow run process whose clone trains ``epochs`` epochs, and every process
    it started, once its first epoch's checkpoint is written (while ``sweep`` runs)."""
    def training() -> psutil.Process | None:
        for worker in workers:
            for proc in psutil.Process(worker.pid).children():
                try:  # the experiment runs in a temporary copy inside the worker's clone
                    checkpoint = next(Path(proc.cwd()).glob(f".dvc/tmp/exps/**/{paths.CHECKPOINT}"),
                                      None)
                    params = None if checkpoint is None else yaml.safe_load(
                        (checkpoint.parents[1] / "params.yaml").read_text())
                except (psutil.Error, OSError, yaml.YAMLError):
                    continue
                if isinstance(params, dict) and params["train"]["epochs"] == epochs:
                    return proc
        return None

    run_proc = wait_for(training, f"the {epochs}-epoch run's first checkpoint", 300, proc=sweep)
    tree = [run_proc, *run_proc.children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)


@dataclass(frozen=True)
class Swept:
    """What the two-worker sweep did, step by step."""

    repo: Path
    env: dict[str, str]
    remote: Path
    s3: S3Server
    refused: tuple[str, str]  # stderr when not pushed to git, then not to the DVC remote
    killed: subprocess.CompletedProcess[str]  # the sweep whose 2-epoch run was killed
    worker_logs: dict[str, str]
    on_remote_after_crash: list[str]
    keys: tuple[set[str], set[str]]  # S3's objects before the sweep, and after the crash
    table_untouched: bool  # metrics/sweep.csv as before the failed sweep
    rerun_log: str


@pytest.fixture(scope="module")
def swept(tmp_path_factory, authed_prefect: PrefectServer, raw_dir: Path):
    tmp = tmp_path_factory.mktemp("sweep")
    server = authed_prefect
    with s3_server(tmp / "s3") as s3:
        remote = bare_git_remote(tmp / "remote.git")
        repo = copy_repo(tmp / "repo")
        env = {**repo_env(repo, server.api_url, raw_dir), **server.client_env(),
               **s3.credentials_env()}
        set_params(repo, **{"split.limit": 400, "split.val_size": 500, "train.epochs": 1})
        ok(repo, env, "dvc", "remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc")
        ok(repo, env, "dvc", "remote", "modify", "team", "endpointurl", s3.endpoint)
        ok(repo, env, "dvc", "repro", "download")
        # A named recipe under the grid: its keys reach every run, the grid's own win.
        (repo / "recipes" / "tiny.yaml").write_text("train.ema: 0.5\ntrain.epochs: 3\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "tiny params, the S3 remote, the raw data")
        git(repo, "remote", "add", "origin", str(remote))

        not_pushed = run(repo, env, *SWEEP).stderr
        git(repo, "push", "-q", "origin", "HEAD")
        no_data = run(repo, env, *SWEEP).stderr
        ok(repo, env, "dvc", "push")
        base_keys = s3.objects()
        table = (repo / paths.SWEEP).read_text()

        # Workers: no local data source, their own temporary directories, one run each.
        worker_env = {k: v for k, v in env.items()
                      if k not in ("FASHIONNET_SOURCE_DIR", "PYTHONPATH")}
        worker_env["OMP_NUM_THREADS"] = "1"  # two runs share two cores
        ok(tmp, worker_env, BIN / "prefect", "work-pool", "create", POOL, "--type", "process")
        with process_worker(POOL, "w1", worker_env, tmp / "w1.log", limit=1) as w1, \
                process_worker(POOL, "w2", worker_env, tmp / "w2.log", limit=1) as w2:
            with open(tmp / "sweep.log", "w") as log:
                proc = subprocess.Popen(SWEEP, cwd=repo, env=env, stdout=log,
                                        stderr=subprocess.PIPE, text=True)
            try:
                kill_run_after_first_epoch([w1, w2], epochs=2, sweep=proc)
                _, stderr = proc.communicate(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            killed = subprocess.CompletedProcess(SWEEP, proc.returncode, "", stderr)
            commit = git(repo, "rev-parse", "HEAD").strip()
            listed = ok(repo, env, "dvc", "exp", "list", str(remote), "--rev", commit,
                        "--name-only").split()
            after_crash = s3.objects()
            untouched = (repo / paths.SWEEP).read_text() == table
            rerun = ok(repo, env, *SWEEP)  # again: only the missing point runs
        yield Swept(repo, env, remote, s3, (not_pushed, no_data), killed,
                    {w: (tmp / f"{w}.log").read_text() for w in ("w1", "w2")}, listed,
                    (base_keys, after_crash), untouched,
                    (tmp / "sweep.log").read_text() + rerun)


@pytest.mark.slow
def test_a_sweep_is_refused_until_its_commit_and_data_are_shared(swept):
    not_pushed, no_data = swept.refused
    assert "is not on git remote origin: run `git push origin" in not_pushed
    assert "the DVC remote lacks data/raw" in no_data and "run `dvc push`" in no_data
    assert swept.s3.secret_key not in (swept.repo / ".dvc" / "config").read_text()
    assert "-master.telemetry=false" in swept.s3.command  # the test server reports nothing


@pytest.mark.slow
def test_a_killed_run_fails_the_sweep_naming_it_and_keeps_the_finished_one(swept,
                                                                            authed_prefect):
    assert swept.killed.returncode == 1, swept.killed.stderr
    assert "1 of 2 runs did not finish: tiny_epochs-2 (Crashed)" in swept.killed.stderr
    (crashed, rerun) = sorted(flow_runs(authed_prefect, "tiny_epochs-2"),
                              key=lambda r: r.created)
    assert crashed.state.type.value == "CRASHED" and rerun.state.type.value == "COMPLETED"
    assert swept.on_remote_after_crash == ["tiny_epochs-1"]
    assert swept.table_untouched  # no table of a failed sweep


@pytest.mark.slow
def test_each_worker_takes_one_of_the_runs(swept):
    for worker, log in swept.worker_logs.items():
        assert f"Worker {worker!r} submitting flow run" in log, log


@pytest.mark.slow
def test_running_again_runs_only_the_missing_point(swept, authed_prefect):
    assert "already on git remote origin: tiny_epochs-1" in swept.rerun_log
    assert len(flow_runs(authed_prefect, "tiny_epochs-1")) == 1


@pytest.mark.slow
def test_the_table_has_a_row_per_point_with_the_recipe_under_it(swept):
    table = pd.read_csv(swept.repo / paths.SWEEP)
    assert table["experiment"].tolist() == ["tiny_epochs-1", "tiny_epochs-2"]
    assert table["train.epochs"].tolist() == [1, 2]
    shown = json.loads(ok(swept.repo, swept.env, "dvc", "exp", "show", "--json"))
    experiments = {e["name"]: e["revs"][0]["data"] for b in shown
                   for e in (b.get("experiments") or [])}
    for row in table.to_dict("records"):
        data = experiments[row["experiment"]]
        assert data["metrics"]["metrics/metrics.json"]["data"]["accuracy"]["test"] \
            == row["test_accuracy"]
        params = data["params"]["params.yaml"]["data"]["train"]
        assert (params["ema"], params["epochs"]) == (0.5, row["train.epochs"])  # recipe, grid


@pytest.mark.slow
def test_a_fresh_clone_gets_every_result_from_the_remotes(swept, tmp_path):
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(swept.remote), str(fresh))
    env = {**swept.env, "PYTHONPATH": str(fresh)}
    env.pop("FASHIONNET_SOURCE_DIR")
    ok(fresh, env, "dvc", "exp", "pull", "origin", "tiny_epochs-1", "tiny_epochs-2")
    table = pd.read_csv(swept.repo / paths.SWEEP)
    diff = json.loads(ok(fresh, env, "dvc", "metrics", "diff", "HEAD", "tiny_epochs-2",
                         "--json"))
    assert diff["metrics/metrics.json"]["accuracy.test"]["new"] == table.loc[1, "test_accuracy"]
    ok(fresh, env, "dvc", "exp", "apply", "tiny_epochs-2")
    ok(fresh, env, "dvc", "pull")
    assert "up to date" in ok(fresh, env, "dvc", "status")
    assert "in sync" in ok(fresh, env, "dvc", "status", "-c")
    ok(fresh, env, "fashionnet", "evaluate")  # the pulled model, no training
    assert "up to date" in ok(fresh, env, "dvc", "status")
    # The crashed run left nothing on S3: its model only appears after the rerun.
    lock = yaml.safe_load((fresh / "dvc.lock").read_text())
    model = next(o["md5"] for o in lock["stages"]["train"]["outs"]
                 if o["path"] == str(paths.MODEL))
    key = f"dvc/files/md5/{model[:2]}/{model[2:]}"
    base_keys, after_crash = swept.keys
    assert key not in after_crash and key in swept.s3.objects() and key not in base_keys


@pytest.mark.slow
def test_interrupted_sweep_cancels_its_runs_with_a_local_directory_remote(tmp_path, git_remote,
                                                                          authed_prefect,
                                                                          raw_dir):
    server = authed_prefect
    repo = copy_repo(tmp_path / "repo")
    env = {**repo_env(repo, server.api_url, raw_dir), **server.client_env()}
    ok(repo, env, "dvc", "remote", "add", "-d", "local", str(tmp_path / "dvc-storage"))
    ok(repo, env, "dvc", "repro", "download")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a local directory remote, the raw data")
    git(repo, "remote", "add", "origin", str(git_remote))
    git(repo, "push", "-q", "origin", "HEAD")
    ok(repo, env, "dvc", "push")
    # A teammate's clone gets the data from the directory remote.
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(git_remote), str(fresh))
    fresh_env = {**env, "PYTHONPATH": str(fresh)}
    fresh_env.pop("FASHIONNET_SOURCE_DIR")
    ok(fresh, fresh_env, "dvc", "pull", "download")  # the only stage this commit has run
    assert "up to date" in ok(fresh, fresh_env, "dvc", "status", "download")
    assert "in sync" in ok(fresh, fresh_env, "dvc", "status", "-c")

    # No worker serves this pool: the runs wait until Ctrl-C cancels them.
    ok(tmp_path, env, BIN / "prefect", "work-pool", "create", "idle", "--type", "process")
    names = ["lr-0.01", "lr-0.02"]
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        # SIGINT as a terminal delivers it, also when the suite runs as a background job
        # (whose shell ignores SIGINT, and Python then never raises KeyboardInterrupt).
        proc = subprocess.Popen(["fashionnet", "sweep", "-S", "train.lr=0.01,0.02", "--pool",
                                 "idle"], cwd=repo, env=env, stdout=out, stderr=subprocess.PIPE,
                                text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Ctrl-C once the sweep says it has submitted them all and waits.
        wait_for(lambda: "submitted 2 runs" in log.read_text(), "the sweep's wait", 300,
                 proc=proc, log=log)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "fashionnet sweep: interrupted" in stderr
    for name in names:
        [cancelled] = flow_runs(server, name)
        assert cancelled.state.type.value == "CANCELLED", cancelled.state
    assert "cancelled lr-0.01, lr-0.02" in log.read_text()
