"""The four official Fashion-MNIST files: found locally or downloaded, always verified.

Sources differ in compression (Debian recompresses the .gz files), so the check is on the
decompressed bytes, against SHA-256 digests of the official release.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.request
import zlib
from pathlib import Path

from fashionnet.errors import DataError
from fashionnet.files import write_bytes

log = logging.getLogger("fashionnet")

# SHA-256 of the official uncompressed files (github.com/zalandoresearch/fashion-mnist).
OFFICIAL_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# Debian's package dataset-fashion-mnist installs the gzip files here.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_official(path: str | os.PathLike[str], name: str) -> bool:
    """True when ``path`` holds the official uncompressed ``name``."""
    try:
        return sha256(Path(path).read_bytes()) == OFFICIAL_SHA256[name]
    except FileNotFoundError:
        return False


def verified(raw: bytes, name: str, origin: str | os.PathLike[str]) -> bytes:
    """``raw`` (plain or gzip) decompressed, refused unless it is the official ``name``;
    errors name ``origin``, the file or URL it came from."""
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(origin, f"corrupt gzip data ({e})") from None
    digest = sha256(raw)
    if digest != OFFICIAL_SHA256[name]:
        raise DataError(origin, f"is not the official {name}: SHA-256 {digest[:16]}... "
                                f"expected {OFFICIAL_SHA256[name][:16]}...")
    return raw


def read_verified(path: str | os.PathLike[str], name: str) -> bytes:
    """The decompressed bytes of the file ``path``, refused unless they are ``name``'s."""
    return verified(Path(path).read_bytes(), name, path)


def find_local(name: str, directories: list[Path]) -> Path | None:
    """The first ``name`` or ``name.gz`` in ``directories``."""
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def fetch(name: str, mirror: str, timeout: float = 60.0) -> bytes:
    """Download ``name.gz`` from ``mirror`` and verify it.

    A body shorter than its Content-Length raises ConnectionError (``urllib`` and
    torchvision's ``download_url`` would silently keep the truncated bytes), so the caller
    can tell a dropped connection, worth a retry, from a wrong file (DataError).
    """
    url = mirror.rstrip("/") + f"/{name}.gz"
    request = urllib.request.Request(url, headers={"User-Agent": "fashionnet"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        expected = response.headers.get("Content-Length")
        body = response.read()
    if expected is not None and len(body) != int(expected):
        raise ConnectionError(f"{url}: connection dropped after {len(body)} of {expected} bytes")
    return verified(body, name, url)


def install(raw_dir: str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Write verified bytes to ``raw_dir/name`` atomically."""
    target = Path(raw_dir) / name
    write_bytes(target, data)
    return target
