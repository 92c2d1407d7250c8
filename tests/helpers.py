"""What the tests share: the repository, commands run as a user runs them, waiting for a named
event, and a user's copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import yaml

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: fashionnet, dvc, prefect
TIMEOUT = 900.0  # seconds a command may take before the test fails instead of hanging


def run(cwd: Path, env: Mapping[str, str] | None, *args: str | os.PathLike[str],
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``args`` as a process in ``cwd``, its output captured as text."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env=None if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout)


def ok(cwd: Path, env: Mapping[str, str] | None, *args: str | os.PathLike[str],
       timeout: float = TIMEOUT) -> str:
    """``args``' stdout; the test fails with its output unless it exits 0."""
    result = run(cwd, env, *args, timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n" \
                                   f"{result.stderr}"
    return result.stdout


def git(repo: Path, *args: str) -> str:
    """``git *args`` in ``repo`` with a committer identity of its own (a fresh machine may have
    none configured); its stdout. A failure raises."""
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def wait_for(condition: Callable[[], T], what: str, timeout: float = 120.0,
             proc: subprocess.Popen | None = None, log: Path | None = None,
             interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something true, which is returned: the named event
    ``what``. The test fails naming it (with the tail of ``log``) after ``timeout`` seconds, or
    as soon as ``proc`` exits without it."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            why = f"the process exited {proc.returncode}" if ended else f"{timeout:.0f} s passed"
            pytest.fail(f"{what}: not reached ({why})\n{tail}")
        time.sleep(interval)
    return result


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
    """A git + DVC checkout of this repository's files at ``dest``, as a user would clone it
    (the working tree's files that git tracks or would track: new modules included, ignored
    ones left out); without the committed pipeline results (dvc.lock, metrics, report) unless
    ``results``, so that tests start from a repository that has never run."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
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


def set_params(repo: Path, **changes: object) -> None:
    """Edit params.yaml in ``repo``: set_params(repo, **{"train.epochs": 1})."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@contextmanager
def prefect_client(api_url: str, auth_string: str | None = None) -> Iterator[SyncPrefectClient]:
    """Prefect's own client for the server at ``api_url`` (basic auth with ``auth_string``):
    the tests read runs, artifacts and deployments as the CLI and the UI do."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings: dict[Any, Any] = {PREFECT_API_URL: api_url}
    if auth_string:
        settings[PREFECT_API_AUTH_STRING] = auth_string
    with temporary_settings(settings), get_client(sync_client=True) as client:
        yield client


def peak_growth(setup: str, measured: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``setup`` then ``measured`` (Python source) in a fresh interpreter in the repository:
    how many bytes its peak resident memory rose above its size before ``measured`` ran (the
    kernel's VmHWM, reset after ``setup`` through /proc/self/clear_refs), and its stdout.
    Peak memory is a property of a whole process, so it is measured in one of its own."""
    code = "\n".join([
        "import sys",
        textwrap.dedent(setup),
        "def _status(key):",
        "    for line in open('/proc/self/status'):",
        "        if line.startswith(key + ':'):",
        "            return int(line.split()[1]) * 1024",
        "with open('/proc/self/clear_refs', 'w') as f:",
        "    f.write('5')  # the peak resident size starts again from the current one",
        "_before = _status('VmRSS')",
        textwrap.dedent(measured),
        "print('PEAK_GROWTH', _status('VmHWM') - _before, file=sys.__stdout__)",
    ])
    result = run(REPO, None, sys.executable, "-c", code, timeout=timeout)
    assert result.returncode == 0, result.stderr
    *out, last = result.stdout.strip().splitlines()
    assert last.startswith("PEAK_GROWTH "), result.stdout
    return int(last.split()[1]), "\n".join(out)
