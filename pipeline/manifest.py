"""data/incoming/manifest.csv: the incoming batches, one row each, in the order they arrived.

The manifest lives in git; each batch file it names is tracked by DVC (``<id>.npz.dvc``). A
row says where the batch came from (the paths given to `fashionnet ingest`), how many images of
each class it added, how many duplicates it skipped, and when. A batch is in the training data
exactly when its row is here: the split stage reads only the batches the manifest lists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pandas as pd

from fashionnet.errors import DataError
from fashionnet.incoming import BATCH_ID, SLUGS
from pipeline import paths

COLUMNS = ["batch", "ingested", "images", "duplicates_skipped", *SLUGS, "sources"]


@dataclass(frozen=True)
class Row:
    """One accepted batch."""

    batch: str
    ingested: str  # UTC, ISO 8601 to the second
    counts: Mapping[str, int]  # images per class slug
    duplicates_skipped: int
    sources: Sequence[str]  # the paths given to `fashionnet ingest`

    def record(self) -> dict[str, object]:
        return {"batch": self.batch, "ingested": self.ingested,
                "images": sum(self.counts.values()),
                "duplicates_skipped": self.duplicates_skipped, **self.counts,
                "sources": json.dumps(list(self.sources))}


def empty() -> str:
    """The manifest of a project with no incoming data: its header."""
    return ",".join(COLUMNS) + "\n"


def read(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The manifest's rows, checked; DataError naming the file otherwise. A missing manifest
    is the empty one: a checkout from before incoming data."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({type(e).__name__})") from None
    return read_text(text, path)


def read_text(text: str, path: str | os.PathLike[str] = paths.MANIFEST) -> pd.DataFrame:
    """The rows of a manifest's ``text`` (as committed at some revision), checked."""
    try:
        frame = pd.read_csv(StringIO(text), dtype={"batch": str, "ingested": str,
                                                    "sources": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(path, f"not a readable manifest ({type(e).__name__})") from None
    if list(frame.columns) != COLUMNS:
        raise DataError(path, f"columns must be {','.join(COLUMNS)}")
    bad = [b for b in frame["batch"] if not isinstance(b, str) or not BATCH_ID.fullmatch(b)]
    if bad:
        raise DataError(path, f"batch {bad[0]!r} is not a batch id (16 hex digits)")
    if frame["batch"].duplicated().any():
        raise DataError(path, f"batch {frame['batch'][frame['batch'].duplicated()].iloc[0]} "
                              "is listed twice")
    return frame


def write(frame: pd.DataFrame) -> str:
    """The manifest's text for ``frame``'s rows."""
    return frame[COLUMNS].to_csv(index=False)


def append(frame: pd.DataFrame, row: Row) -> pd.DataFrame:
    """``frame`` with ``row`` added at the end."""
    added = pd.DataFrame([row.record()], columns=COLUMNS)
    return added if frame.empty else pd.concat([frame, added], ignore_index=True)
