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

GIT_REMOTE = "origin"  # the git remote experiments are pushed to and pulled from
LOCK_FILE = Path(".dvc/tmp/fashionnet-workspace.lock")  # .dvc/tmp: ignored by git and DVC


class WorkspaceBusy(RuntimeError):
    """Another retrain holds this workspace."""


@contextmanager
def workspace_lock(command: str = "retrain") -> Iterator[None]:
    """Hold the workspace for one run of ``fashionnet <command>`` (retrain, seeds); a second
    one fails at once instead of promoting onto the commit the first is moving.
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


def git(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``git *args``' stdout; a failure raises with git's own message."""
    proc = subprocess.run(["git", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    if proc.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def uncommitted_changes() -> list[str]:
    """Tracked files with changes, staged or not, that git HEAD does not hold."""
    out = git("status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines()]


def describe_changes(paths: list[str]) -> str:
    """At most five of ``paths``, for a one-line message."""
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def local_experiments(rev: str = "HEAD") -> set[str]:
    """The names of the experiments on git commit ``rev``."""
    out = subprocess.run(["dvc", "exp", "list", "--rev", rev, "--name-only"],
                         capture_output=True, text=True, check=True, env=tools_env()).stdout
    return set(out.split())


def experiment_ref(baseline: str, name: str) -> str:
    """The git ref DVC keeps experiment ``name`` run on ``baseline`` under (refs/exps/...)."""
    from dvc.repo.experiments.refs import ExpRefInfo

    return str(ExpRefInfo(baseline_sha=baseline, name=name))


def unshallow(remote: str | None) -> None:
    """The whole history from ``remote`` where this clone is shallow (Prefect's git_clone step
    clones with --depth 1): there `dvc exp run --temp` ends 0 having made no experiment."""
    if git("rev-parse", "--is-shallow-repository").strip() == "true":
        if remote is None:
            raise RuntimeError("this clone is shallow and has no git remote to deepen it from")
        git("fetch", "--quiet", "--unshallow", remote)


def show(rev: str, path: str | Path) -> str | None:
    """The text of ``path`` as committed at ``rev``; None where that commit has no such file."""
    proc = subprocess.run(["git", "show", f"{rev}:{Path(path).as_posix()}"],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def git_remote() -> str | None:
    """The git remote the current branch tracks, else ``origin`` if there is one."""
    branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    proc = subprocess.run(["git", "config", f"branch.{branch}.remote"], capture_output=True,
                          text=True)
    remotes = git("remote").split()
    tracked = proc.stdout.strip()
    return tracked if tracked in remotes else "origin" if "origin" in remotes else None


def default_dvc_remote() -> str | None:
    """The DVC remote `dvc push` uses by default (core.remote); None without one."""
    proc = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True,
                          env=tools_env())
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def remote_ref(remote: str, ref: str) -> str | None:
    """The commit ``ref`` names on git remote ``remote`` now; None where it has no such ref."""
    out = git("ls-remote", remote, ref).split()
    return out[0] if out else None


def committer_env() -> dict[str, str]:
    """A committer identity for commits a flow makes where git has none configured (a fresh
    worker); empty where it has one, so a user's own identity signs the commit."""
    if subprocess.run(["git", "var", "GIT_COMMITTER_IDENT"], capture_output=True).returncode == 0:
        return {}
    who = {"NAME": "fashionnet-retrain", "EMAIL": "fashionnet-retrain@localhost"}
    return {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
            for key, value in who.items()}



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


def tools_env() -> dict[str, str]:
    """This environment's tools first on PATH (`dvc`, and `fashionnet` for the stage cmds), as
    a worker started without the virtual environment activated would not have them."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _child_env() -> dict[str, str]:
    """tools_env(), and the stages' own flow runs report to the API this run uses, ephemeral
    or not."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    return {**tools_env(), "PREFECT_API_URL": api_url}


def dvc_output(*args: str, cwd: str | Path | None = None) -> str:
    """``dvc *args`` for what it prints (a listing); a failure raises RuntimeError with the
    last line DVC printed."""
    result = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True,
                            env=tools_env())
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"dvc {' '.join(args)} exited with status {result.returncode}: "
                           f"{lines[-1]}")
    return result.stdout


def head_commit() -> str:
    return git("rev-parse", "HEAD").strip()


def remote_url(remote: str = GIT_REMOTE) -> str | None:
    """The URL of git remote ``remote``; None when there is none."""
    try:
        return git("remote", "get-url", remote).strip()
    except RuntimeError:
        return None


def commit_on_remote(commit: str, remote: str = GIT_REMOTE) -> bool:
    """Whether a branch or tag of ``remote`` (fetched now) contains ``commit``."""
    git("fetch", "--quiet", "--tags", remote)
    refs = git("for-each-ref", "--contains", commit, "--format=%(refname)",
               f"refs/remotes/{remote}", "refs/tags")
    return bool(refs.strip())


def remote_experiments(commit: str, remote: str = GIT_REMOTE) -> set[str]:
    """Names of the experiments on git remote ``remote`` whose baseline is ``commit``."""
    return set(dvc_output("exp", "list", remote, "--rev", commit, "--name-only").split())


def unshared_outputs() -> dict[str, str]:
    """Outputs that dvc.lock names but the default DVC remote lacks (`dvc status --cloud`):
    {path: "new" (only in the local cache) or "missing" (in neither)}."""
    import json

    status = json.loads(dvc_output("status", "--cloud", "--json") or "{}")
    return {path: state for path, state in status.items() if state in ("new", "missing")}
