"""The Prefect servers the project starts: one for a whole `dvc repro`, then gone; and none
outlives the command that started it, even one killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fashionnet.split import SplitConfig
from pipeline import paths
from tests.helpers import REPO, set_params, wait_for
from tests.test_resume import prepare

PROBE = ("import os, sys, urllib.request; url = os.environ['PREFECT_API_URL']; "
         "print(url, urllib.request.urlopen(url + '/health').status); sys.exit(3)")


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.prefect_server", sys.executable,
                           "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


def isolated_env(tmp_path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the fresh PREFECT_HOME has no profile setting it either
    return env


@pytest.mark.slow
def test_command_runs_against_a_server_that_stops_after_it(tmp_path):
    result = run(isolated_env(tmp_path))
    assert result.returncode == 3, result.stderr  # the command's own exit status
    url, status = result.stdout.splitlines()[-1].split()
    assert url.startswith("http://127.0.0.1:") and status == "200"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_a_configured_server_is_used_as_is(tmp_path):
    env = {**isolated_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = run(env)
    assert result.returncode == 1  # the probe cannot reach it: nothing was started
    assert "Prefect server for this run" not in result.stdout
    assert "Connection refused" in result.stderr


def session_processes(sid: int) -> dict[int, str]:
    """Live processes in session ``sid`` (zombies hold nothing and are left out): pid ->
    command line. Read from /proc, so nothing is matched by name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, _pgrp, session = stat.rpartition(")")[2].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.slow
def test_a_stage_killed_with_sigkill_leaves_no_process_behind(repo_copy, cli_env, official,
                                                              tmp_path):
    """`fashionnet train` without an API URL starts its own Prefect server; SIGKILL of the
    stage, once its first epoch is checkpointed, takes the server with it."""
    split = SplitConfig(val_size=100, limit=200)
    set_params(repo_copy, **{"split.val_size": split.val_size, "split.limit": split.limit,
                             "train.epochs": 200, "train.batch_size": 50})
    prepare(repo_copy, official, split)
    env = {**cli_env, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    del env["PREFECT_API_URL"]  # nor does the fresh PREFECT_HOME's profile set one
    stage = subprocess.Popen(["fashionnet", "train"], cwd=repo_copy, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # its session id is its pid
    try:
        wait_for((repo_copy / paths.CHECKPOINT).exists, "the checkpoint of epoch 1", 240,
                 proc=stage)
        running = session_processes(stage.pid)
        assert stage.pid in running
        assert len(running) > 1, running  # the stage and its Prefect server, at least
        stage.kill()  # SIGKILL
        assert stage.wait() == -signal.SIGKILL
        wait_for(lambda: not session_processes(stage.pid), "the end of the stage's processes",
                 30)
    finally:
        for pid in session_processes(stage.pid):  # whatever the test may have left
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_simultaneous_first_starts_wait_for_each_other(tmp_path):
    """Three commands started at once on a fresh PREFECT_HOME: each migrates the database or
    waits for the one that does (a lock beside it); none fails."""
    env = isolated_env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.prefect_server", sys.executable,
                               "-c", PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [3, 3, 3], [err for _, err in results]
    assert all("Traceback" not in err for _, err in results)
