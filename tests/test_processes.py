"""Nothing outlives a killed run: a supervised process group dies with the process that started
it, its cleanup runs; and `fashionnet retrain` killed mid-training takes `dvc exp run` and the
train stage with it within seconds, their flow runs ending Cancelled, not Crashed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.processes import PARENT_TAG, die_with_parent
from tests.helpers import git, prefect_client, set_params, wait_for
from tests.servers import clone

# A parent that starts a supervised tree (a child that starts a grandchild, and a daemon in a
# session of its own, out of the group, as DVC's queue workers are), says their pids, then
# waits to be killed.
PARENT = """
import subprocess, sys, time
from pipeline.processes import die_with_parent
tree = ("import subprocess, sys, time; g = subprocess.Popen(['sleep', '600']); "
        "d = subprocess.Popen(['sleep', '600'], start_new_session=True); "
        "print(g.pid, d.pid, flush=True); time.sleep(600)")
child = subprocess.Popen(die_with_parent([sys.executable, '-c', tree], group=True,
                                         cleanup=['touch', sys.argv[1]]), stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_supervised_group_dies_with_its_parent_and_its_cleanup_runs(tmp_path):
    marker = tmp_path / "cleaned"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(marker)],
                              stdout=subprocess.PIPE, text=True)
    try:
        supervisor = int(parent.stdout.readline())
        grandchild, daemon = map(int, parent.stdout.readline().split())
        group = [supervisor, *(p.pid for p in psutil.Process(supervisor).children(True))]
        assert {grandchild, daemon} < set(group) and len(group) == 4
        assert os.getsid(daemon) == daemon != os.getsid(grandchild)
        parent.kill()  # SIGKILL: the parent runs no cleanup of its own
        start = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in group), "the group's end", 10)
        assert time.monotonic() - start < 3  # SIGINT, then SIGKILL after a second
        wait_for(marker.exists, "the cleanup command", 10)
    finally:
        parent.kill()
        parent.wait()


def test_what_a_command_leaves_running_ends_with_it_and_its_status_is_kept():
    # A daemon in a session of its own whose parent exits: it is orphaned, so only the
    # supervisor, as the subreaper of the tree, can still find it.
    command = ("import subprocess, sys; d = subprocess.Popen(['sleep', '600'], "
               "start_new_session=True); print(d.pid, flush=True); sys.exit(3)")
    proc = subprocess.run(die_with_parent([sys.executable, "-c", command], group=True),
                          capture_output=True, text=True, timeout=30)
    daemon = int(proc.stdout)
    try:
        assert proc.returncode == 3, proc.stderr
        assert not alive(daemon)
    finally:
        if alive(daemon):
            os.kill(daemon, 9)


@pytest.mark.slow
def test_a_killed_retrain_takes_its_stages_with_it(remotes, tmp_path, prefect_api, raw_dir):
    repo, env = clone(remotes.url, tmp_path / "ws", prefect_api, raw_dir)
    git(repo, "remote", "remove", "origin")  # nothing of this run is shared
    set_params(repo, **{"train.epochs": 50})
    git(repo, "commit", "-qam", "a training that lasts")
    started = time.time()
    retrain = subprocess.Popen(["fashionnet", "retrain"], cwd=repo, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: next(repo.glob(".dvc/tmp/exps/**/checkpoints/train.pt"), None),
                 "the train stage's first checkpoint", 300, proc=retrain)
        tree = psutil.Process(retrain.pid).children(recursive=True)
        commands = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "dvc exp run" in commands and "pipeline.cli train" in commands, commands
        # The supervisor of the dvc process group (retrain's only child) outlives the group by
        # the time its cleanup takes: setting the stages' flow runs Cancelled.
        (supervisor,) = psutil.Process(retrain.pid).children()
        working = [p for p in tree if p.pid != supervisor.pid]
        retrain.kill()
        start = time.monotonic()
        wait_for(lambda: not any(alive(p.pid) for p in working), "the stages' end", 30)
        assert time.monotonic() - start < 3, [p.cmdline() for p in working if alive(p.pid)]
        wait_for(lambda: not alive(supervisor.pid), "the supervisor's cleanup", 60)
    finally:
        retrain.kill()
        retrain.wait()

    def ended() -> list:
        """This retrain's train stage runs (tagged with their parent), once they ended."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        with prefect_client(prefect_api) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
                any_=["train"])))
        mine = [r for r in runs if r.start_time and r.start_time.timestamp() >= started
                and any(t.startswith(PARENT_TAG) for t in r.tags)]
        return mine if mine and all(r.state.is_final() for r in mine) else []

    (run,) = wait_for(ended, "the train stage's flow run's end", 60)
    assert run.state.type.value == "CANCELLED", run.state
    assert "was cancelled or killed" in run.state.message
