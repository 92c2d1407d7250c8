"""The Prefect servers this project starts: each one a child process that dies with its parent.

`fashionnet <stage>` without a configured API URL, `make repro` (through
``python -m pipeline.prefect_server dvc repro``, one server for all stages, its UI watching
them live) and the test suite start `prefect server start` on a free loopback port. Prefect's
own temporary server (SubprocessASGIServer) stops only at a clean exit (atexit), and
`prefect server start --background` detaches the server from its caller on purpose: after a
`kill -9` of the caller both keep running, about 190 MB each. So the server is started in the
foreground, as a child that the kernel kills when its parent dies, however the parent ends
(pipeline/processes.py). Runs are kept in Prefect's database under PREFECT_HOME,
so a later `prefect server start` shows them. With an API URL already configured (environment
or profile) nothing is started.

    python -m pipeline.prefect_server [COMMAND ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.processes import die_with_parent, free_port, stop

STARTUP_TIMEOUT = 120  # seconds; a first start migrates the database


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@contextmanager
def prefect_server(env: Mapping[str, str] | None = None, ui: bool | None = None,
                   scheduler: bool = True) -> Iterator[str]:
    """`prefect server start` on a free loopback port for the duration, dying with this
    process; its API URL. ``env`` adds to the server's environment (PREFECT_HOME, say);
    ``ui``: the web UI on or off (None: as PREFECT_UI_ENABLED says, on by default);
    ``scheduler=False`` leaves out the scheduling services (scheduler, late runs), which only
    deployments need. The services that record task runs and events always run."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    env.pop("PREFECT_API_URL", None)  # the server serves its own API, whatever a profile says
    # Where the UI in the browser finds the API; its default is the default port, 4200.
    env["PREFECT_UI_API_URL"] = api_url
    command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-background"]
    if ui is not None:
        command.append("--ui" if ui else "--no-ui")
    if not scheduler:
        command += ["--no-scheduler", "--no-late-runs"]
    with tempfile.TemporaryFile() as log:
        # One server starts at a time per database: two first starts would both migrate it,
        # and one of them fail. The lock is the OS's, dropped if its holder dies.
        with _start_lock(Path(env.get("PREFECT_HOME") or _default_home())):
            server = subprocess.Popen(die_with_parent(command), env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                _wait_until_up(server, api_url, log)
            except BaseException:
                stop(server)
                raise
        try:
            yield api_url
        finally:
            stop(server)


def _default_home() -> str:
    from prefect.settings import PREFECT_HOME

    return str(PREFECT_HOME.value())


@contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the Prefect database (in PREFECT_HOME) for a start."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / "fashionnet-server-start.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits for another start to finish
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_until_up(server: subprocess.Popen, api_url: str, log: IO[bytes]) -> None:
    """Poll the server's health endpoint until it answers; an error with the server's log if
    the server exits first or is not up within STARTUP_TIMEOUT.

    Our own loop rather than `prefect server status --wait`: that one checks once a second
    from a second Python process importing Prefect, which on 2 busy cores made each start
    2-7 s slower (11.0-17.5 s against 8.8-11.1 s, back to back, load 8)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _healthy(api_url):
        if server.poll() is not None or time.monotonic() > deadline:
            problem = (f"exited with status {server.returncode}" if server.returncode
                       is not None else f"not up within {STARTUP_TIMEOUT} s")
            log.seek(0)
            raise RuntimeError(f"the Prefect server {problem}:\n"
                               + log.read().decode(errors="replace")[-2000:])
        time.sleep(0.1)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    command = list(argv if argv is not None else sys.argv[1:]) or ["dvc", "repro"]
    if configured_api_url():
        return subprocess.call(command)
    try:
        with prefect_server() as api_url:
            print(f"Prefect server for this run: {api_url.removesuffix('/api')} "
                  "(its runs stay in the Prefect database: `prefect server start` shows them)",
                  flush=True)
            return subprocess.call(command, env={**os.environ, "PREFECT_API_URL": api_url})
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"prefect_server: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
