"""Atomic file writes: a crash or a full disk never leaves a half-written output."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` keeps its previous content. A
    temporary file that a killed process (``kill -9``, power loss) left behind for ``path``
    is removed first: each output has one writer at a time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths in one step


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Swap two directories' names in one atomic step (Linux renameat2 RENAME_EXCHANGE), so
    that a reader, or a crash, sees either the old directory or the new one, never a mix.
    Where the call or the filesystem lacks it, two renames with a moment between them."""
    import ctypes

    a, b = os.fspath(a), os.fspath(b)
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd = -100  # fcntl.h: paths relative to the working directory
    if renameat2 is not None and renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(),
                                           _RENAME_EXCHANGE) == 0:
        _fsync_dir(Path(b).parent)
        return
    errno = ctypes.get_errno()
    if renameat2 is not None and errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP
        raise OSError(errno, os.strerror(errno), a)
    aside = f"{b}.swap"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)
    _fsync_dir(Path(b).parent)


@contextlib.contextmanager
def replaced_directory(path: str | os.PathLike[str], shared: str = "*.npz") -> Iterator[Path]:
    """Yield a copy of directory ``path`` beside it to change; on success the copy takes its
    place in one atomic exchange. On any error, or a kill before the exchange, ``path`` is as
    it was (a copy a killed process left behind is removed by the next call; so is a kill
    between the renames of exchange()'s fallback, by putting the old directory back).

    Files matching ``shared`` (immutable ones: they are never changed in place) are hard links
    in the copy, so they cost nothing; the others are copied, since a change to a link would
    change the original too.
    """
    path = Path(path)
    stage = path.with_name(f"{path.name}.new")
    shutil.rmtree(stage, ignore_errors=True)
    aside = path.with_name(f"{path.name}.swap")  # exchange()'s fallback, killed half-way
    if aside.is_dir() and not path.exists():
        os.rename(aside, path)  # the old one, taken aside: back in its place
    shutil.rmtree(aside, ignore_errors=True)  # else the old one after the new one went in

    def link_or_copy(source: str, target: str) -> None:
        if Path(source).match(shared):
            os.link(source, target)
        else:
            shutil.copy2(source, target)

    shutil.copytree(path, stage, copy_function=link_or_copy)
    try:
        yield stage
        exchange(stage, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the old directory, or a failed new one
