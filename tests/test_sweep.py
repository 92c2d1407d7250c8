"""`fashionnet sweep`: the grid and its names, refusals, and experiments run by Prefect workers
shared through a git remote and an S3 DVC remote, end to end on real servers."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest
import yaml

from fashionnet.errors import ConfigError
from pipeline import cli, paths
from pipeline.sweep import (
    experiment_name,
    grid_points,
    parse_grid,
    sweep_points,
)
from tests.helpers import BIN, REPO, copy_repo, git, repo_env, set_params, wait_for
from tests.servers import bare_git_remote, process_worker, s3_server

POOL = "fashionnet-test"


def test_grid_is_every_combination_in_dvc_queue_order():
    grid = parse_grid(["train.lr=0.001,0.003", "train.epochs=1,2"])
    assert grid == {"train.lr": [0.001, 0.003], "train.epochs": [1, 2]}
    points = grid_points(grid)
    assert [tuple(p.values()) for p in points] == [(0.001, 1), (0.001, 2), (0.003, 1), (0.003, 2)]
    names = [experiment_name(p) for p in points]
    assert names[0] == "lr-0.001_epochs-1" and len(set(names)) == 4


def test_names_are_git_ref_safe_and_unambiguous():
    assert experiment_name({"train.seed": 1, "split.seed": 2}) == "train-seed-1_split-seed-2"
    assert experiment_name({"train.device": "cuda"}) == "device-cuda"
    long = experiment_name({"train.lr": 0.001, "train.weight_decay": 1e-5, "train.gamma": 0.5,
                            "train.step_size": 10, "train.batch_size": 128})
    assert len(long) <= 60
    for name in (long, experiment_name({"train.lr": 1e-3})):
        subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=True)


@pytest.mark.parametrize(("specs", "key"), [
    (["train.lr"], "train.lr"), (["train.lr=0.1", "train.lr=0.2"], "train.lr"),
    (["train.nope=1,2"], "train.nope"), (["train.epochs=1,-1"], "train.epochs")])
def test_bad_grid_names_the_key(specs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_grid(specs)


def test_a_named_recipe_is_under_every_point_and_prefixes_its_name():
    recipe = {"train.schedule": "cosine", "train.epochs": 15}
    grid = parse_grid(["train.epochs=1,2"], recipe)
    points, overrides = sweep_points(grid, recipe, "plus")
    assert list(points) == ["plus_epochs-1", "plus_epochs-2"]
    assert points["plus_epochs-2"] == {"train.epochs": 2}  # metrics/sweep.csv's columns
    assert overrides["plus_epochs-2"] == {"train.schedule": "cosine", "train.epochs": 2}
    assert sweep_points(grid)[0] == {"epochs-1": {"train.epochs": 1},
                                     "epochs-2": {"train.epochs": 2}}
    with pytest.raises(ConfigError, match=r"train\.flpi"):  # checked with the recipe under it
        parse_grid(["train.epochs=1,2"], {"train.flpi": 1})


def test_sweep_cli_refuses_a_bad_recipe_before_anything_runs(repo_copy: Path, cli_env):
    (repo_copy / "recipes" / "bad.yaml").write_text("train.flip: sideways\n")
    result = subprocess.run(["fashionnet", "sweep", "-S", "train.epochs=1,2", "--recipe",
                             "recipes/bad.yaml"], cwd=repo_copy, env=cli_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "recipes/bad.yaml: train.flip" in lines[0], result.stderr
    queue = subprocess.run(["dvc", "queue", "status"], cwd=repo_copy, env=cli_env,
                           capture_output=True, text=True, check=True).stdout
    assert "No experiment tasks" in queue


def run(repo: Path, env: dict[str, str], *args: str, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(repo: Path, env: dict[str, str], *args: str) -> str:
    result = run(repo, env, *args)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("argv", [["sweep", "-S", "train.lr=0.1,0.2", "--pool", "p"],
                                  ["seeds", "5", "--pool", "p"]])
def test_pool_without_a_server_is_refused(argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(cli, "_configure_prefect", lambda: None)  # no global logging set-up
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Another test's Prefect test harness may have set an API URL for the whole session.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fashionnet {argv[0]}: error: --pool: needs the Prefect server of the pool's workers: "
        "set PREFECT_API_URL (and PREFECT_API_AUTH_STRING)"]


def test_a_git_remote_url_with_a_password_is_refused(repo_copy, cli_env):
    git(repo_copy, "remote", "add", "origin", "https://me:hunter2@git.example/fashionnet.git")
    result = run(repo_copy, cli_env, "fashionnet", "sweep", "-S", "train.lr=0.1,0.2", "--pool",
                 "p")
    assert result.returncode == 2, result.stderr
    assert "URL holds a password" in result.stderr and "hunter2" not in result.stderr


def flow_runs(server, name: str) -> list[dict]:
    """The flow runs named ``name``, through the API with the server's credentials."""
    response = httpx.post(f"{server.api_url}/flow_runs/filter", auth=tuple(
        server.auth_string.split(":", 1)), json={"flow_runs": {"name": {"any_": [name]}}})
    response.raise_for_status()
    return response.json()


def kill_run_after_first_epoch(workers: list[subprocess.Popen], epochs: int,
                               sweep: subprocess.Popen) -> None:
    """kill -9 the flow run process whose clone trains ``epochs`` epochs, and every process
    it started, once its first epoch's checkpoint is written (while ``sweep`` runs)."""
    def training() -> psutil.Process | None:
        for worker in workers:
            for proc in psutil.Process(worker.pid).children():
                try:
                    clone = Path(proc.cwd())
                    if not (clone / paths.CHECKPOINT).exists():
                        continue
                    params = yaml.safe_load((clone / "params.yaml").read_text())
                except (psutil.Error, OSError, yaml.YAMLError):
                    continue
                if isinstance(params, dict) and params["train"]["epochs"] == epochs:
                    return proc
        return None

    run_proc = wait_for(training, f"the {epochs}-epoch run's first checkpoint", timeout=300,
                        proc=sweep)
    tree = [run_proc, *run_proc.children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.slow
def test_sweep_on_two_workers_through_git_and_s3_remotes(tmp_path, authed_prefect, raw_dir):
    server = authed_prefect
    # A client without the auth string is refused.
    assert httpx.post(f"{server.api_url}/flow_runs/filter", json={}).status_code == 401

    with s3_server(tmp_path / "s3") as s3:
        remote = bare_git_remote(tmp_path / "remote.git")
        repo = copy_repo(tmp_path / "repo")
        env = {**repo_env(repo, server.api_url, raw_dir), **server.client_env(),
               **s3.credentials_env()}
        set_params(repo, **{"split.limit": 600, "split.val_size": 600, "train.epochs": 1})
        ok(repo, env, "dvc", "remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc")
        ok(repo, env, "dvc", "remote", "modify", "team", "endpointurl", s3.endpoint)
        assert s3.secret_key not in (repo / ".dvc" / "config").read_text()
        ok(repo, env, "dvc", "repro", "download")
        # A named recipe under the grid: its keys reach every run, the grid's own win.
        (repo / "recipes" / "tiny.yaml").write_text("train.ema: 0.5\ntrain.epochs: 3\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "tiny params, the S3 remote, the raw data")
        git(repo, "remote", "add", "origin", str(remote))
        sweep = ["fashionnet", "sweep", "-S", "train.epochs=1,2", "--recipe", "recipes/tiny.yaml",
                 "--pool", POOL]

        # Refused until the commit is on the git remote and its data on the DVC remote.
        result = run(repo, env, *sweep)
        assert result.returncode == 2 and "run `git push origin" in result.stderr, result.stderr
        git(repo, "push", "-q", "origin", "HEAD")
        result = run(repo, env, *sweep)
        assert result.returncode == 2 and "run `dvc push`" in result.stderr, result.stderr
        ok(repo, env, "dvc", "push")
        base_keys = s3.objects()
        sweep_before = (repo / paths.SWEEP).read_text()

        # Workers: no local data source, their own temporary directories, one run each.
        worker_env = {k: v for k, v in env.items()
                      if k not in ("FASHIONNET_SOURCE_DIR", "PYTHONPATH")}
        worker_env["OMP_NUM_THREADS"] = "1"  # two runs share two cores
        ok(tmp_path, worker_env, str(BIN / "prefect"), "work-pool", "create", POOL, "--type",
           "process")
        with process_worker(POOL, "w1", worker_env, tmp_path / "w1.log", limit=1) as w1, \
                process_worker(POOL, "w2", worker_env, tmp_path / "w2.log", limit=1) as w2:
            with open(tmp_path / "sweep.log", "w") as log:
                proc = subprocess.Popen(sweep, cwd=repo, env=env, stdout=log,
                                        stderr=subprocess.PIPE, text=True)
            try:
                kill_run_after_first_epoch([w1, w2], epochs=2, sweep=proc)
                _, stderr = proc.communicate(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 1, stderr
            assert "1 of 2 runs did not finish: tiny_epochs-2 (Crashed)" in stderr, stderr
            for worker in ("w1", "w2"):  # each took one of the two runs
                log_text = (tmp_path / f"{worker}.log").read_text()
                assert f"Worker {worker!r} submitting flow run" in log_text, log_text
            [crashed] = flow_runs(server, "tiny_epochs-2")
            assert crashed["state"]["type"] == "CRASHED"
            commit = git(repo, "rev-parse", "HEAD").strip()
            listed = ok(repo, env, "dvc", "exp", "list", str(remote), "--rev", commit,
                        "--name-only")
            assert listed.split() == ["tiny_epochs-1"]  # the finished run is kept; no epochs-2
            after_crash = s3.objects()
            assert (repo / paths.SWEEP).read_text() == sweep_before  # no table of a failed sweep

            # Again: only the missing point runs.
            out = ok(repo, env, *sweep)
            assert "already on git remote origin: tiny_epochs-1" in (tmp_path / "sweep.log"
                                                               ).read_text() + out
        assert len(flow_runs(server, "tiny_epochs-1")) == 1
        assert len(flow_runs(server, "tiny_epochs-2")) == 2
        table = pd.read_csv(repo / paths.SWEEP)
        assert table["experiment"].tolist() == ["tiny_epochs-1", "tiny_epochs-2"]
        assert table["train.epochs"].tolist() == [1, 2]
        assert table["test_accuracy"].between(0.3, 1).all()

        # A teammate's fresh clone: everything comes from the two remotes.
        fresh = tmp_path / "fresh"
        git(tmp_path, "clone", "-q", str(remote), str(fresh))
        fresh_env = {**env, "PYTHONPATH": str(fresh)}
        fresh_env.pop("FASHIONNET_SOURCE_DIR")
        ok(fresh, fresh_env, "dvc", "exp", "pull", "origin", "tiny_epochs-1", "tiny_epochs-2")
        shown = json.loads(ok(fresh, fresh_env, "dvc", "exp", "show", "--json"))
        experiments = {e["name"]: e["revs"][0]["data"] for b in shown
                       for e in (b.get("experiments") or [])}
        for _, row in table.iterrows():
            data = experiments[row["experiment"]]
            metrics = data["metrics"]["metrics/metrics.json"]["data"]
            assert metrics["accuracy"]["test"] == row["test_accuracy"]
            params = data["params"]["params.yaml"]["data"]["train"]
            assert (params["ema"], params["epochs"]) == (0.5, row["train.epochs"])
        diff = json.loads(ok(fresh, fresh_env, "dvc", "metrics", "diff", "HEAD", "tiny_epochs-2",
                             "--json"))
        assert diff["metrics/metrics.json"]["accuracy.test"]["new"] == table.loc[1,
                                                                                "test_accuracy"]
        ok(fresh, fresh_env, "dvc", "exp", "apply", "tiny_epochs-2")
        ok(fresh, fresh_env, "dvc", "pull")
        assert "up to date" in ok(fresh, fresh_env, "dvc", "status")
        assert "in sync" in ok(fresh, fresh_env, "dvc", "status", "-c")
        ok(fresh, fresh_env, "fashionnet", "evaluate")  # the pulled model, no training
        assert "up to date" in ok(fresh, fresh_env, "dvc", "status")
        # The crashed run left nothing on S3: its model only appears after the rerun.
        lock = yaml.safe_load((fresh / "dvc.lock").read_text())
        model = next(o["md5"] for o in lock["stages"]["train"]["outs"]
                     if o["path"] == str(paths.MODEL))
        key = f"dvc/files/md5/{model[:2]}/{model[2:]}"
        assert key not in after_crash and key in s3.objects() and key not in base_keys


@pytest.mark.slow
def test_interrupted_sweep_cancels_its_runs_with_a_local_directory_remote(tmp_path, git_remote,
                                                                          authed_prefect,
                                                                          raw_dir):
    server = authed_prefect
    repo = copy_repo(tmp_path / "repo")
    env = {**repo_env(repo, server.api_url, raw_dir), **server.client_env()}
    storage = tmp_path / "dvc-storage"
    ok(repo, env, "dvc", "remote", "add", "-d", "local", str(storage))
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
    ok(tmp_path, env, str(BIN / "prefect"), "work-pool", "create", "idle", "--type", "process")
    names = ["lr-0.01", "lr-0.02"]
    with open(tmp_path / "sweep.log", "w") as log:
        # SIGINT as a terminal delivers it, also when the suite runs as a background job
        # (whose shell ignores SIGINT, and Python then never raises KeyboardInterrupt).
        proc = subprocess.Popen(["fashionnet", "sweep", "-S", "train.lr=0.01,0.02", "--pool",
                                 "idle"], cwd=repo, env=env, stdout=log, stderr=subprocess.PIPE,
                                text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: all(flow_runs(server, n) for n in names), "the submitted runs",
                 proc=proc, log=tmp_path / "sweep.log")
        # Ctrl-C once the sweep says it has submitted them all and waits.
        wait_for(lambda: "submitted 2 runs" in (tmp_path / "sweep.log").read_text(),
                 "the sweep's wait", proc=proc, log=tmp_path / "sweep.log")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "fashionnet sweep: interrupted" in stderr
    for name in names:
        [run] = flow_runs(server, name)
        assert run["state"]["type"] == "CANCELLED", run["state"]
    assert "cancelled lr-0.01, lr-0.02" in (tmp_path / "sweep.log").read_text()


