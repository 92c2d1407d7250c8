"""Wall time of one sweep on two Prefect process workers against the same grid one at a time.

Everything on loopback, as in tests/test_sweep.py: a Prefect server with authentication, a
bare git repository as the git remote, SeaweedFS S3 as the DVC remote, and a clone of this
repository's committed files with tiny params (``--limit`` training images, one epoch). The
same grid runs three ways from that one clone, each at its own empty commit so that no
experiment is already done:

1. ``fashionnet sweep -S GRID --pool two``: two workers, one run each at a time;
2. ``fashionnet sweep -S GRID --pool one``: one worker, so the runs go one after the other;
3. ``fashionnet sweep -S GRID``: DVC's local queue, one at a time (no remotes).

Workers get ``OMP_NUM_THREADS`` = cores / workers so that neither setup oversubscribes.

    python benchmarks/sweep_workers.py                  # ~10 minutes on 2 busy cores
    python benchmarks/sweep_workers.py --grid train.seed=1,2,3,4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import BIN, copy_repo, git, set_params  # noqa: E402
from tests.servers import (  # noqa: E402
    bare_git_remote,
    prefect_server_with_auth,
    process_worker,
    s3_server,
)


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr}")
    return seconds


def new_baseline(repo: Path, label: str) -> None:
    """A new commit (with the last sweep's table), so that no experiment of the grid exists."""
    git(repo, "commit", "-qa", "--allow-empty", "-m", f"benchmark: {label}")
    git(repo, "push", "-q", "origin", "HEAD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", nargs="+", default=["train.seed=1,2"],
                        help="-S values of the sweep (default train.seed=1,2)")
    parser.add_argument("--limit", type=int, default=600, help="split.limit of every run")
    args = parser.parse_args()
    sources = os.environ.get("FASHIONNET_SOURCE_DIR", "/usr/share/datasets/fashion-mnist")
    cores = os.cpu_count() or 1
    grid = [a for spec in args.grid for a in ("-S", spec)]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp_path = Path(tmp)
        server = stack.enter_context(prefect_server_with_auth(tmp_path / "prefect"))
        s3 = stack.enter_context(s3_server(tmp_path / "s3"))
        remote = bare_git_remote(tmp_path / "remote.git")
        repo = copy_repo(tmp_path / "repo")
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": str(repo), "FASHIONNET_SOURCE_DIR": sources,
               **server.client_env(), **s3.credentials_env()}
        set_params(repo, **{"split.limit": args.limit, "split.val_size": 600,
                            "train.epochs": 1})
        for cmd in (["dvc", "remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc"],
                    ["dvc", "remote", "modify", "team", "endpointurl", s3.endpoint],
                    ["dvc", "repro", "download"]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "benchmark params")
        git(repo, "remote", "add", "origin", str(remote))
        git(repo, "push", "-q", "origin", "HEAD")
        subprocess.run(["dvc", "push"], cwd=repo, env=env, check=True, capture_output=True)
        worker_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        for pool, workers in (("two", 2), ("one", 1)):
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type",
                            "process"], env=env, check=True, capture_output=True)
            threads = str(max(1, cores // workers))
            for i in range(workers):
                stack.enter_context(process_worker(
                    pool, f"{pool}-{i}", {**worker_env, "OMP_NUM_THREADS": threads},
                    tmp_path / f"{pool}-{i}.log", limit=1))
        times = {}
        for label, extra, threads in (("two workers", ["--pool", "two"], None),
                                      ("one worker", ["--pool", "one"], None),
                                      ("local queue, one at a time", [], str(cores))):
            new_baseline(repo, label)
            run_env = {**env, "OMP_NUM_THREADS": threads} if threads else env
            times[label] = timed(["fashionnet", "sweep", *grid, *extra], repo, run_env)
            print(f"{label}: {times[label]:.0f} s", flush=True)
    base = times["two workers"]
    print(f"\ngrid {' '.join(args.grid)}, split.limit {args.limit}, 1 epoch, {cores} cores")
    for label, seconds in times.items():
        print(f"{label:28s} {seconds:6.0f} s  {seconds / base:4.2f}x the two workers' time")


if __name__ == "__main__":
    main()
