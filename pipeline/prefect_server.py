"""Run a command, `dvc repro` by default, with one Prefect server for all of its stages.

Without an API URL each `fashionnet <stage>` starts Prefect's temporary server, about 6-10 s a
stage. `make repro` runs through this module instead: one `prefect server start` on a free
loopback port (its UI watches the stages live), `PREFECT_API_URL` pointing the stages at it,
then the server stops. Runs are kept in Prefect's database under PREFECT_HOME, so a later
`prefect server start` shows them. With an API URL already configured (environment or
profile) the command runs against that server, unchanged.

    python -m pipeline.prefect_server [COMMAND ...]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT = 120.0  # seconds; a first start migrates the database


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A `prefect server start` on a free loopback port for the duration; its API URL.
    ``env`` adds to the server's environment (PREFECT_HOME, say)."""
    port = free_port()
    prefect = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    env.pop("PREFECT_API_URL", None)  # the server serves its own API, whatever a profile says
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        api_url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not healthy(api_url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError("the Prefect server did not start:\n"
                                       + log.read().decode(errors="replace")[-2000:])
                time.sleep(0.2)
            yield api_url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


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
