"""Shared fixtures: the real Fashion-MNIST files, a copy of the repository, a Prefect server."""

from __future__ import annotations

import os

# OpenMP threads that sleep while they wait instead of spinning: on a shared machine a spinning
# thread waits on a descheduled partner, and a 2-epoch test run took 10 s instead of 1.6 s
# (docs/performance.md, Threads). Set before torch loads libgomp; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from fashionnet import download
from fashionnet.data import LabeledImages
from fashionnet.idx import RAW_FILES, load_raw
from pipeline.prefect_server import prefect_server
from tests.servers import authed_prefect, git_remote, s3  # noqa: F401 (fixtures for all tests)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: fashionnet, dvc, prefect


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four official files, uncompressed and verified, from Debian's dataset-fashion-mnist
    (what .ci/run installs) or FASHIONNET_SOURCE_DIR."""
    sources = [Path(p) for p in (os.environ.get("FASHIONNET_SOURCE_DIR"), download.DEBIAN_DIR)
               if p]
    target = tmp_path_factory.mktemp("raw")
    for name in RAW_FILES:
        source = download.find_local(name, sources)
        if source is None:
            pytest.fail(f"{name} not found in {sources}: install Debian's dataset-fashion-mnist "
                        "(apt-get install dataset-fashion-mnist) or set FASHIONNET_SOURCE_DIR")
        download.install(target, name, download.read_verified(source, name))
    return target


@pytest.fixture(scope="session")
def official(raw_dir: Path) -> tuple[LabeledImages, LabeledImages]:
    """The official training (60,000) and test (10,000) sets."""
    return load_raw(raw_dir)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on loopback for the whole session, with its own database; its
    API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server({"PREFECT_HOME": str(home)}, ui=False) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """In-process flows run against Prefect's test harness (a temporary server and database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def git(repo: Path, *args: str) -> str:
    """``git *args`` in ``repo`` with a committer identity of its own (a fresh machine may have
    none configured); its stdout. A failure raises."""
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def pipeline_results() -> set[str]:
    """What `dvc repro` writes into git: dvc.lock, the stages' uncached outputs, and the
    .gitignore DVC writes beside each cached one."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    outs = [e if isinstance(e, str) else next(iter(e.items()))
            for spec in stages for key in ("outs", "metrics") for e in spec.get(key, [])]
    uncached = {out[0] for out in outs if isinstance(out, tuple) and out[1].get("cache") is False}
    cached = {out if isinstance(out, str) else out[0] for out in outs} - uncached
    return {"dvc.lock", *uncached, *(str(Path(path).parent / ".gitignore") for path in cached)}


def copy_repo(dest: Path, results: bool = False) -> Path:
    """A git + DVC checkout of this repository's tracked files at ``dest``, as a user would
    clone it; without the committed pipeline results (dvc.lock, metrics, report) unless
    ``results``, so that tests start from a repository that has never run."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    skip = set() if results else pipeline_results()
    for name in filter(None, files):
        if (REPO / name).is_file() and name not in skip:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "clone")
    return dest


def repo_env(repo: Path, prefect_api: str, raw_dir: Path) -> dict[str, str]:
    """Environment for `fashionnet` / `dvc` run in ``repo``, on its code, against the Prefect
    server at ``prefect_api``, with the real data as the local source."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_API_URL": prefect_api, "FASHIONNET_SOURCE_DIR": str(raw_dir),
            "PYTHONPATH": str(repo)}


@pytest.fixture
def repo_copy(tmp_path: Path, raw_dir: Path) -> Path:
    """A fresh git + DVC checkout of this repository's tracked files, as a user would clone it."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture
def cli_env(repo_copy: Path, prefect_api: str, raw_dir: Path) -> dict[str, str]:
    """Environment for `fashionnet` / `dvc` run in ``repo_copy``, on the copy's code, against
    the session's Prefect server, with the real data as the local source."""
    return repo_env(repo_copy, prefect_api, raw_dir)


def set_params(repo: Path, **changes: object) -> None:
    """Edit params.yaml in ``repo``: set_params(repo, **{"train.epochs": 1})."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something true (returned), for a named event; fail
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return result
