"""Child processes that never outlive the process that started them, however it ends.

A process killed with SIGKILL runs no cleanup, so its children cannot be stopped by it: the
kernel has to. Each child is started through a few lines of Python that ask Linux to signal it
when its parent dies (``prctl(PR_SET_PDEATHSIG)``) before running the command; the same
mechanism the Prefect servers of pipeline/prefect_server.py use. Without prctl (not Linux) the
child runs unguarded and only a clean exit of its parent stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

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

# Run as the child: the supervisor of a process group that holds the command and whatever it
# starts. On its parent's death (the death signal is SIGTERM here) or on SIGINT/SIGTERM, the
# group gets SIGINT, then SIGKILL after GRACE seconds, then the cleanup command (JSON) runs.
_SUPERVISE = _ASK_FOR_DEATH.format(signal="SIGTERM") + """\
grace, cleanup = float(sys.argv[2]), json.loads(sys.argv[3])
child = subprocess.Popen(sys.argv[4:], start_new_session=True)

def signal_group(signum):
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass

def stop(signum, _frame):
    signal_group(signal.SIGINT)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)  # the command and all it started, however far it got
    if cleanup:
        subprocess.run(cleanup, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    os._exit(128 + signum)

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, stop)
code = child.wait()
signal_group(signal.SIGKILL)  # what the command left running in its group
sys.exit(code if code >= 0 else 128 - code)
"""


def die_with_parent(command: Sequence[str], group: bool = False,
                    cleanup: Sequence[str] = ()) -> list[str]:
    """``command`` (its first item a path) wrapped so that it dies with this thread's process,
    however that ends: pass the result to subprocess.Popen from the thread that will wait on it
    (the death signal follows the thread that forked).

    ``group=False``: the command runs in the wrapper's place and gets SIGKILL. ``group=True``:
    a supervisor runs the command in a process group of its own and ends the whole group, the
    processes the command started included (`dvc exp run` -> `fashionnet train`), with SIGINT
    then SIGKILL after GRACE seconds; SIGINT or SIGTERM sent to the supervisor does the same,
    and then ``cleanup`` runs (a command: what the dead processes cannot finish themselves).
    """
    if group:
        return [sys.executable, "-c", _SUPERVISE, str(os.getpid()), str(GRACE),
                json.dumps(list(cleanup)), *command]
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
    that did not end: a killed `dvc exp run` takes its stages down mid-run, and their own
    flow runs would stay Running, or end Crashed, though nothing went wrong in them. Their
    names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelled

    done = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent}"]))):
            if run.state is None or not run.state.is_completed():
                client.set_flow_run_state(run.id, Cancelled(
                    message=f"its parent flow run {parent} was cancelled or killed"), force=True)
                done.append(run.name)
    return done


if __name__ == "__main__":  # python -m pipeline.processes cancel-children PARENT_RUN_ID
    if sys.argv[1:2] == ["cancel-children"]:
        cancel_children(sys.argv[2])
