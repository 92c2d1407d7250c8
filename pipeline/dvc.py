"""DVC and git as subprocesses from flows: their output in the run's logs, one workspace holder."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger

LOCK_FILE = Path(".dvc/tmp/fashionnet-workspace.lock")  # .dvc/tmp: ignored by git and DVC


class WorkspaceBusy(RuntimeError):
    """Another retrain holds this workspace."""


@contextmanager
def workspace_lock(command: str = "retrain") -> Iterator[None]:
    """Hold the workspace for one run of ``fashionnet <command>`` (retrain, seeds); a second
    one fails at once instead of interleaving its stages, params and restore with the first.
    The OS drops the lock if the holder dies."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another fashionnet run"
            raise WorkspaceBusy(f"{holder} is running in this workspace; "
                                "nothing was changed, try again when it ends") from None
        f.truncate(0)
        f.write(f"`fashionnet {command}` (pid {os.getpid()})\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def git(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["git", *args], input=stdin, capture_output=True, text=True,
                          check=True).stdout



def run_dvc(*args: str, env: Mapping[str, str] | None = None) -> None:
    """Run a dvc command, its output line by line into the current run's logs; ``env`` adds
    to the environment it gets."""
    logger = get_run_logger()
    logger.info("$ dvc %s", " ".join(args))
    with subprocess.Popen(["dvc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**_child_env(), **(env or {})},
                          start_new_session=True) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logger.info(line.rstrip())
        except BaseException:  # cancelled: stop dvc and the stage it runs before rolling back
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} exited with status {proc.returncode}")


def _child_env() -> dict[str, str]:
    """This environment's tools first on PATH (`dvc`, and `fashionnet` for the stage cmds); the
    stages' own flow runs report to the API this run uses, ephemeral or not."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_API_URL": api_url}

