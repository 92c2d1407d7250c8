"""Labelled images from users' files, for `fashionnet ingest`: every image found and converted
exactly as `fashionnet predict` finds and converts it (fashionnet.reading), each with its label.

Where a label comes from, in order:
- ``labels`` (a CSV of ``file,label`` rows, files relative to the CSV's folder, links
  followed): every image file found must have a row;
- ``label``: one class for every image given;
- an .npz's own ``labels`` array, or an IDX label file given right after its image file;
- a directory's class subdirectories, named by class index (``0``-``9``) or slug
  (``t-shirt-top``, ``ankle-boot``; fashionnet.incoming.SLUGS).

Every problem is collected before anything is refused, so that the refusal names the first bad
file and counts the rest.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionnet.arrays import npz_labels
from fashionnet.data import IMAGE_SIZE
from fashionnet.errors import DataError
from fashionnet.idx import open_regular, read_labels
from fashionnet.incoming import class_index
from fashionnet.reading import IDX1_MAGIC, ZIP_MAGIC, Source, find_images, read_images

MAX_BATCH = 200_000  # images in one batch: 157 MB held while it is checked and written
MAX_CSV_BYTES = 64 * 2**20  # a labels CSV: MAX_BATCH rows of paths up to 300 characters


@dataclass(frozen=True)
class Labelled:
    """Images (N, 28, 28) uint8 as the model sees them, their labels (N,) uint8, and where
    each came from."""

    sources: list[Source]
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class Refusals:
    """The problems found, the first one named when refusing."""

    def __init__(self) -> None:
        self.errors: list[DataError] = []

    def add(self, path: str | os.PathLike[str], problem: str) -> None:
        self.errors.append(DataError(path, problem))

    def raise_any(self) -> None:
        if self.errors:
            first = self.errors[0]
            more = len(self.errors) - 1
            raise DataError(first.path, first.problem + (f" (and {more} more file"
                                                         f"{'s' if more > 1 else ''})"
                                                         if more else ""))


def _magic(path: str) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read(4)
    except (OSError, DataError):
        return b""  # the reader refuses it, naming why


def _read_csv(path: Path, refusals: Refusals) -> dict[str, int]:
    """{real file path: label} from a file,label CSV (a file named twice must have one label)."""
    found: dict[str, int] = {}
    lines: dict[str, int] = {}
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_CSV_BYTES:
                refusals.add(path, f"is over {MAX_CSV_BYTES // 2**20} MiB: more rows than a "
                                   f"batch of {MAX_BATCH:,} images needs")
                return found
            rows = list(csv.reader(f.read().decode("utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        refusals.add(path, f"cannot be read as a file,label CSV ({type(e).__name__})")
        return found
    except DataError as e:
        refusals.errors.append(e)
        return found
    for number, row in enumerate(rows, 1):
        if number == 1 and [c.strip().lower() for c in row] == ["file", "label"]:
            continue  # the header
        if len(row) != 2:
            refusals.add(path, f"line {number} is not file,label")
            continue
        label = class_index(row[1])
        if label is None:
            refusals.add(path, f"line {number}: unknown class {row[1].strip()!r}")
            continue
        file = os.path.realpath(path.parent / row[0].strip())
        if found.get(file, label) != label:
            refusals.add(path, f"line {number}: {row[0].strip()} is labelled "
                               f"{row[1].strip()!r} here and otherwise on line {lines[file]}")
            continue
        found[file], lines[file] = label, lines.get(file, number)
    return found


def _label_sources(paths: list[str], label: int | None, table: dict[str, int] | None,
                   refusals: Refusals) -> list[tuple[list[str], int | None]]:
    """Groups of files to read, each with the label of all its images (None: their own, from
    an .npz or an IDX label file)."""
    groups: list[tuple[list[str], int | None]] = []
    own: list[str] = []  # files with labels of their own: .npz files, IDX image/label pairs
    for path in paths:
        if label is not None or table is not None or not os.path.isdir(path):
            files = find_images([path], refusals.errors)
            if table is not None:
                for file in files:
                    if (row := table.get(os.path.realpath(file))) is None:
                        refusals.add(file, "has no row in the labels CSV")
                    else:
                        groups.append(([file], row))
            elif label is not None:
                groups.append((files, label))
            else:
                own += files
            continue
        for entry in sorted(os.scandir(path), key=lambda e: e.name):  # class subdirectories
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                refusals.add(entry.path, "is not in a class directory (0-9 or a class slug); "
                                         "give --label or --labels for loose files")
                continue
            cls = class_index(entry.name)
            if cls is None:
                refusals.add(entry.path, f"unknown class {entry.name!r}: name class "
                                         "directories 0-9 or by slug (e.g. ankle-boot)")
                continue
            groups.append((find_images([entry.path], refusals.errors), cls))
    return groups + ([(own, None)] if own else [])


def read_labelled_images(paths: list[str | os.PathLike[str]], label: str | None = None,
                  labels: str | os.PathLike[str] | None = None) -> Labelled:
    """The labelled images under ``paths`` (see the module's docstring), converted. DataError
    naming the first problem and counting the others: a missing, unreadable or non-image
    file, an unknown class, an image without a label, more than MAX_BATCH images."""
    refusals = Refusals()
    cls = None
    if label is not None and (cls := class_index(label)) is None:
        raise DataError("--label", f"unknown class {label!r}: give 0-9 or a class slug "
                                   "(e.g. ankle-boot)")
    table = None if labels is None else _read_csv(Path(labels), refusals)
    given = [os.fspath(p) for p in paths]
    sources: list[Source] = []
    images, found = [], []
    for files, group_label in _label_sources(given, cls, table, refusals):
        pending = list(files)
        while pending:
            file = pending.pop(0)
            magic = _magic(file)
            if magic == IDX1_MAGIC:
                refusals.add(file, "is an IDX label file without an IDX image file before it")
                continue
            pair = pending[0] if pending and _magic(pending[0]) == IDX1_MAGIC else None
            if pair is not None:
                pending.pop(0)
            own = _own_labels(file, pair, refusals) if group_label is None else None
            if group_label is None and own is None:
                if not refusals.errors or refusals.errors[-1].path != Path(file):
                    refusals.add(file, "has no label: give --label, --labels, a class "
                                       "directory, or labels inside the .npz")
                continue
            for chunk in read_images([file], skip_bad=True):
                refusals.errors += chunk.bad
                n = len(chunk)
                if not n:
                    continue
                if len(sources) + n > MAX_BATCH:
                    raise DataError(file, f"takes the batch past {MAX_BATCH:,} images: "
                                          "ingest it in smaller batches")
                sources += chunk.sources
                images.append(chunk.prepared.images)
                if own is None:
                    found.append(np.full(n, group_label, np.uint8))
                else:  # the chunk's images are those at its sources' indices in the file
                    first = chunk.sources[0].index or 0
                    found.append(own[first : first + n].astype(np.uint8))
    refusals.raise_any()
    if not sources:
        raise DataError(" ".join(given) or "(no path)", "holds no image: the batch is empty")
    return Labelled(sources, np.concatenate(images).reshape(-1, IMAGE_SIZE, IMAGE_SIZE),
                    np.concatenate(found))


def _own_labels(file: str, pair: str | None, refusals: Refusals) -> np.ndarray | None:
    """An .npz's ``labels`` array, or the IDX label file ``pair``: one label per image."""
    from fashionnet.arrays import idx_images, npz_images

    try:
        if pair is not None:
            count = idx_images(file).count
            own = read_labels(pair)
            if len(own) != count:
                refusals.add(pair, f"holds {len(own):,} labels for the {count:,} images of "
                                   f"{file}")
                return None
            return own
        if file.lower().endswith(".npz") or _magic(file) == ZIP_MAGIC:
            return npz_labels(file, npz_images(file).count)
    except DataError as e:
        refusals.errors.append(e)
    return None
