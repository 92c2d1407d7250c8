"""The download stage for real: local sources, and a mirror on loopback that serves the
official files, a wrong file, and connections that drop."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import http.server
import re
import threading
from collections import Counter
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


def digest(data: bytes) -> str:
    """The first 16 hex digits of ``data``'s SHA-256, as the refusals quote it."""
    return hashlib.sha256(data).hexdigest()[:16]


def refusal(origin: str, name: str, wrong: bytes, raw_dir: Path) -> str:
    """A pattern for the whole message refusing ``wrong`` (decompressed) bytes for ``name``."""
    official = digest((raw_dir / name).read_bytes())
    return "^" + re.escape(f"{origin}: is not the official {name}: SHA-256 {digest(wrong)}... "
                           f"expected {official}...") + "$"


def test_fetch_refuses_a_wrong_file(mirror: Mirror, raw_dir: Path):
    name, wrong = "t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01" + bytes(8)  # a valid IDX file
    mirror.files[f"{name}.gz"] = gzip.compress(wrong)
    message = refusal(f"{mirror.url}{name}.gz", name, wrong, raw_dir)
    with pytest.raises(DataError, match=message):
        download.fetch(name, mirror.url)


def test_fetch_raises_on_a_dropped_connection(mirror: Mirror, gz_files: dict[str, bytes]):
    """Network trouble, not a DataError: the flow retries it (test below)."""
    name = "t10k-labels-idx1-ubyte.gz"
    mirror.drops[name] = 1
    with pytest.raises(http.client.IncompleteRead) as error:
        download.fetch("t10k-labels-idx1-ubyte", mirror.url)
    half = len(gz_files[name]) // 2  # the mirror cuts the body there
    assert (len(error.value.partial), error.value.expected) == (half, len(gz_files[name]) - half)


def test_flow_downloads_all_files_and_retries_dropped_connections(
        prefect_harness, workdir: Path, mirror: Mirror, raw_dir: Path):
    mirror.drops = {"train-images-idx3-ubyte.gz": 2, "t10k-labels-idx1-ubyte.gz": 1}
    params = Params(download=DownloadConfig(mirrors=(mirror.url,)))
    stage.download_flow(params)
    for name in RAW_FILES:
        assert (workdir / paths.RAW_DIR / name).read_bytes() == (raw_dir / name).read_bytes()
    # Each dropped connection is retried once more than it drops; the others are asked once.
    assert Counter(mirror.requests) == {"train-images-idx3-ubyte.gz": 3,
                                        "train-labels-idx1-ubyte.gz": 1,
                                        "t10k-images-idx3-ubyte.gz": 1,
                                        "t10k-labels-idx1-ubyte.gz": 2}
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
    assert not (workdir / paths.RAW_DIR).exists()  # not even the directory
    # The first file only: its first try and 3 retries, each falling through the dead mirror.
    assert mirror.requests == ["train-images-idx3-ubyte.gz"] * 4


def test_flow_refuses_a_wrong_file_without_retrying(prefect_harness, workdir: Path,
                                                    mirror: Mirror, raw_dir: Path):
    name = "t10k-images-idx3-ubyte"
    mirror.files[f"{name}.gz"] = gzip.compress(b"nonsense")
    message = refusal(f"{mirror.url}{name}.gz", name, b"nonsense", raw_dir)
    with pytest.raises(DataError, match=message):
        stage.download_flow(Params(download=DownloadConfig(mirrors=(mirror.url,))))
    # Asked once; the flow stops there, the two files before it installed, the last not asked.
    assert mirror.requests == [f"{n}.gz" for n in RAW_FILES[:3]]
    assert sorted(p.name for p in (workdir / paths.RAW_DIR).iterdir()) == sorted(RAW_FILES[:2])


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
    name = "train-labels-idx1-ubyte"
    with pytest.raises(DataError, match=refusal(str(local / name), name, b"garbage", raw_dir)):
        stage.download_flow(Params())
    assert not (workdir / paths.RAW_DIR / "train-labels-idx1-ubyte").exists()
    assert download.is_official(workdir / paths.RAW_DIR / "train-images-idx3-ubyte",
                                "train-images-idx3-ubyte")
