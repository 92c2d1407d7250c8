"""Bounded readers of the arrays in users' .npz and IDX files: images, and labels.

Each array's size is read from its header and checked against what the file can hold before
anything is allocated. Images are read in chunks, so a file of any length costs one chunk of
memory; an array read whole (labels, or images with :meth:`ImageArray.read`) is refused when
it claims more than a byte limit.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fashionnet.data import IMAGE_SIZE, NUM_CLASSES
from fashionnet.errors import DataError
from fashionnet.idx import MAX_ARRAY_BYTES, open_data, open_regular, read_header

PIXELS = IMAGE_SIZE * IMAGE_SIZE  # bytes per image
CHUNK_IMAGES = 8192  # images per chunk read: 6.4 MB
# Deflate expands at most 1032-fold (zlib's technical details): a compressed .npz member
# that claims more than that many times its compressed size is forged.
_DEFLATE_RATIO = 1032
# What can go wrong inside a zip archive or an .npy header once it is open.
_ZIP_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _problem(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


@dataclass(frozen=True)
class _Npy:
    """An .npz member's array header: shape, dtype, order, where its data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of the member before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: no overflow


@contextlib.contextmanager
def _npz_member(path: Path, name: str) -> Iterator[tuple[BinaryIO, _Npy]]:
    """The member ``name`` of the .npz at ``path``, open at the start of its data, and its
    header, checked against the member's size and the archive's before any data is read."""
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(open_regular(path))
            archive = stack.enter_context(zipfile.ZipFile(f))
            info = archive.getinfo(name)
            member = stack.enter_context(archive.open(info))
            npy = _read_npy_header(member, path, name)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(path, "no such file or directory") from None
        except (*_ZIP_ERRORS, KeyError) as e:
            raise DataError(path, f"not a readable .npz file ({_problem(e)})") from None
        _check_member_size(path, name, npy, info, os.fstat(f.fileno()).st_size)
        yield member, npy


def _read_npy_header(member: BinaryIO, path: Path, name: str) -> _Npy:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise DataError(path, f"'{_key(name)}': .npy format version {version} is not "
                              "supported")
    return _Npy(tuple(shape), np.dtype(dtype), bool(fortran), member.tell())


def _check_member_size(path: Path, name: str, npy: _Npy, info: zipfile.ZipInfo,
                       archive_bytes: int) -> None:
    """Refuse a header whose array the member or the archive cannot hold, and a member
    compressed otherwise than np.savez and np.savez_compressed write (bzip2 and LZMA expand
    far more than deflate, with no bound worth checking against)."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(path, f"'{_key(name)}' is compressed with zip method "
                              f"{info.compress_type}: only stored and deflated members (as "
                              "np.savez and np.savez_compressed write) are read")
    held = info.file_size - npy.offset
    if held < npy.nbytes:
        raise DataError(path, f"'{_key(name)}' claims {npy.shape} ({npy.nbytes:,} bytes), but "
                              f"holds {max(held, 0):,} bytes")
    if info.header_offset + info.compress_size > archive_bytes or (
            info.compress_type == zipfile.ZIP_STORED and info.compress_size < info.file_size
    ) or (info.compress_type == zipfile.ZIP_DEFLATED
          and info.file_size > _DEFLATE_RATIO * max(info.compress_size, 1)):
        raise DataError(path, f"'{_key(name)}' claims {info.file_size:,} bytes, more than the "
                              f"{archive_bytes:,}-byte file can hold")


def _arrays(path: Path) -> list[str]:
    """The .npz's array names (its members, less ``.npy``), as np.load names them."""
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            return archive.namelist()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(path, "no such file or directory") from None
    except _ZIP_ERRORS as e:
        raise DataError(path, f"not a readable .npz file ({_problem(e)})") from None


def _key(name: str) -> str:
    return name.removesuffix(".npy")


@dataclass(frozen=True)
class ImageArray:
    """N 28x28 uint8 images stored in an IDX image file or an .npz member, read on demand."""

    path: Path
    count: int
    member: str | None = None  # the .npz member; None for an IDX file
    fortran: bool = False  # the member's data is in Fortran order: read whole, then reordered

    @contextlib.contextmanager
    def _data(self) -> Iterator[BinaryIO]:
        """The file, open at the first image, its header checked again (it may have changed
        since it was opened first)."""
        if self.member is None:
            try:
                f = open_regular(self.path)
            except OSError as e:
                raise DataError(self.path, f"cannot be read: {e.strerror}") from None
            with f:
                if read_header(f, self.path, 3)[0] != self.count:
                    raise DataError(self.path, "changed while it was read")
                yield f
            return
        with _npz_member(self.path, self.member) as (member, npy):
            if math.prod(npy.shape) != self.count * PIXELS:
                raise DataError(self.path, "changed while it was read")
            yield member

    def chunks(self, size: int = CHUNK_IMAGES) -> Iterator[np.ndarray]:
        """The images in order, (n, 28, 28) uint8 arrays of n <= ``size`` (writable); a
        DataError naming the file, and how many images came before, if it breaks off."""
        if not self.fortran:
            for flat in self._bytes(size):
                yield flat.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
            return
        [flat] = self._bytes(self.count)  # whole: npz_images bounded it to MAX_ARRAY_BYTES
        images = flat.reshape((self.count, IMAGE_SIZE, IMAGE_SIZE), order="F")
        for start in range(0, self.count, size):
            yield np.ascontiguousarray(images[start : start + size])

    def _bytes(self, size: int) -> Iterator[np.ndarray]:
        """The data in order, flat uint8 arrays of ``size`` images' bytes (the last fewer)."""
        done = 0
        try:
            with self._data() as f:
                while done < self.count:
                    n = min(size, self.count - done)
                    buffer = bytearray(n * PIXELS)
                    got = f.readinto(buffer)  # type: ignore[attr-defined]
                    while got < len(buffer):  # a zip member may return less than asked
                        more = f.readinto(memoryview(buffer)[got:])  # type: ignore[attr-defined]
                        if not more:
                            raise EOFError(f"{got // PIXELS} of {n} images")
                        got += more
                    yield np.frombuffer(buffer, dtype=np.uint8)
                    done += n
        except DataError:
            raise
        except _ZIP_ERRORS as e:
            raise DataError(self.path, f"breaks off after {done:,} of its {self.count:,} "
                                       f"images ({_problem(e)})") from None

    def read(self, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
        """All the images, (N, 28, 28) uint8; refused before reading if more than
        ``max_bytes``."""
        if self.count * PIXELS > max_bytes:
            raise DataError(self.path, f"{self.count:,} images are {self.count * PIXELS:,} "
                                       f"bytes, more than the {max_bytes:,} read at once")
        [images] = self.chunks(self.count)
        return images


def idx_images(path: str | os.PathLike[str]) -> ImageArray:
    """The images of an IDX image file of 28x28 unsigned bytes, header checked against the
    file's size."""
    path = Path(path)
    with open_data(path) as f:
        dims = read_header(f, path, 3)
    if dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(path, f"images are {dims[1]}x{dims[2]}, expected 28x28")
    if dims[0] == 0:
        raise DataError(path, "holds no images")
    return ImageArray(path, dims[0])


def npz_images(path: str | os.PathLike[str]) -> ImageArray:
    """The images of an .npz file: its array named ``images``, or its only array, of shape
    (N, 28, 28) or (28, 28) and dtype uint8; header checked against the file's size."""
    path = Path(path)
    names = _arrays(path)
    keys = [_key(n) for n in names]
    if "images" in keys:
        name = names[keys.index("images")]
    elif len(names) == 1:
        name = names[0]
    else:
        raise DataError(path, f"holds arrays {keys}: none named 'images'")
    with _npz_member(path, name) as (_, npy):
        pass
    shape = (1, *npy.shape) if len(npy.shape) == 2 else npy.shape
    if npy.dtype != np.uint8 or len(shape) != 3 or shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(path, f"'{_key(name)}' must be (N, 28, 28) uint8 images, got "
                              f"{npy.dtype} {npy.shape}")
    if shape[0] == 0:
        raise DataError(path, "holds no images")
    if npy.fortran and npy.nbytes > MAX_ARRAY_BYTES:  # such an array is only read whole
        raise DataError(path, f"'{_key(name)}' is stored in Fortran order and is "
                              f"{npy.nbytes:,} bytes, more than the {MAX_ARRAY_BYTES:,} read "
                              "at once: save it with np.ascontiguousarray(images)")
    return ImageArray(path, shape[0], name, npy.fortran and shape[0] > 1)


def npz_labels(path: str | os.PathLike[str], count: int,
               max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray | None:
    """(N,) uint8 class indices from the .npz's array named ``labels``, None if it has none;
    a DataError unless it holds ``count`` integers in 0..9 in at most ``max_bytes``."""
    path = Path(path)
    names = [n for n in _arrays(path) if _key(n) == "labels"]
    if not names:
        return None
    with _npz_member(path, names[0]) as (member, npy):
        if npy.dtype.kind not in "iu" or npy.shape != (count,):
            raise DataError(path, f"'labels' must be ({count},) integers, one per image, got "
                                  f"{npy.dtype} {npy.shape}")
        if npy.nbytes > max_bytes:
            raise DataError(path, f"'labels' are {npy.nbytes:,} bytes, more than the "
                                  f"{max_bytes:,} read at once")
        try:
            labels = np.frombuffer(member.read(npy.nbytes), dtype=npy.dtype)
        except _ZIP_ERRORS as e:
            raise DataError(path, f"'labels' cannot be read ({_problem(e)})") from None
    if len(labels) != count:
        raise DataError(path, f"'labels' breaks off after {len(labels):,} of {count:,}")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(path, f"label {labels[bad[0]]} at index {bad[0]} is outside "
                              f"0..{NUM_CLASSES - 1}")
    return labels.astype(np.uint8)
