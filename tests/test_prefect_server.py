"""`python -m pipeline.prefect_server`: one server for a whole `dvc repro`, then gone."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import REPO

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
