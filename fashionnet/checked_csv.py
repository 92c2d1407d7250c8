"""CSV tables that an earlier stage or command wrote, read and checked before anything uses
them: a missing, unreadable or incomplete one raises DataError naming the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fashionnet.errors import DataError


def read_table(path: str | os.PathLike[str], columns: Sequence[str],
               text: Sequence[str] = (), allow_empty: bool = False,
               optional: Sequence[str] = ()) -> pd.DataFrame:
    """``path`` as a DataFrame, refused unless it has ``columns`` and rows (or only its header,
    with ``allow_empty``), with finite numbers in every column but those named in ``text``;
    the number columns named in ``optional`` may also be empty (NaN)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(path, "file not found (run the stages before this one)") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError, bad bytes
        raise DataError(path, f"not a readable CSV file ({type(e).__name__})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, f"lacks the column(s) {', '.join(missing)}")
    if frame.empty and not allow_empty:
        raise DataError(path, "has no rows")
    for column in columns:
        values = frame[column]
        if column in text:
            bad = values.isna().any()
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            if column in optional:
                numbers = numbers[values.notna().to_numpy()]
            bad = not np.isfinite(numbers).all()
        if bad:
            what = "empty cells" if column in text else "a value that is not a finite number"
            raise DataError(path, f"column {column} holds {what}")
    return frame
