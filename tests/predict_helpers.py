"""What the tests of `fashionnet predict` and its library share: PNG files of real images, a
model's weights, the refusal they expect. Their fixtures (model_file, test_pngs) are in
tests/conftest.py."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashionnet import FashionNet
from fashionnet.conversion import Invert, Prepared
from fashionnet.reading import Source, read_images


def write_pngs(images: np.ndarray, directory: Path) -> Path:
    """images[i] as directory/{i:05d}.png, written by a thread pool (zlib runs without the GIL)."""
    directory.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: Image.fromarray(images[i]).save(directory / f"{i:05d}.png"),
                      range(len(images))))
    return directory


def blank_png(width: int, height: int) -> bytes:
    """A black greyscale PNG, compressed as it is written: no full-size array is made."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    deflate, row = zlib.compressobj(1), bytes(width + 1)  # each row: filter byte 0, pixels 0
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def read_file(path: Path, invert: Invert = "auto") -> tuple[list[Source], Prepared]:
    """All the images of one file, as `fashionnet predict` reads them, in one piece."""
    chunks = list(read_images([path], invert))
    return ([s for c in chunks for s in c.sources],
            Prepared(np.concatenate([c.prepared.images for c in chunks]),
                     np.concatenate([c.prepared.inverted for c in chunks])))


def load(path: Path) -> FashionNet:
    model = FashionNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def assert_bad_input(status: int, err: str, *names: object) -> None:
    """Exit 2 with one line on stderr naming each of ``names``, and no traceback."""
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fashionnet predict: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0]
