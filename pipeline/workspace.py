"""The workspace as git and DVC see it: the one way the flows run `git` and `dvc`, what they ask
of the repository and its remotes, and the lock that gives one command at a time the workspace.

`dvc` runs as a subprocess, as a user would run it: its output goes line by line into the
run's logs, and it dies with the run, with whatever it started (pipeline/processes.py). Reads of
what DVC records (`dvc exp show`'s table, a tracked file at a commit) go through ``dvc.api``,
in process: they are many and small, and a process each would cost a second of start-up.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.processes import PARENT_RUN_ENV, die_with_parent

GIT_REMOTE = "origin"  # the git remote experiments are pushed to and pulled from
LOCK_FILE = Path(".dvc/tmp/fashionnet-workspace.lock")  # .dvc/tmp: ignored by git and DVC


class WorkspaceBusy(RuntimeError):
    """Another fashionnet command holds this workspace."""


class CommandFailed(RuntimeError):
    """A `git` or `dvc` command exited non-zero; the message ends with its last line."""


@contextmanager
def workspace_lock(command: str) -> Iterator[None]:
    """Hold the workspace for one run of ``fashionnet <command>`` (retrain, seeds, sweep,
    ingest); a second one fails at once instead of moving the commit the first works on.
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


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger; the library's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fashionnet")


def tools_env() -> dict[str, str]:
    """This environment's tools first on PATH (`dvc`, and `fashionnet` for the stage cmds), as
    a worker started without the virtual environment activated would not have them."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _parent_run() -> str | None:
    """The id of the Prefect flow run this process is running, if any."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def _stage_env(parent: str | None) -> dict[str, str]:
    """tools_env(); the stages' own flow runs report to the API this process uses, ephemeral
    or not, tagged with the flow run that started them."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    return {**tools_env(), **({"PREFECT_API_URL": api_url} if api_url else {}),
            **({PARENT_RUN_ENV: parent} if parent else {})}


def _run(tool: str, args: tuple[str, ...], env: Mapping[str, str] | None, log: bool,
         stdin: str | None = None) -> str:
    """``tool *args``; its stdout. ``log``: its output (stderr too) line by line into the run's
    logs as it comes. A failure raises CommandFailed with the last line the tool printed."""
    command = [tool, *args]
    parent = _parent_run() if log else None
    full_env = {**(_stage_env(parent) if log else tools_env()), **(env or {})}
    if not log:
        proc = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              env=full_env)
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
            raise CommandFailed(f"{tool} {' '.join(args)} exited with status "
                                f"{proc.returncode}: {lines[-1]}")
        return proc.stdout
    logger = _logger()
    logger.info("$ %s %s", tool, " ".join(args))
    output: list[str] = []
    # In a process group that dies with this process: a cancelled or killed run takes the
    # command and the stages it runs with it, and their flow runs end Cancelled
    # (pipeline/processes.py).
    cleanup = [sys.executable, "-m", "pipeline.processes", "cancel-children", parent] \
        if parent else []
    with subprocess.Popen(die_with_parent([_which(tool), *args], group=True, cleanup=cleanup),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, env=full_env) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                output.append(line)
                logger.info(line.rstrip())
        except BaseException:  # cancelled or interrupted: the group ends before we go on
            proc.terminate()  # the supervisor stops the group: SIGINT, then SIGKILL
            proc.wait()
            raise
    if proc.returncode:  # the error DVC names, else its last line
        last = next((line.strip() for line in reversed(output) if line.startswith("ERROR")),
                    next((line.strip() for line in reversed(output) if line.strip()),
                         "(no output)"))
        raise CommandFailed(f"{tool} {' '.join(args)} exited with status {proc.returncode}: "
                            f"{last}")
    return "".join(output)


def _which(tool: str) -> str:
    """The path of ``tool``, this environment's first: the supervisor execs a path."""
    import shutil

    return shutil.which(tool, path=tools_env()["PATH"]) or tool


def git(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``git *args``' stdout; a failure raises CommandFailed with git's own message."""
    return _run("git", args, env, log=False, stdin=stdin)


def dvc(*args: str, env: Mapping[str, str] | None = None, log: bool = True) -> str:
    """``dvc *args``' output. ``log`` (the default, for commands that do work): line by line
    into the run's logs, in a process group that dies with this process. ``log=False`` for
    what DVC reports (`dvc status --json`, listings): stdout alone, captured."""
    return _run("dvc", args, env, log=log)


# --- reads ----------------------------------------------------------------------------------


def head_commit() -> str:
    return git("rev-parse", "HEAD").strip()


def current_branch() -> str:
    """The checked-out branch; RuntimeError on a detached HEAD, where no commit can land."""
    branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    if branch == "HEAD":
        raise RuntimeError("HEAD is detached: check out the branch to commit to")
    return branch


def show(rev: str, path: str | os.PathLike[str]) -> str | None:
    """The text of git-tracked ``path`` as committed at ``rev``; None where it has no such file."""
    proc = subprocess.run(["git", "show", f"{rev}:{Path(path).as_posix()}"],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def read(path: str | os.PathLike[str], rev: str, mode: str = "r") -> Any:
    """``path`` at commit ``rev``, a DVC-tracked output (from DVC's cache or its remote) or
    not: text, or bytes with ``mode="rb"``."""
    import dvc.api

    return dvc.api.read(str(path), rev=rev, mode=mode)


def exp_show(baseline: str) -> list[dict[str, Any]]:
    """`dvc exp show --rev baseline`'s rows, flat: "Experiment", "rev", "accuracy.val",
    "train.seed", ... ; the baseline's own row first."""
    import dvc.api

    return dvc.api.exp_show(revs=baseline)


def uncommitted_changes() -> list[str]:
    """Tracked files with changes, staged or not, that git HEAD does not hold."""
    out = git("status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines()]


def describe_changes(paths: list[str]) -> str:
    """At most five of ``paths``, for a one-line message."""
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def unshared_outputs() -> dict[str, str]:
    """Outputs that dvc.lock names but the default DVC remote lacks (`dvc status --cloud`):
    {path: "new" (only in the local cache) or "missing" (in neither)}."""
    status = json.loads(dvc("status", "--cloud", "--json", log=False) or "{}")
    return {path: state for path, state in status.items() if state in ("new", "missing")}


def default_dvc_remote() -> str | None:
    """The DVC remote `dvc push` uses by default (core.remote); None without one."""
    try:
        return dvc("remote", "default", log=False).strip() or None
    except CommandFailed:
        return None


def git_remote() -> str | None:
    """The git remote the current branch tracks, else ``origin`` if there is one."""
    branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    tracked = git("config", "--default", "", f"branch.{branch}.remote").strip()
    remotes = git("remote").split()
    return tracked if tracked in remotes else GIT_REMOTE if GIT_REMOTE in remotes else None


def remote_url(remote: str = GIT_REMOTE) -> str | None:
    """The URL of git remote ``remote``; None when there is none."""
    try:
        return git("remote", "get-url", remote).strip()
    except CommandFailed:
        return None


def remote_ref(remote: str, ref: str) -> str | None:
    """The commit ``ref`` names on git remote ``remote`` now; None where it has no such ref."""
    out = git("ls-remote", remote, ref).split()
    return out[0] if out else None


def commit_on_remote(commit: str, remote: str = GIT_REMOTE) -> bool:
    """Whether a branch or tag of ``remote`` (fetched now) contains ``commit``."""
    git("fetch", "--quiet", "--tags", remote)
    refs = git("for-each-ref", "--contains", commit, "--format=%(refname)",
               f"refs/remotes/{remote}", "refs/tags")
    return bool(refs.strip())


def upstream_ref(branch: str) -> str:
    """The branch on the git remote that ``branch`` pushes to (branch.<name>.merge)."""
    merge = git("config", "--default", "", f"branch.{branch}.merge").strip()
    return merge or f"refs/heads/{branch}"


def committer_env() -> dict[str, str]:
    """A committer identity for commits a flow makes where git has none configured (a fresh
    worker); empty where it has one, so a user's own identity signs the commit."""
    if subprocess.run(["git", "var", "GIT_COMMITTER_IDENT"], capture_output=True).returncode == 0:
        return {}
    who = {"NAME": "fashionnet", "EMAIL": "fashionnet@localhost"}
    return {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
            for key, value in who.items()}


def unshallow(remote: str | None) -> None:
    """The whole history from ``remote`` where this clone is shallow (Prefect's git_clone step
    clones with --depth 1): there `dvc exp run --temp` ends 0 having made no experiment."""
    if git("rev-parse", "--is-shallow-repository").strip() == "true":
        if remote is None:
            raise RuntimeError("this clone is shallow and has no git remote to deepen it from")
        git("fetch", "--quiet", "--unshallow", remote)
