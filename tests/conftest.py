"""Shared fixtures: the real Fashion-MNIST files, a copy of the repository, a Prefect server."""

from __future__ import annotations

import os

# OpenMP threads that sleep while they wait instead of spinning: on a shared machine a spinning
# thread waits on a descheduled partner, and a 2-epoch test run took 10 s instead of 1.6 s
# (docs/performance.md, Threads). Set before torch loads libgomp; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionnet import FashionNet, download
from fashionnet.data import LabeledImages
from fashionnet.idx import RAW_FILES, load_raw
from fashionnet.train import train_epoch
from pipeline.prefect_server import prefect_server
from tests.helpers import copy_repo, repo_env
from tests.ingest_helpers import project, ws  # noqa: F401 (fixtures)
from tests.predict_helpers import write_pngs
from tests.servers import authed_prefect, git_remote, remotes, s3  # noqa: F401 (fixtures)


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
        # What in-process runs left to send, sent while the server is still up.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def prefect_harness(prefect_api: str) -> Iterator[None]:
    """In-process flows report to the session's Prefect server (one server for the suite: a
    test harness of their own would start a second one)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield


@pytest.fixture(scope="session", autouse=True)
def prefect_logging() -> None:
    """Prefect's logging set up once, before any test captures stderr: its console handler
    writes to the sys.stderr of the moment it is set up, and one bound to a test's capsys
    would write to a closed capture in every later test."""
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


@pytest.fixture
def repo_copy(tmp_path: Path, raw_dir: Path) -> Path:
    """A fresh git + DVC checkout of this repository's tracked files, as a user would clone it."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture
def cli_env(repo_copy: Path, prefect_api: str, raw_dir: Path) -> dict[str, str]:
    """Environment for `fashionnet` / `dvc` run in ``repo_copy``, on the copy's code, against
    the session's Prefect server, with the real data as the local source."""
    return repo_env(repo_copy, prefect_api, raw_dir)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> Callable[..., tuple[int, str, str]]:
    """``cli(directory, *args)``: `fashionnet ARGS` run in process in ``directory``, for tests
    where no process boundary is the point; (exit status, stdout, stderr)."""
    from pipeline import cli as command

    monkeypatch.setattr(command, "_configure_prefect", lambda: None)  # no global log set-up

    def call(directory: Path, *args: object) -> tuple[int, str, str]:
        monkeypatch.chdir(directory)
        capsys.readouterr()
        try:
            code = command.main([str(arg) for arg in args])
        except SystemExit as e:  # argparse's refusal of a malformed command line
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="session")
def test_pngs(official, tmp_path_factory) -> Path:
    """The 10,000 official test images as PNG files 00000.png ... 09999.png (about 2 s)."""
    return write_pngs(official[1].images.numpy(), tmp_path_factory.mktemp("pngs") / "test")


@pytest.fixture(scope="session")
def model_file(official, tmp_path_factory) -> Path:
    """A FashionNet state_dict after one epoch on 1,024 training images: far from the recipe,
    but with weights and BatchNorm statistics that are not the initial ones."""
    torch.manual_seed(0)
    model = FashionNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=True)
    data = official[0].subset(np.arange(1024))
    train_epoch(model, optimizer, data.images, data.labels, torch.randperm(1024), 64)
    path = tmp_path_factory.mktemp("model") / "fashionnet.pt"
    torch.save(model.state_dict(), path)
    return path


# The longest modules (2-6 minutes each on 2 cores) first: `make test` runs the suite on
# pytest-xdist workers a module at a time (--dist loadfile, so that a module's fixtures are
# built once), and a long module started last would leave the other workers idle at the end.
LONGEST_FIRST = ("test_sweep_e2e.py", "test_seeds.py", "test_retrain_e2e.py",
                 "test_ingest_e2e.py", "test_resume.py", "test_prefect_server.py",
                 "test_processes.py", "test_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests stay together and in order
