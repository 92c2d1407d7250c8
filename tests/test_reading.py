"""Finding and reading users' files (fashionnet.reading, fashionnet.arrays, fashionnet.idx):
directory walks that meet loops and unreadable entries, files that are not regular, .npz and
IDX headers that claim more than the file holds or than memory allows, reading in chunks."""

from __future__ import annotations

import io
import os
import socket
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from fashionnet import idx
from fashionnet.arrays import idx_images, npz_images, npz_labels
from fashionnet.errors import DataError
from fashionnet.reading import find_images, read_images


def png(path, value: int = 0) -> str:
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)
    return str(path)


def idx_header(count: int) -> bytes:
    return b"\x00\x00\x08\x03" + struct.pack(">III", count, 28, 28)


def npz_claiming(path, shape: tuple[int, ...], data: bytes) -> None:
    """An .npz whose ``images`` header says ``shape`` but which holds ``data``."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", member.getvalue() + data)


def peak_bytes(call) -> tuple[int, object]:
    """The most bytes Python and NumPy held at once above their level before ``call()``."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except DataError as e:
            result = e
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


# --- directory walks and special files --------------------------------------------------------


def test_a_symbolic_link_loop_is_refused_or_skipped(tmp_path):
    (tmp_path / "sub").mkdir()
    good = png(tmp_path / "a.png")
    (tmp_path / "sub" / "up").symlink_to("..")  # sub/up/sub/up/... forever
    (tmp_path / "self.png").symlink_to("self.png")  # too many levels of symbolic links
    with pytest.raises(DataError, match=r"self\.png: cannot be read: Too many levels"):
        find_images([tmp_path])
    bad: list[DataError] = []
    assert find_images([tmp_path], bad) == [good]
    assert [str(e) for e in bad] == [
        f"{tmp_path / 'self.png'}: cannot be read: Too many levels of symbolic links",
        f"{tmp_path / 'sub' / 'up'}: a symbolic link loop: it leads back to a directory that "
        "contains it"]


def test_entries_that_are_not_regular_files_are_refused_or_skipped(tmp_path):
    """Inside a directory, a FIFO, a socket and a broken link named like images; a link to
    another directory is no loop and is followed."""
    os.mkfifo(tmp_path / "pipe.png")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "socket.png"))
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "notes.fifo").mkdir()  # not an image name: a directory, walked
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    (tmp_path / "z").symlink_to(other)
    png(other / "b.png")
    bad: list[DataError] = []
    assert find_images([tmp_path], bad) == [str(tmp_path / "z" / "b.png")]
    assert [e.problem for e in bad] == ["a broken symbolic link",
                                        "not a regular file: a named pipe (FIFO)",
                                        "not a regular file: a socket"]
    with pytest.raises(DataError, match=r"gone\.png: a broken symbolic link"):
        find_images([tmp_path])


def test_an_unreadable_directory_is_refused_or_skipped(tmp_path, monkeypatch):
    """A subdirectory whose listing fails as chmod 000 makes it fail for a user who is not
    root (root reads it anyway, so the failure is injected where the walk lists it)."""
    (tmp_path / "locked").mkdir()
    good = png(tmp_path / "a.png")
    scandir = os.scandir

    def listing(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)
    with pytest.raises(DataError, match="locked: cannot be read: Permission denied"):
        find_images([tmp_path])
    bad: list[DataError] = []
    assert find_images([tmp_path], bad) == [good] and len(bad) == 1


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_paths_given_that_are_not_regular_files_are_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        path = "/dev/zero"  # a read never ends
    with pytest.raises(DataError, match={"fifo": "a named pipe", "socket": "a socket",
                                         "device": "a character device"}[kind]):
        find_images([path], bad=[])  # bad entries inside directories only: still refused
    with pytest.raises(DataError, match="not a regular file"):
        idx.open_regular(path)


# --- IDX and .npz headers ---------------------------------------------------------------------


def test_an_idx_header_claiming_more_than_the_file_is_refused_before_reading(tmp_path):
    """50 MB (sparse) whose header claims 4 billion images: refused from its size alone."""
    path = tmp_path / "forged-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(idx_header(2**32 - 1))
        f.truncate(50_000_000)
    for read in (lambda: idx.read_images(path), lambda: idx_images(path)):
        peak, error = peak_bytes(read)
        assert isinstance(error, DataError) and "truncated: 50000000 bytes" in str(error)
        assert peak < 1_000_000


def test_an_idx_file_larger_than_the_memory_limit_is_not_read_whole(tmp_path):
    """A consistent 1.1 GB (sparse) IDX file: the pipeline's whole-file reader refuses it
    before reading; read in chunks it is fine."""
    count = 1_400_000  # 1.1e9 bytes > MAX_ARRAY_BYTES
    path = tmp_path / "big-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(idx_header(count))
        f.truncate(16 + count * 784)
    peak, error = peak_bytes(lambda: idx.read_images(path))
    assert isinstance(error, DataError) and "more than the 1,073,741,824 read" in str(error)
    assert peak < 1_000_000
    images = idx_images(path)
    assert images.count == count
    with pytest.raises(DataError, match="more than the 1,073,741,824 read at once"):
        images.read()
    first = next(images.chunks(1000))
    assert first.shape == (1000, 28, 28) and not first.any()


def test_an_npz_header_claiming_more_than_the_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "forged.npz"
    npz_claiming(path, (10**9, 28, 28), bytes(3 * 784))
    peak, error = peak_bytes(lambda: npz_images(path))
    assert isinstance(error, DataError) and peak < 1_000_000
    assert str(error) == (f"{path}: 'images' claims (1000000000, 28, 28) (784,000,000,000 "
                          "bytes), but holds 2,352 bytes")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_npz_directory_claiming_more_than_the_file_is_refused(tmp_path, compression):
    """The zip directory forged too: it says the member holds 5 million images, 3.9 GB, in
    a file of a few kB (stored), or more than deflate can expand its bytes to."""
    path = tmp_path / "forged.npz"
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "|u1", "fortran_order": False, "shape": (5_000_000, 28, 28)})
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("images.npy", member.getvalue() + bytes(784))
    raw = bytearray(path.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # the central directory's entry: sizes at +20 and +24
    sizes = (0xFFFFFFF0, 0xFFFFFFF0) if compression == zipfile.ZIP_STORED else (100, 0xFFFFFFF0)
    raw[entry + 20 : entry + 28] = struct.pack("<II", *sizes)
    path.write_bytes(bytes(raw))
    peak, error = peak_bytes(lambda: npz_images(path))
    assert isinstance(error, DataError) and peak < 1_000_000
    assert f"'images' claims 4,294,967,280 bytes, more than the {len(raw):,}-byte file" \
        in str(error)


def test_an_npz_member_compressed_otherwise_than_numpy_writes_is_refused(tmp_path):
    path = tmp_path / "bzip2.npz"
    member = io.BytesIO()
    np.save(member, np.zeros((2, 28, 28), np.uint8))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("images.npy", member.getvalue())
    assert np.load(path)["images"].shape == (2, 28, 28)  # numpy itself would read it
    with pytest.raises(DataError, match="'images' is compressed with zip method 12: only "
                                        "stored and deflated"):
        npz_images(path)


def test_npz_arrays_read_in_chunks_and_whole(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2500, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 2500).astype(np.int64)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", images=images, labels=labels)
        stream = npz_images(tmp_path / "a.npz")
        assert [len(c) for c in stream.chunks(1000)] == [1000, 1000, 500]
        np.testing.assert_array_equal(np.concatenate(list(stream.chunks(1000))), images)
        np.testing.assert_array_equal(stream.read(), images)
        assert npz_labels(tmp_path / "a.npz", 2500).tolist() == labels.tolist()
        with pytest.raises(DataError, match="more than the 1,000 read at once"):
            stream.read(max_bytes=1000)
        with pytest.raises(DataError, match="more than the 1,000 read at once"):
            npz_labels(tmp_path / "a.npz", 2500, max_bytes=1000)
    np.savez(tmp_path / "f.npz", np.asfortranarray(images[:40]))  # its only array
    np.testing.assert_array_equal(np.concatenate(list(npz_images(tmp_path / "f.npz").chunks(7))),
                                  images[:40])
    assert npz_labels(tmp_path / "f.npz", 40) is None
    np.savez(tmp_path / "b.npz", images=images[:3], labels=np.array([1, 12, 3]))
    with pytest.raises(DataError, match=r"label 12 at index 1 is outside 0\.\.9"):
        npz_labels(tmp_path / "b.npz", 3)
    with pytest.raises(DataError, match=r"'labels' must be \(4,\) integers"):
        npz_labels(tmp_path / "b.npz", 4)


def test_an_npz_that_breaks_off_keeps_the_images_before(tmp_path):
    """A damaged byte in the last of three chunks: its CRC fails as the data ends. Without
    skip_bad that is an error; with it the first 2,000 images are read and the file
    reported, saying how many came before."""
    path = tmp_path / "damaged.npz"
    np.savez(path, images=np.zeros((3000, 28, 28), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"images.npy") + 200 + 2_500 * 784] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"breaks off after 2,000 of its 3,000 images \(Bad"):
        list(read_images([path], chunk_images=1000))
    chunks = list(read_images([path], skip_bad=True, chunk_images=1000))
    assert [s.index for c in chunks for s in c.sources] == list(range(2000))
    assert [str(e) for c in chunks for e in c.bad] == [
        f"{path}: breaks off after 2,000 of its 3,000 images (BadZipFile: Bad CRC-32 for file "
        "'images.npy')"]


# --- reading in chunks ------------------------------------------------------------------------


def test_images_come_in_bounded_chunks_in_file_order(tmp_path, official):
    """PNG files, an .npz and an IDX file: every image once, in order, in chunks of at most
    twice the size asked for; files counted for the progress bar."""
    test = official[1].images.numpy()
    pngs = [png(tmp_path / f"{i}.png", 0) for i in range(700)]
    np.savez(tmp_path / "a.npz", images=test[:2500])
    (tmp_path / "b-idx3-ubyte").write_bytes(idx_header(1500) + test[2500:4000].tobytes())
    files = [*pngs[:300], str(tmp_path / "a.npz"), *pngs[300:], str(tmp_path / "b-idx3-ubyte")]
    chunks = list(read_images(files, chunk_images=1000, workers=2))
    assert all(len(c) < 2000 for c in chunks) and len(chunks) >= 4
    assert sum(c.files for c in chunks) == len(files)
    sources = [s for c in chunks for s in c.sources]
    assert [(s.file, s.index) for s in sources] == (
        [(p, None) for p in pngs[:300]] + [(files[300], i) for i in range(2500)]
        + [(p, None) for p in pngs[300:]] + [(files[-1], i) for i in range(1500)])
    images = np.concatenate([c.prepared.images for c in chunks])
    np.testing.assert_array_equal(images[300:2800], test[:2500])
    np.testing.assert_array_equal(images[-1500:], test[2500:4000])
    assert not images[:300].any()
