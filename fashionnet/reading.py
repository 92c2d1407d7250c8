"""Finding and reading users' files: image files Pillow reads, directories of them, .npz and IDX
files of 28x28 images, converted (fashionnet.conversion) and handed out in chunks.

Nothing here can hang or exhaust memory: only regular files are opened, never blocking; walks
stop at symbolic-link loops; images are decoded within a pixel limit; .npz and IDX headers are
checked against the file before anything is allocated, and their images streamed."""

from __future__ import annotations

import functools
import os
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fashionnet.arrays import CHUNK_IMAGES, ImageArray, idx_images, npz_images
from fashionnet.conversion import MAX_PIXELS, Invert, Prepared, convert, decode, negate
from fashionnet.data import IMAGE_SIZE
from fashionnet.errors import DataError
from fashionnet.idx import open_data, open_regular

# Formats Pillow identifies but cannot decode here (stubs, video, EPS without Ghostscript):
# a directory's files in these are not taken for images.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}
IDX3_MAGIC = b"\x00\x00\x08\x03"  # unsigned bytes, 3 dimensions: an IDX image file
IDX1_MAGIC = b"\x00\x00\x08\x01"  # unsigned bytes, 1 dimension: an IDX label file
ZIP_MAGIC = b"PK\x03\x04"  # .npz files are zip archives
FILES_PER_TASK = 256  # files per decoding task: a task per file would cost more than a decode


@dataclass(frozen=True)
class Source:
    """Where one image came from: a file, and its index inside an .npz or IDX file."""

    file: str
    index: int | None = None

    def __str__(self) -> str:
        return self.file if self.index is None else f"{self.file}[{self.index}]"


@dataclass(frozen=True)
class Chunk:
    """Images read, in file order: their sources, the images converted, the files refused
    (with ``skip_bad``) and how many files were done since the previous chunk."""

    sources: list[Source]
    prepared: Prepared
    bad: list[DataError] = field(default_factory=list)
    files: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def image_suffixes() -> frozenset[str]:
    """File name suffixes taken for images inside directories: what Pillow decodes, and .npz."""
    Image.init()
    return frozenset({ext for ext, fmt in Image.registered_extensions().items()
                      if fmt in Image.OPEN and fmt not in _UNDECODABLE} | {".npz"})


def _wanted(name: str, suffixes: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes or name.endswith("idx3-ubyte")


def _entries(directory: str, bad: Callable[[DataError], None]) -> list[os.DirEntry[str]]:
    """The directory's entries but hidden ones, sorted by name; none if it cannot be read."""
    try:
        with os.scandir(directory) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        bad(DataError(directory, f"cannot be read: {e.strerror}"))
        return []


def _refusal(path: str) -> DataError:
    """Why a directory entry that is not a regular file or a directory cannot be read."""
    try:
        open_regular(path).close()  # raises, naming what it is (FIFO, socket, device, ...)
    except DataError as e:
        return e
    except FileNotFoundError:
        return DataError(path, "a broken symbolic link")
    except OSError as e:
        return DataError(path, f"cannot be read: {e.strerror}")
    return DataError(path, "changed while the directory was read")


def _walk(top: str, suffixes: frozenset[str], bad: Callable[[DataError], None]) -> Iterator[str]:
    """The wanted files under ``top``, depth first, each level sorted by name: the order of
    sorting their paths part by part. os.scandir's entries know their type, so it costs no
    stat per file (pathlib's rglob and sort took 0.4 s for 10,000 files). A symbolic link to
    a directory the walk is inside is a loop, reported to ``bad`` and not followed."""
    st = os.stat(top)
    stack = [(iter(_entries(top, bad)), ((st.st_dev, st.st_ino),))]  # (entries, ancestors)
    while stack:
        entries, ancestors = stack[-1]
        for entry in entries:  # resumed where it stopped when a subdirectory is done
            try:
                if entry.is_dir():  # follows symbolic links
                    key = (entry.stat().st_dev, entry.stat().st_ino)  # stat() is cached
                    if key not in ancestors:
                        stack.append((iter(_entries(entry.path, bad)), (*ancestors, key)))
                        break
                    bad(DataError(entry.path, "a symbolic link loop: it leads back to a "
                                              "directory that contains it"))
                elif _wanted(entry.name, suffixes):
                    if not entry.is_file():
                        bad(_refusal(entry.path))
                        continue
                    yield entry.path
            except OSError as e:  # e.g. a link to itself: too many levels of symbolic links
                bad(DataError(entry.path, f"cannot be read: {e.strerror}"))
        else:
            stack.pop()


def find_images(paths: Iterable[str | os.PathLike[str]],
                bad: list[DataError] | None = None) -> list[str]:
    """The files to read, in order: each file as given, each directory's image, .npz and IDX
    files recursively, sorted by path (hidden files and directories left out). DataError for a
    path given that is missing, unreadable, not a regular file or directory (a FIFO, socket,
    device), or a directory without files to read; and for an entry of a directory that cannot
    be read (a link loop, a broken link, a FIFO...) unless ``bad`` is given: then it is
    appended there and left out."""
    def refuse(error: DataError) -> None:
        if bad is None:
            raise error
        bad.append(error)

    suffixes = image_suffixes()
    found: list[str] = []
    for path in map(str, paths):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise DataError(path, "no such file or directory") from None
        except OSError as e:
            raise DataError(path, f"cannot be read: {e.strerror}") from None
        if stat.S_ISDIR(mode):
            refused = len(bad or [])
            inside = list(_walk(path, suffixes, refuse))
            if not inside and len(bad or []) == refused:
                raise DataError(path, "directory holds no image, .npz or IDX files")
            found.extend(inside)
        elif stat.S_ISREG(mode):
            found.append(path)
        else:
            raise _refusal(path)
    return found


def _open(path: str, invert: Invert, max_pixels: int
          ) -> tuple[np.ndarray, bool | None] | ImageArray:
    """One file: an image converted, (28, 28) uint8 and whether it was negated (None: already
    28x28, to be negated with others), or an .npz or IDX file's images to stream; DataError."""
    with open_data(path) as f:  # opened once: a second open costs as much as a 28x28 decode
        magic = f.read(4)
        if magic == IDX3_MAGIC:
            return idx_images(path)
        if magic == ZIP_MAGIC or path.lower().endswith(".npz"):
            return npz_images(path)
        f.seek(0)
        try:
            with Image.open(f) as image:
                grey = decode(image, max_pixels)
        except Image.UnidentifiedImageError:
            raise DataError(path, "not an image file Pillow can read") from None
        except Image.DecompressionBombError as e:
            raise DataError(path, str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated, bad CRC, ...
            raise DataError(path, f"damaged or truncated image ({e})") from None
    if grey.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return grey, None
    return convert(grey, invert)


def _read_group(paths: Sequence[str], invert: Invert, max_pixels: int
                ) -> list[tuple[np.ndarray, bool] | ImageArray | DataError]:
    """:func:`_open` of each path, in order, a DataError in place of a file refused; images
    already 28x28 negated in one vectorised pass (the per-image cost is that of the decode)."""
    items: list = []
    for path in paths:
        try:
            items.append(_open(path, invert, max_pixels))
        except DataError as e:
            items.append(e)
    raw = [i for i, item in enumerate(items) if isinstance(item, tuple) and item[1] is None]
    if raw:
        images, flips = negate(np.stack([items[i][0] for i in raw]), invert)
        for i, image, flip in zip(raw, images, flips, strict=True):
            items[i] = (image, bool(flip))
    return items


def _in_order(pool: ThreadPoolExecutor, task: Callable[[Sequence[str]], list],
              groups: Iterable[Sequence[str]], ahead: int) -> Iterator[list]:
    """``task(group)`` of each group, run in ``pool``, in order, at most ``ahead`` at a time:
    results not yet taken hold memory."""
    running: deque[Future[list]] = deque()
    for group in groups:
        running.append(pool.submit(task, group))
        if len(running) >= ahead:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


class _Gather:
    """Images, sources and refusals gathered into the next chunk."""

    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.images: list[np.ndarray] = []  # (n, 28, 28) uint8 each
        self.inverted: list[np.ndarray] = []  # (n,) bool each
        self.bad: list[DataError] = []
        self.files = 0  # done since the last chunk

    def add(self, sources: list[Source], images: np.ndarray, inverted: np.ndarray) -> None:
        self.sources += sources
        self.images.append(images)
        self.inverted.append(inverted)

    def take(self) -> Chunk:
        parts = self.images or [np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)]
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one part: no copy
        inverted = np.concatenate([np.empty(0, bool), *self.inverted])
        chunk = Chunk(self.sources, Prepared(images, inverted), self.bad, self.files)
        self.__init__()  # type: ignore[misc]  # empty for the next chunk
        return chunk


def _parts(path: str, item: tuple[np.ndarray, bool] | ImageArray, invert: Invert,
           chunk_images: int) -> Iterator[tuple[list[Source], np.ndarray, np.ndarray]]:
    """A file's images as (sources, (n, 28, 28) uint8, (n,) negated): one image, or an .npz
    or IDX file's, streamed in chunks of ``chunk_images``."""
    if not isinstance(item, ImageArray):
        yield [Source(path)], item[0][None], np.array([item[1]])
        return
    done = 0
    for images in item.chunks(chunk_images):
        yield [Source(path, done + i) for i in range(len(images))], *negate(images, invert)
        done += len(images)


def read_images(files: Sequence[str | os.PathLike[str]], invert: Invert = "auto",
                skip_bad: bool = False, max_pixels: int = MAX_PIXELS,
                chunk_images: int = CHUNK_IMAGES, workers: int | None = None
                ) -> Iterator[Chunk]:
    """The images of ``files`` (see :func:`find_images`), converted, in order, in chunks of
    ``chunk_images`` to twice that: memory stays bounded however many there are. Image files
    are decoded by a thread pool (Pillow decodes without the GIL), two tasks per thread ahead
    at most; .npz and IDX files are streamed. A bad file raises its DataError, the first in
    file order; with ``skip_bad`` it goes to the chunk's ``bad`` and the rest are read (an
    .npz or IDX file that breaks off keeps the images before, its error says how many)."""
    # Pillow warns from 89 million pixels: MAX_PIXELS refuses far fewer before decoding.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # idempotent
    paths = [str(f) for f in files]
    groups = [paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
    workers = workers or torch.get_num_threads()
    task = functools.partial(_read_group, invert=invert, max_pixels=max_pixels)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="read")
    gather = _Gather()
    try:
        for group, items in zip(groups, _in_order(pool, task, groups, 2 * workers),
                                strict=True):
            for path, item in zip(group, items, strict=True):
                gather.files += 1
                try:
                    if isinstance(item, DataError):
                        raise item
                    for part in _parts(path, item, invert, chunk_images):
                        gather.add(*part)
                        if len(gather.sources) >= chunk_images:
                            yield gather.take()
                except DataError as e:
                    if not skip_bad:
                        raise
                    gather.bad.append(e)
        if gather.sources or gather.bad or gather.files:
            yield gather.take()
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, the tasks not yet started
