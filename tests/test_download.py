"""The download stage for real: local sources, and a mirror on loopback that serves the
official files, a wrong file, and connections that drop."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashionnet import download
from fashionnet.errors import DataError
from fashionnet.idx import RAW_FILES
from pipeline import download as stage
from pipeline import paths
from pipeline.params import DownloadConfig, Params


class Mirror(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes). ``drops[name]`` connections for that name are cut
    halfway through the body before one is served whole; -1 cuts every one."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.drops: dict[str, int] = {}
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drops = self.server.drops.get(name, 0)
        if drops:
            self.server.drops[name] = drops - 1 if drops > 0 else -1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def gz_files(raw_dir: Path) -> dict[str, bytes]:
    return {f"{n}.gz": gzip.compress((raw_dir / n).read_bytes(), 1) for n in RAW_FILES}


@pytest.fixture
def mirror(gz_files: dict[str, bytes]) -> Iterator[Mirror]:
    server = Mirror(dict(gz_files))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with no local source of the data at all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASHIONNET_SOURCE_DIR", raising=False)
    monkeypatch.setattr(download, "DEBIAN_DIR", tmp_path / "no-debian")
    # Keep Prefect's retries but not their waiting.
    monkeypatch.setattr(stage, "fetch_remote",
                        stage.fetch_remote.with_options(retry_delay_seconds=0))
    return tmp_path


def test_fetch_verifies_decompressed_bytes(mirror: Mirror, raw_dir: Path):
    name = "t10k-labels-idx1-ubyte"
    assert download.fetch(name, mirror.url) == (raw_dir / name).read_bytes()


def test_fetch_refuses_a_wrong_file(mirror: Mirror):
    mirror.files["t10k-labels-idx1-ubyte.gz"] = gzip.compress(b"\x00\x00\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="is not the official t10k-labels-idx1-ubyte"):
        download.fetch("t10k-labels-idx1-ubyte", mirror.url)


def test_fetch_raises_on_a_dropped_connection(mirror: Mirror):
    mirror.drops["t10k-labels-idx1-ubyte.gz"] = 1
    with pytest.raises(Exception) as error:
        download.fetch("t10k-labels-idx1-ubyte", mirror.url)
    assert not isinstance(error.value, DataError)


def test_flow_downloads_all_files_and_retries_dropped_connections(
        prefect_harness, workdir: Path, mirror: Mirror, raw_dir: Path):
    mirror.drops = {"train-images-idx3-ubyte.gz": 2, "t10k-labels-idx1-ubyte.gz": 1}
    params = Params(download=DownloadConfig(mirrors=(mirror.url,)))
    stage.download_flow(params)
    for name in RAW_FILES:
        assert (workdir / paths.RAW_DIR / name).read_bytes() == (raw_dir / name).read_bytes()
    assert mirror.requests.count("train-images-idx3-ubyte.gz") == 3
    assert sorted(p.name for p in (workdir / paths.RAW_DIR).iterdir()) == sorted(RAW_FILES)
    # A second run finds every file verified in place and asks the network for nothing.
    mirror.requests.clear()
    stage.download_flow(params)
    assert mirror.requests == []


def test_flow_falls_through_dead_mirrors_and_leaves_no_partial_file(
        prefect_harness, workdir: Path, mirror: Mirror):
    mirror.drops = {f"{n}.gz": -1 for n in RAW_FILES}
    dead = "http://127.0.0.1:9/"  # nothing listens on the discard port
    with pytest.raises(ConnectionError, match="no mirror could be reached"):
        stage.download_flow(Params(download=DownloadConfig(mirrors=(dead, mirror.url))))
    raw = workdir / paths.RAW_DIR
    assert not raw.exists() or list(raw.iterdir()) == []
    assert mirror.requests.count("train-images-idx3-ubyte.gz") == 4  # first try + 3 retries


def test_flow_refuses_a_wrong_file_without_retrying(prefect_harness, workdir: Path,
                                                    mirror: Mirror):
    mirror.files["t10k-images-idx3-ubyte.gz"] = gzip.compress(b"nonsense")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        stage.download_flow(Params(download=DownloadConfig(mirrors=(mirror.url,))))
    assert mirror.requests.count("t10k-images-idx3-ubyte.gz") == 1
    assert not (workdir / paths.RAW_DIR / "t10k-images-idx3-ubyte").exists()


def test_named_local_directory_comes_first_and_is_verified(
        prefect_harness, workdir: Path, raw_dir: Path, mirror: Mirror,
        monkeypatch: pytest.MonkeyPatch):
    local = workdir / "mine"
    local.mkdir()
    for name in RAW_FILES:  # plain files and .gz files are both accepted
        data = (raw_dir / name).read_bytes()
        if name.startswith("t10k"):
            (local / f"{name}.gz").write_bytes(gzip.compress(data, 1))
        else:
            (local / name).write_bytes(data)
    params = Params(download=DownloadConfig(source_dir=str(local), mirrors=(mirror.url,)))
    stage.download_flow(params)
    assert mirror.requests == []
    for name in RAW_FILES:
        assert (workdir / paths.RAW_DIR / name).read_bytes() == (raw_dir / name).read_bytes()
    # A corrupt local copy is refused, and the good file already in data/raw/ stays.
    (workdir / paths.RAW_DIR / "train-labels-idx1-ubyte").unlink()
    (local / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    monkeypatch.setenv("FASHIONNET_SOURCE_DIR", str(local))
    with pytest.raises(DataError, match="mine/train-labels-idx1-ubyte"):
        stage.download_flow(Params())
    assert not (workdir / paths.RAW_DIR / "train-labels-idx1-ubyte").exists()
    assert download.is_official(workdir / paths.RAW_DIR / "train-images-idx3-ubyte",
                                "train-images-idx3-ubyte")
