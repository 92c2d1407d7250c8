"""The four official Fashion-MNIST files: found locally or downloaded, always verified.

Sources differ in compression (Debian recompresses the .gz files), so the check is on the
decompressed bytes, against SHA-256 digests of the official release.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
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


def read_verified(path: str | os.PathLike[str], name: str) -> bytes:
    """The decompressed bytes of ``path`` (plain or .gz), refused unless they are the
    official ``name``."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, f"corrupt gzip data ({e})") from None
    digest = sha256(raw)
    if digest != OFFICIAL_SHA256[name]:
        raise DataError(path, f"is not the official {name}: SHA-256 {digest[:16]}... "
                              f"expected {OFFICIAL_SHA256[name][:16]}...")
    return raw


def find_local(name: str, directories: list[Path]) -> Path | None:
    """The first ``name`` or ``name.gz`` in ``directories``."""
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def fetch(name: str, mirror: str) -> bytes:
    """Download ``name.gz`` from ``mirror`` (torchvision's downloader) and verify it."""
    from torchvision.datasets.utils import download_url  # heavy import, only when needed

    url = mirror.rstrip("/") + f"/{name}.gz"
    with tempfile.TemporaryDirectory(prefix="fashionnet-download-") as tmp:
        download_url(url, tmp, filename=f"{name}.gz")
        return read_verified(Path(tmp) / f"{name}.gz", name)


def install(raw_dir: str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Write verified bytes to ``raw_dir/name`` atomically."""
    target = Path(raw_dir) / name
    write_bytes(target, data)
    return target
