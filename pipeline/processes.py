"""Child processes that never outlive the process that started them, however it ends.

A process killed with SIGKILL runs no cleanup, so its children cannot be stopped by it: the
kernel has to. Each child is started through a few lines of Python that ask Linux to signal it
when its parent dies (``prctl(PR_SET_PDEATHSIG)``) before running the command; the same
mechanism the Prefect servers of pipeline/prefect_server.py use. Without prctl (not Linux) the
child runs unguarded and only a clean exit of its parent stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

STOP_TIMEOUT = 30  # seconds between SIGINT and SIGKILL

GRACE = 1.0  # seconds a supervised process group has to exit on SIGINT before SIGKILL

# Run as the child; then, in its place, the command (exec: signals reach the command itself).
# PR_SET_PDEATHSIG = 1 (linux/prctl.h); it survives execve. A parent that died before prctl is
# caught by the getppid check.
_ASK_FOR_DEATH = """\
import ctypes, json, os, signal, subprocess, sys
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
if prctl is not None and prctl(1, signal.{signal}) != 0:
    sys.exit(f"prctl(PR_SET_PDEATHSIG) failed: {{os.strerror(ctypes.get_errno())}}")
if os.getppid() != int(sys.argv[1]):
    sys.exit("the parent process is gone")
"""
_EXEC = _ASK_FOR_DEATH.format(signal="SIGKILL") + "os.execv(sys.argv[2], sys.argv[2:])\n"

def die_with_parent(command: Sequence[str], group: bool = False,
                    cleanup: Sequence[str] = ()) -> list[str]:
    """``command`` (its first item a path) wrapped so that it dies with this thread's process,
    however that ends: pass the result to subprocess.Popen from the thread that will wait on it
    (the death signal follows the thread that forked).

    ``group=False``: the command runs in the wrapper's place and gets SIGKILL. ``group=True``:
    supervise() runs the command and ends it with all it started (`dvc exp run` -> `fashionnet
    train`, DVC's queue workers too): SIGINT, then SIGKILL after GRACE seconds, when this
    process dies or the supervisor gets SIGINT, SIGTERM or SIGHUP; then ``cleanup`` runs (a
    command: what the dead processes cannot finish themselves).
    """
    if group:
        return [sys.executable, "-m", "pipeline.processes", "supervise", str(os.getpid()),
                str(GRACE), json.dumps(list(cleanup)), *command]
    return [sys.executable, "-c", _EXEC, str(os.getpid()), *command]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGINT, then SIGKILL if ``process`` has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PARENT_RUN_ENV = "FASHIONNET_PARENT_FLOW_RUN"  # set for the stages a flow run starts
PARENT_TAG = "fashionnet-parent:"  # + the id: the tag those stages' own flow runs carry


def stage_tags() -> list[str]:
    """The tags a stage's flow run carries: its parent flow run's, when a flow started it."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return [f"{PARENT_TAG}{parent}"] if parent else []


def cancel_children(parent: str) -> list[str]:
    """Set Cancelled every flow run that flow run ``parent`` started (by the stage tags) and
    that is still running or ended Crashed: a killed `dvc exp run` takes its stages down
    mid-run, and their own flow runs would stay Running, or end Crashed, though nothing went
    wrong in them. Their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelled

    done = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent}"]))):
            state = run.state  # a Failed run failed on its own: that stays on record
            if state is None or not state.is_final() or state.is_crashed():
                client.set_flow_run_state(run.id, Cancelled(
                    message=f"its parent flow run {parent} was cancelled or killed"), force=True)
                done.append(run.name)
    return done


def _prctl(option: int, value: int) -> None:
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is not None and prctl(option, value) != 0:
        sys.exit(f"prctl({option}) failed: {os.strerror(ctypes.get_errno())}")


def _descendants() -> list[int]:
    """The live processes below this one. As a subreaper (supervise) this process inherits the
    orphans of its tree, so the daemons a command starts (new session, parent gone) count."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _signal_all(signum: int, group: int) -> list[int]:
    """``signum`` to process group ``group`` and to every process below this one (signal 0:
    which are left); those it reached."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)
    reached = []
    for pid in _descendants():
        try:
            os.kill(pid, signum)
            reached.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return reached


def supervise(parent: int, grace: float, cleanup: list[str], command: list[str]) -> int:
    """Run ``command`` and end everything it starts when it exits, when process ``parent``
    dies, or on SIGINT/SIGTERM/SIGHUP: SIGINT, then SIGKILL after ``grace`` seconds; on the
    latter three ``cleanup`` runs then. Its exit status: the command's, or 128 + the signal.

    Written here, not left to a library: Linux alone knows a tree's orphans (the subreaper
    flag, PR_SET_CHILD_SUBREAPER = 36), and signals are only handled safely by a flag the
    main loop reads (wakeup fd), never by waiting inside a handler."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: our parent's death is a SIGTERM to us
    if os.getppid() != parent:
        sys.exit("the parent process is gone")
    _prctl(36, 1)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    stopping: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # before the command starts
        signal.signal(s, lambda signum, _frame: stopping.append(signum))
    child = subprocess.Popen(command, start_new_session=True)
    ended = os.pidfd_open(child.pid) if hasattr(os, "pidfd_open") else None
    while not stopping and child.poll() is None:
        select.select([wake_read, *([ended] if ended is not None else [])], [], [],
                      None if ended is not None else 0.5)
    # SIGINT first (`dvc exp run` stops its stage and cleans up), then SIGKILL: to the
    # command's process group and to every process below this one (the group's members and
    # any that left it, like DVC's queue workers), after it ended too.
    _signal_all(signal.SIGINT, child.pid)
    deadline = time.monotonic() + grace
    while _signal_all(0, child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a poll of /proc: the ends of processes not our children send nothing
    _signal_all(signal.SIGKILL, child.pid)
    code = child.wait()
    while True:  # reap the orphans we inherited
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    if stopping:
        if cleanup:
            subprocess.run(cleanup, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        return 128 + stopping[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    if sys.argv[1:2] == ["cancel-children"]:  # PARENT_RUN_ID
        cancel_children(sys.argv[2])
    elif sys.argv[1:2] == ["supervise"]:  # PARENT_PID GRACE CLEANUP_JSON COMMAND...
        sys.exit(supervise(int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4]),
                           sys.argv[5:]))
